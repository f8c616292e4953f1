"""Data: rendered compositional scenes, their exact detector, and the training sources.

- `scenes`: procedurally rendered shapes with GenEval-family captions, index-addressable streams.
- `detector`: an exact detector for those scenes and GenEval's per-image check.
- `sources`: one image-caption interface over scenes, Fashion-MNIST and an image folder.

GenEval's prompt set and scores, which use the detector, are in `ecdit_cli.evaluate.geneval`.
"""

from ecdit_cli.data.detector import Detection, check, detect, evaluate
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
    "make_source",
    "relations",
    "render_batch",
    "sample_scene",
    "scene_for_metadata",
    "vocabulary",
]
