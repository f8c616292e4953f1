"""Procedurally rendered compositional scenes with GenEval-style captions (numpy only).

A scene is a few flat-coloured shapes (circle, square, upward triangle) on a black background,
described by a caption from one of GenEval's six task families (Ghosh et al. 2023,
djghosh13/geneval): single_object, two_object, counting, colors, position, color_attr. The
scene holds exactly the objects its caption names (no distractors), so an exact detector
(`detector.py`) can score generated images by GenEval's rules.

Streams are index-addressable: sample i of a split is a pure function of (seed, split, i), so a
training run resumes from a position alone, and "train", "val" and "eval" never share a random
state. A fixed ~10% of the captions of the combinatorial families is held out of "train" for
evaluating compositional generalisation (`is_heldout`).

Pixel convention: continuous coordinates, pixel (row r, col c) covers [c, c+1) x [r, r+1);
boxes are (x0, y0, x1, y1) with exclusive upper edges, so width = x1 - x0.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ecdit_cli.errors import EcditError, did_you_mean

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Colour directions at least ~35 degrees apart in RGB, so the detector's "scaled palette colour"
# classification (x ~ a * c_k) separates them exactly, even on anti-aliased edges with noise.
# Every name is one of GenEval's ten colour words.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "purple": (0.7, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
SPLITS: dict[str, int] = {"train": 0, "val": 1, "eval": 2}
# Families with enough combinations to hold some out; single_object (3) and colors (18) have
# too few, evaluation uses all of them.
HELDOUT_TAGS: tuple[str, ...] = ("two_object", "counting", "position", "color_attr")
HELDOUT_FRACTION = 0.1
# GenEval's POSITION_THRESHOLD: the centre offset shrinks by this times the summed box sizes.
POSITION_MARGIN = 0.1
SUPERSAMPLE = 4  # anti-aliasing: 4 x 4 samples per pixel

_STREAM_SALT = 0x5CE7E5  # keeps these streams apart from any other default_rng([seed, ...]) user
_PROMPT_STREAM = 3  # rendering a given prompt (scene_for_metadata), apart from the three splits


@dataclass(frozen=True)
class SceneSpec:
    """What scenes look like: image side in pixels and how many objects a scene may hold."""

    size: int = 32  # image side in pixels (16..64)
    min_objects: int = 1  # objects per scene, at least (1..4)
    max_objects: int = 4  # objects per scene, at most (min_objects..4)

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 64:
            raise EcditError(f"scene size {self.size} is out of range: must be in 16..64 pixels")
        if not 1 <= self.min_objects <= 4:
            raise EcditError(f"min_objects={self.min_objects} is out of range: must be in 1..4")
        if not self.min_objects <= self.max_objects <= 4:
            raise EcditError(f"max_objects={self.max_objects} must be in min_objects={self.min_objects}..4")

    @property
    def object_sizes(self) -> tuple[int, int]:
        """Smallest and largest object side in pixels (8..12 at 32, scaling with the image)."""
        return round(self.size * 0.25), round(self.size * 0.375)

    @property
    def gap(self) -> int:
        """Minimum distance in pixels between two objects' boxes (3 at 32)."""
        return max(2, round(self.size * 3 / 32))

    def tags(self) -> list[str]:
        """Families whose object count fits [min_objects, max_objects]."""
        counts = {"single_object": (1, 1), "colors": (1, 1), "two_object": (2, 2), "position": (2, 2),
                  "color_attr": (2, 2), "counting": (2, 4)}
        return [t for t in TAGS if counts[t][0] <= self.max_objects and counts[t][1] >= self.min_objects]


@dataclass
class Scene:
    """One rendered sample: image (H, W, 3) float32 in [0, 1], object mask (H, W) bool."""

    image: np.ndarray
    mask: np.ndarray
    caption: str
    metadata: dict[str, Any] = field(default_factory=dict)  # GenEval record + "objects"


# ----------------------------------------------------------------------------------------------
# Grammar: a plan (tag, objects, relation) -> caption and GenEval metadata.
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    tag: str
    objects: tuple[tuple[str, str | None], ...]  # (shape, named colour or None if unnamed)
    relation: str | None = None  # position: objects[0] <relation> objects[1]


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _phrase(shape: str, color: str | None) -> str:
    return _article(f"{color} {shape}" if color else shape)


