"""The fixed GenEval-style evaluation prompt set for the scenes, and its scoring.

Mirrors GenEval (Ghosh et al. 2023; djghosh13/geneval prompts/create_prompts.py and
evaluation/summary_scores.py): prompt records carry `tag`, `prompt`, `include` and, for
counting, `exclude`; an image is correct when `detector.check` accepts it; a tag's score is the
share of its images that are correct; `overall` is the unweighted mean of the six tag scores.

Prompts are drawn, deterministically for a seed, from the captions held out of training where a
family has enough of them (position, color_attr). single_object (3 captions), colors (18),
two_object (6, one held out) and counting (9, one held out) are too small for that, so they use
every caption; when a family has fewer captions than requested, its captions repeat (each copy
is its own prompt with its own images) so every tag is scored on the same number of images.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ecdit_cli.data import detector
from ecdit_cli.data.scenes import TAGS, caption_catalog, heldout_captions, is_heldout
from ecdit_cli.errors import EcditError, did_you_mean
from ecdit_cli.files import atomic_write_text

DEFAULT_PER_TAG = 32  # 6 x 32 = 192 prompts; with 4 images each, ~800 detector calls (~2-4 s)
# Families whose evaluation prompts come from held-out captions only.
HELDOUT_EVAL_TAGS: tuple[str, ...] = ("position", "color_attr")


def _per_tag_counts(per_tag: int | dict[str, int] | None) -> dict[str, int]:
    if per_tag is None or isinstance(per_tag, int):
        n = DEFAULT_PER_TAG if per_tag is None else per_tag
        counts = dict.fromkeys(TAGS, n)
    else:
        for tag in per_tag:
            if tag not in TAGS:
                raise EcditError(f"unknown prompt tag '{tag}'{did_you_mean(tag, TAGS)}; choose from {', '.join(TAGS)}")
        counts = {tag: int(per_tag.get(tag, 0)) for tag in TAGS}
    if any(n < 0 for n in counts.values()):
        raise EcditError(f"prompts per tag must be >= 0, got {counts}")
    return counts


def candidate_records(tag: str) -> list[dict[str, Any]]:
    """The captions a tag's evaluation prompts are drawn from (see the module docstring)."""
    records = caption_catalog(tag)
    if tag in HELDOUT_EVAL_TAGS:
        held = heldout_captions()
        records = [r for r in records if r["prompt"] in held]
    return records


def make_prompt_set(seed: int = 0, per_tag: int | dict[str, int] | None = None) -> list[dict[str, Any]]:
    """The evaluation prompts: GenEval records, tags in GenEval's order, deterministic in seed.

    per_tag: prompts per tag (int for all, or a dict tag -> count; default DEFAULT_PER_TAG).
    """
    records: list[dict[str, Any]] = []
    for tag_index, (tag, n) in enumerate(_per_tag_counts(per_tag).items()):
        cands = candidate_records(tag)
        rng = np.random.default_rng([seed, tag_index])
        if n <= len(cands):
            order = rng.choice(len(cands), size=n, replace=False)
        else:
            # Whole shuffled passes over the family, so repeats are as even as possible.
            order = np.concatenate([rng.permutation(len(cands)) for _ in range(math.ceil(n / len(cands)))])[:n]
        records.extend(json.loads(json.dumps(cands[int(i)])) for i in order)  # deep copies
    return records


def validate_record(record: Any, where: str = "prompt record") -> dict[str, Any]:
    """Check a GenEval record's structure; raises EcditError naming `where` and the problem."""
    if not isinstance(record, dict):
        raise EcditError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("tag", "prompt", "include"):
        if key not in record:
            raise EcditError(f"{where}: missing key '{key}'")
    if record["tag"] not in TAGS:
        raise EcditError(f"{where}: unknown tag '{record['tag']}'{did_you_mean(str(record['tag']), TAGS)}")
    for kind in ("include", "exclude"):
        clauses = record.get(kind, [])
        if not isinstance(clauses, list) or not all(isinstance(c, dict) and "class" in c and "count" in c
                                                    for c in clauses):
            raise EcditError(f"{where}: '{kind}' must be a list of {{class, count, ...}} objects")
    return record


def write_prompts(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """Write records as prompts.jsonl (one JSON object per line), atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a prompts.jsonl written by `write_prompts` (or GenEval's metadata file)."""
    path = Path(path)
    if not path.is_file():
        raise EcditError(f"prompt file {path} does not exist (write one with make_prompt_set + write_prompts)")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise EcditError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        records.append(validate_record(record, f"{path}:{lineno}"))
    if not records:
        raise EcditError(f"prompt file {path} holds no prompts")
    return records


def images_from_model(x: np.ndarray) -> np.ndarray:
    """Model outputs (N, 3, H, W) in [-1, 1] -> images (N, H, W, 3) in [0, 1] for scoring."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != 3:
        raise EcditError(f"expected model images of shape (N, 3, H, W), got {tuple(x.shape)}")
    return np.clip((x.transpose(0, 2, 3, 1) + 1) / 2, 0.0, 1.0)


def score_images(prompt_records: Sequence[dict[str, Any]],
                 images_per_prompt: Sequence[Sequence[np.ndarray]]) -> dict[str, Any]:
    """GenEval scores for images (H, W, 3) in [0, 1] or uint8, grouped per prompt record.

    Returns {"overall": mean of the tag scores, "tags": {tag: share of correct images},
    "prompts_with_any_correct": share of prompts with >= 1 correct image, "heldout": share of
    correct images among prompts whose caption is held out of training (None if none),
    "num_images", "missing_tags": tags with no images (left out of `overall`),
    "images": [{prompt_index, image_index, tag, prompt, correct, reason}]}.
    """
    if len(prompt_records) != len(images_per_prompt):
        raise EcditError(f"got images for {len(images_per_prompt)} prompts but {len(prompt_records)} prompt records")
    per_image: list[dict[str, Any]] = []
    any_correct = []
    for p, (record, images) in enumerate(zip(prompt_records, images_per_prompt, strict=True)):
        results = [detector.check(img, record) for img in images]
        any_correct.append(any(ok for ok, _ in results))
        per_image.extend({"prompt_index": p, "image_index": i, "tag": record["tag"], "prompt": record["prompt"],
                          "correct": bool(ok), "reason": reason} for i, (ok, reason) in enumerate(results))
    tags = {}
    for tag in TAGS:
        hits = [r["correct"] for r in per_image if r["tag"] == tag]
        if hits:
            tags[tag] = float(np.mean(hits))
    held = [r["correct"] for r in per_image if is_heldout(r["prompt"])]
    return {
        "overall": float(np.mean(list(tags.values()))) if tags else float("nan"),
        "tags": tags,
        "prompts_with_any_correct": float(np.mean(any_correct)) if any_correct else float("nan"),
        "heldout": float(np.mean(held)) if held else None,
        "num_images": len(per_image),
        "missing_tags": [t for t in TAGS if t not in tags],
        "images": per_image,
    }
