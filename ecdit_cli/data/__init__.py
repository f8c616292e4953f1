"""Data: rendered compositional scenes, their exact detector and GenEval scoring, and sources.

- `scenes`: procedurally rendered shapes with GenEval-family captions, index-addressable streams.
- `detector`: an exact detector for those scenes and GenEval's per-image check.
- `geneval`: the fixed evaluation prompt set and GenEval's scores.
- `sources`: one image-caption interface over scenes, Fashion-MNIST and an image folder.
"""

from ecdit_cli.data.detector import Detection, check, detect, evaluate
from ecdit_cli.data.geneval import make_prompt_set, read_prompts, score_images, write_prompts
from ecdit_cli.data.scenes import (
    Scene,
    SceneSpec,
    is_heldout,
    relations,
    render_batch,
    sample_scene,
    scene_for_metadata,
    vocabulary,
)
from ecdit_cli.data.sources import ImageTextSource, make_source

__all__ = [
    "Detection",
    "ImageTextSource",
    "Scene",
    "SceneSpec",
    "check",
    "detect",
    "evaluate",
    "is_heldout",
    "make_prompt_set",
    "make_source",
    "read_prompts",
    "relations",
    "render_batch",
    "sample_scene",
    "scene_for_metadata",
    "score_images",
    "vocabulary",
    "write_prompts",
]