def _caption(plan: _Plan) -> str:
    objs = plan.objects
    if plan.tag == "counting":
        return f"{NUMBER_WORDS[len(objs)]} {objs[0][0]}s"
    if plan.tag == "position":
        return f"{_phrase(*objs[0])} {plan.relation} {_phrase(*objs[1])}"
    return " and ".join(_phrase(*o) for o in objs)


def _metadata(plan: _Plan) -> dict[str, Any]:
    """GenEval's record (tag, prompt, include[, exclude]) in create_prompts.py's clause order."""
    def clause(shape: str, color: str | None, count: int = 1) -> dict[str, Any]:
        return {"class": shape, "count": count} | ({"color": color} if color else {})

    objs = plan.objects
    meta: dict[str, Any] = {"tag": plan.tag, "prompt": _caption(plan)}
    if plan.tag == "counting":
        meta["include"] = [clause(objs[0][0], None, len(objs))]
        # "not more": GenEval's counting exclude clause makes the count exact.
        meta["exclude"] = [{"class": objs[0][0], "count": len(objs) + 1}]
    elif plan.tag == "position":
        # The reference object comes first and the positioned one points at it (index 0).
        meta["include"] = [clause(*objs[1]), clause(*objs[0]) | {"position": [plan.relation, 0]}]
    else:
        meta["include"] = [clause(*o) for o in objs]
    return meta


def _all_plans(tag: str) -> list[_Plan]:
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    if tag == "single_object":
        return [_Plan(tag, ((s, None),)) for s in SHAPES]
    if tag == "colors":
        return [_Plan(tag, ((s, c),)) for s in SHAPES for c in COLORS]
    if tag == "two_object":
        return [_Plan(tag, ((a, None), (b, None))) for a, b in pairs]
    if tag == "counting":
        return [_Plan(tag, ((s, None),) * n) for s in SHAPES for n in NUMBER_WORDS]
    if tag == "position":
        return [_Plan(tag, ((a, ca), (b, cb)), r)
                for a, b in pairs for ca in COLORS for cb in COLORS for r in RELATIONS]
    # color_attr: two different shapes in two different colours, as GenEval draws them.
    return [_Plan(tag, ((a, ca), (b, cb))) for a, b in pairs for ca in COLORS for cb in COLORS if ca != cb]


@functools.lru_cache(maxsize=1)
def _catalog() -> dict[str, tuple[dict[str, Any], ...]]:
    return {tag: tuple(_metadata(p) for p in _all_plans(tag)) for tag in TAGS}


def caption_catalog(tag: str | None = None) -> list[dict[str, Any]]:
    """Every caption the grammar produces as GenEval records (all tags, or one), in a fixed order."""
    tags = TAGS if tag is None else (_check_tag(tag),)
    return [dict(m) for t in tags for m in _catalog()[t]]


def _caption_hash(caption: str) -> int:
    # sha256, not hash(): Python salts str hashes per process.
    return int.from_bytes(hashlib.sha256(caption.encode()).digest()[:8], "big")


@functools.lru_cache(maxsize=1)
def heldout_captions() -> frozenset[str]:
    """The evaluation-only captions: per family in HELDOUT_TAGS, the ceil(10%) lowest hashes.

    Ranking by hash (instead of thresholding it) guarantees at least one held-out caption even in
    the small families (two_object has 6 captions, counting 9).
    """
    held: set[str] = set()
    for tag in HELDOUT_TAGS:
        prompts = sorted((m["prompt"] for m in _catalog()[tag]), key=_caption_hash)
        held.update(prompts[: math.ceil(HELDOUT_FRACTION * len(prompts))])
    return frozenset(held)


def is_heldout(caption: str) -> bool:
    """True if the caption is reserved for evaluation and never rendered in the train split."""
    return caption in heldout_captions()


def vocabulary() -> list[str]:
    """Every word the grammar can produce, sorted (for a word-level tokenizer)."""
    return sorted({w for m in caption_catalog() for w in m["prompt"].split()})


def _check_tag(tag: str) -> str:
    if tag not in TAGS:
        raise EcditError(f"unknown scene tag '{tag}'{did_you_mean(tag, TAGS)}; choose from {', '.join(TAGS)}")
    return tag


def split_id(split: str) -> int:
    """The stream number of a split; unknown names raise with a suggestion."""
    if split not in SPLITS:
        raise EcditError(f"unknown split '{split}'{did_you_mean(split, SPLITS)}; choose from train, val, eval")
    return SPLITS[split]


# ----------------------------------------------------------------------------------------------
# Drawing: analytic inside-tests on a supersampled grid give exact anti-aliased coverage.
# ----------------------------------------------------------------------------------------------

def shape_coverage(shape: str, cx: Any, cy: Any, size: Any, height: int, width: int,
                   ss: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel of a (height, width) grid covered by a shape (float32 in [0, 1]).

    The shape fills the size x size box centred at (cx, cy); the triangle points up with its
    apex at the top centre and its base on the bottom edge. cx, cy and size may be scalars
    (result (H, W)) or equal-length 1-D arrays (result (N, H, W), one shape per entry); the
    detector draws its templates with this same function.
    """
    scalar = np.ndim(size) == 0
    cx, cy, h = (np.atleast_1d(np.asarray(v, np.float32))[:, None] for v in (cx, cy, np.asarray(size) / 2))
    offs = (np.arange(ss, dtype=np.float32) + 0.5) / ss
    xs = (np.arange(width, dtype=np.float32)[:, None] + offs).reshape(1, -1) - cx  # (N, W*ss)
    ys = (np.arange(height, dtype=np.float32)[:, None] + offs).reshape(1, -1) - cy  # (N, H*ss)
    if shape == "circle":
        inside = ys[:, :, None] ** 2 + xs[:, None, :] ** 2 <= (h * h)[:, :, None]
    elif shape == "square":
        inside = (np.abs(ys) <= h)[:, :, None] & (np.abs(xs) <= h)[:, None, :]
    elif shape == "triangle":
        depth = ys + h  # distance below the apex; the half-width grows by 1/2 per pixel of depth
        inside = ((depth >= 0) & (ys <= h))[:, :, None] & (np.abs(xs)[:, None, :] <= depth[:, :, None] / 2)
    else:
        raise EcditError(f"unknown shape '{shape}'{did_you_mean(shape, SHAPES)}")
    cover = inside.reshape(-1, height, ss, width, ss).sum(axis=(2, 4), dtype=np.float32) / (ss * ss)
    return cover[0] if scalar else cover


@functools.cache
def _patch(shape: str, size: int) -> np.ndarray:
    # Objects sit on the integer grid, so each (shape, size) patch is drawn once per process.
    patch = shape_coverage(shape, size / 2, size / 2, size, size, size)
    patch.setflags(write=False)
    return patch


# ----------------------------------------------------------------------------------------------
# Layout: GenEval's position rule, then object sizes and non-overlapping positions.
# ----------------------------------------------------------------------------------------------

def relative_position(box_a: np.ndarray, box_b: np.ndarray) -> np.ndarray:
    """GenEval's `relative_position` for batches: normalised revised offset (dx, dy) of A from B.

    Boxes are (..., 4) as (x0, y0, x1, y1). The centre offset shrinks by POSITION_MARGIN times the
    summed widths (heights) and is divided by the length of the unshrunk offset; GenEval names
    "left of" when dx < -0.5, "right of" when dx > 0.5, "above" when dy < -0.5, "below" when
    dy > 0.5. Returns (..., 2); all zeros where the shrunk offset vanishes (no relation).
    """
    a, b = np.asarray(box_a, np.float64), np.asarray(box_b, np.float64)
    offset = (a[..., :2] + a[..., 2:]) / 2 - (b[..., :2] + b[..., 2:]) / 2
    dims = (a[..., 2:] - a[..., :2]) + (b[..., 2:] - b[..., :2])
    revised = np.maximum(np.abs(offset) - POSITION_MARGIN * dims, 0) * np.sign(offset)
    norm = np.linalg.norm(offset, axis=-1, keepdims=True)
    out = revised / np.where(norm > 0, norm, 1.0)
    return np.where(np.all(np.abs(revised) < 1e-3, axis=-1, keepdims=True), 0.0, out)


def relations(box_a: Any, box_b: Any) -> set[str]:
    """The set of GenEval relations of box A relative to box B (may be empty or hold two)."""
    dx, dy = relative_position(np.asarray(box_a), np.asarray(box_b))
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


# Rendered position scenes keep a safety band around GenEval's 0.5 threshold so a detector whose
# boxes are off by a pixel still reads the same single relation.
_DOMINANT_MIN, _ORTHOGONAL_MAX = 0.65, 0.35


def _relation_ok(boxes_a: np.ndarray, box_b: np.ndarray, relation: str) -> np.ndarray:
    d = relative_position(boxes_a, box_b)  # (..., 2)
    axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[relation]
    return (sign * d[..., axis] >= _DOMINANT_MIN) & (np.abs(d[..., 1 - axis]) <= _ORTHOGONAL_MAX)


def _layout(rng: np.random.Generator, spec: SceneSpec, n: int, relation: str | None) -> np.ndarray:
    """Integer boxes (n, 4) inside the image, pairwise `spec.gap` apart, obeying `relation`.

    Objects are placed one at a time, each uniformly among the positions still free (so crowded
    four-object scenes do not depend on lucky rejection draws); a dead end restarts with new
    sizes, and repeated dead ends shrink the largest allowed size.
    """
    lo, hi = spec.object_sizes
    gap, side = spec.gap, spec.size
    for attempt in range(64):
        top = max(lo, hi - attempt // 4)
        sizes = rng.integers(lo, top + 1, size=n)
        boxes: list[tuple[int, int, int, int]] = []
        for s in (int(v) for v in sizes):
            # Candidate left (= top) edges keep one pixel from the border. Two boxes are apart
            # when they are apart along x or along y, so the test factorises into 1-D arrays.
            pos = np.arange(1, side - s)  # (P,)
            ok = np.ones((pos.size, pos.size), dtype=bool)  # (y, x)
            for bx0, by0, bx1, by1 in boxes:
                sep_x = np.maximum(pos - bx1, bx0 - (pos + s)) >= gap
                sep_y = np.maximum(pos - by1, by0 - (pos + s)) >= gap
                ok &= sep_y[:, None] | sep_x[None, :]
            if relation is not None and boxes:
                # Position scenes: the reference (objects[1]) is placed first, then the subject.
                cand = np.stack(np.broadcast_arrays(pos[None, :], pos[:, None], pos[None, :] + s,
                                                    pos[:, None] + s), axis=-1)  # (P, P, 4)
                ok &= _relation_ok(cand, np.asarray(boxes[0]), relation)
            free = np.flatnonzero(ok)
            if free.size == 0:
                break
            y, x = divmod(int(free[int(rng.integers(free.size))]), pos.size)
            boxes.append((int(pos[x]), int(pos[y]), int(pos[x]) + s, int(pos[y]) + s))
        if len(boxes) == n:
            out = np.asarray(boxes, dtype=np.int64)
            return out[::-1].copy() if relation is not None else out
    raise AssertionError(f"no layout found for {n} objects at size {side}")  # unreachable in practice


# ----------------------------------------------------------------------------------------------
# Sampling and rendering.
# ----------------------------------------------------------------------------------------------

def _sample_plan(rng: np.random.Generator, spec: SceneSpec, tag: str) -> _Plan:
    shapes = list(rng.permutation(len(SHAPES))[:2])
    a, b = SHAPES[shapes[0]], SHAPES[shapes[1]]
    c1, c2 = (COLORS[i] for i in rng.permutation(len(COLORS))[:2])
    if tag == "single_object":
        return _Plan(tag, ((a, None),))
    if tag == "colors":
        return _Plan(tag, ((a, c1),))
    if tag == "two_object":
        return _Plan(tag, ((a, None), (b, None)))
    if tag == "counting":
        n = int(rng.integers(max(2, spec.min_objects), min(4, spec.max_objects) + 1))
        return _Plan(tag, ((a, None),) * n)
    if tag == "position":
        # The two colours are independent here (may repeat); the shapes differ, as in GenEval,
        # whose per-class matching could not tell two objects of one class apart.
        c2 = COLORS[int(rng.integers(len(COLORS)))]
        return _Plan(tag, ((a, c1), (b, c2)), RELATIONS[int(rng.integers(len(RELATIONS)))])
    return _Plan(tag, ((a, c1), (b, c2)))


def _render(rng: np.random.Generator, spec: SceneSpec, plan: _Plan) -> Scene:
    n = len(plan.objects)
    boxes = _layout(rng, spec, n, plan.relation)
    unnamed = rng.integers(len(COLORS), size=n)
    image = np.zeros((spec.size, spec.size, 3), dtype=np.float32)
    mask = np.zeros((spec.size, spec.size), dtype=bool)
    objects = []
    for (shape, color), box, k in zip(plan.objects, boxes, unnamed, strict=True):
        color = color or COLORS[int(k)]
        x0, y0, x1, y1 = (int(v) for v in box)
        patch = _patch(shape, x1 - x0)
        image[y0:y1, x0:x1] = patch[:, :, None] * np.asarray(PALETTE[color], np.float32)
        mask[y0:y1, x0:x1] = patch > 0  # any covered pixel counts as object
        objects.append({"class": shape, "color": color, "bbox": [x0, y0, x1, y1],
                        "centre": [(x0 + x1) / 2, (y0 + y1) / 2]})
    meta = _metadata(plan) | {"objects": objects}
    return Scene(image=image, mask=mask, caption=meta["prompt"], metadata=meta)


def _stream_rng(seed: int, stream: int, index: int, *extra: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise EcditError(f"seed ({seed}) and sample index ({index}) must be non-negative")
    return np.random.default_rng([seed, _STREAM_SALT, stream, *extra, index])


def sample_scene(spec: SceneSpec, seed: int, split: str, index: int) -> Scene:
    """Sample `index` of the (seed, split) stream: a pure function of its arguments.

    Families are drawn uniformly among those that fit the spec; the train split redraws (within
    the family) any caption held out for evaluation.
    """
    rng = _stream_rng(seed, split_id(split), index)
    tags = spec.tags()
    tag = tags[int(rng.integers(len(tags)))]
    plan = _sample_plan(rng, spec, tag)
    while split == "train" and is_heldout(_caption(plan)):
        plan = _sample_plan(rng, spec, tag)
    return _render(rng, spec, plan)


def _plan_from_metadata(meta: dict[str, Any]) -> _Plan:
    tag = _check_tag(meta.get("tag", ""))
    inc = meta["include"]
    if tag == "counting":
        return _Plan(tag, ((inc[0]["class"], None),) * int(inc[0]["count"]))
    if tag == "position":
        return _Plan(tag, ((inc[1]["class"], inc[1].get("color")), (inc[0]["class"], inc[0].get("color"))),
                     inc[1]["position"][0])
    return _Plan(tag, tuple((c["class"], c.get("color")) for c in inc))


def scene_for_metadata(spec: SceneSpec, metadata: dict[str, Any], seed: int, index: int) -> Scene:
    """Render a scene for a given GenEval record (e.g. a reference image for an eval prompt).

    Deterministic in (seed, prompt, index) and independent of the three split streams.
    """
    plan = _plan_from_metadata(metadata)
    if not spec.min_objects <= len(plan.objects) <= spec.max_objects:
        spec = SceneSpec(spec.size, 1, 4)  # the prompt decides how many objects, not the spec
    rng = _stream_rng(seed, _PROMPT_STREAM, index, _caption_hash(_caption(plan)) & 0xFFFFFFFF)
    return _render(rng, spec, plan)


def render_batch(spec: SceneSpec, seed: int, split: str, start: int, count: int
                 ) -> tuple[np.ndarray, list[str], list[dict[str, Any]], np.ndarray]:
    """Samples start..start+count-1 of a stream.

    Returns images float32 (count, H, W, 3) in [0, 1], captions, metadata records (GenEval
    fields plus "objects"), and object masks bool (count, H, W).
    """
    split_id(split)
    images = np.empty((count, spec.size, spec.size, 3), dtype=np.float32)
    masks = np.empty((count, spec.size, spec.size), dtype=bool)
    captions, metas = [], []
    for i in range(count):
        scene = sample_scene(spec, seed, split, start + i)
        images[i], masks[i] = scene.image, scene.mask
        captions.append(scene.caption)
        metas.append(scene.metadata)
    return images, captions, metas, masks
