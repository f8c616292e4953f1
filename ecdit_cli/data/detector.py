"""An exact, deterministic object detector for the rendered scenes, and GenEval's image check.

GenEval scores an image with a Mask2Former detector plus CLIP colour classification
(djghosh13/geneval, evaluation/evaluate_images.py). On our procedurally rendered scenes a
hand-written detector is exact and deterministic instead:

1. colour: each pixel is explained as a scaled palette colour over the black background,
   x ~ a * c_k; the colour k with the smallest residual wins and the pixel is foreground when
   a >= 0.5 (a is the coverage, so anti-aliased edges keep their colour);
2. objects: connected components of each colour, tiny ones dropped as noise;
3. shape: each component is compared with templates of every shape drawn by the renderer's own
   `shape_coverage`, sized from the component's coverage mass and placed at its centroid (at a
   few scales, sharp and slightly blurred: at 16 px a 0.5 px blur otherwise turns 4 px squares
   into circles); the smallest normalised squared error wins, and its complement is the
   detection's confidence (GenEval orders a class's detections by detector score);
4. boxes from the component extent, centres from the coverage-weighted centroid.

`evaluate` applies GenEval's rules to detections; `check` = `evaluate(detect(image))`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ecdit_cli.data.scenes import COLORS, PALETTE, SHAPES, relations, shape_coverage
from ecdit_cli.errors import EcditError

_PALETTE_KC = np.asarray([PALETTE[c] for c in COLORS], dtype=np.float32)  # (K, 3)
_NORM2_K = (_PALETTE_KC**2).sum(axis=1)  # (K,)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # triangle flanks touch only diagonally
_SCALES = (0.9, 1.0, 1.1)  # template sizes around the area-based estimate
_BLURS = (0.6,)  # Gaussian sigmas (pixels) of the extra blurred templates
_PAD = 2  # pixels of context around a component for template matching


@dataclass(frozen=True)
class Detection:
    """One detected object. `cls` is GenEval's "class" (a shape name)."""

    cls: str
    color: str
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, exclusive upper edges
    centre: tuple[float, float]  # (x, y) coverage-weighted centroid, pixels
    area: int  # foreground pixels in the component
    confidence: float  # 1 - normalised template error, in [0, 1]

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.cls, "color": self.color, "bbox": list(self.bbox),
                "centre": list(self.centre), "area": self.area, "confidence": self.confidence}


def as_float_image(image: np.ndarray) -> np.ndarray:
    """An (H, W, 3) image as float32 in [0, 1]; uint8 is divided by 255, floats are clipped."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise EcditError(f"expected an RGB image of shape (H, W, 3), got shape {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def classify_pixels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the palette index k (H, W) and every colour's coverage a_k (H, W, K) >= 0."""
    x = as_float_image(image)
    dots = x @ _PALETTE_KC.T  # (H, W, K)
    a = np.maximum(dots / _NORM2_K, 0.0)
    # Residual of the least-squares fit x ~ a * c_k: |x|^2 - a * (2 x.c_k - a |c_k|^2).
    resid = (x * x).sum(-1, keepdims=True) - a * (2 * dots - a * _NORM2_K)
    return resid.argmin(-1), a


def _fit_shape(obs: np.ndarray) -> tuple[str, float]:
    """Best shape for a coverage window `obs` (h, w) and its normalised error."""
    h, w = obs.shape
    mass = float(obs.sum())
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = float((obs * xs).sum()) / mass, float((obs * ys).sum()) / mass
    energy = float((obs * obs).sum())
    # Sizes that give each shape the observed area; a triangle's centroid sits s/6 below its
    # box centre (two thirds of the way down from the apex).
    hyp = {"circle": (2 * np.sqrt(mass / np.pi), 0.0), "square": (np.sqrt(mass), 0.0),
           "triangle": (np.sqrt(2 * mass), 1 / 6)}
    best, best_err = SHAPES[0], np.inf
    for shape in SHAPES:
        size, shift = hyp[shape]
        sizes = size * np.asarray(_SCALES)
        tmpl = shape_coverage(shape, np.full(len(_SCALES), cx), cy - shift * sizes, sizes, h, w)  # (S, h, w)
        tmpl = np.concatenate([tmpl] + [ndimage.gaussian_filter(tmpl, (0, b, b), mode="constant") for b in _BLURS])
        err = float(((obs - tmpl) ** 2).sum(axis=(1, 2)).min()) / energy
        if err < best_err:
            best, best_err = shape, err
    return best, best_err


def detect(image: np.ndarray, min_area: int | None = None, max_error: float = 0.5) -> list[Detection]:
    """Objects in an (H, W, 3) image in [0, 1] (or uint8), ordered by colour then position.

    min_area: components with fewer foreground pixels are noise (default: H*W/200, at least 3).
    max_error: components whose best template leaves more than this normalised squared error are
    not one of our shapes and are dropped (lenient on purpose: on clean renders the right shape
    scores < 0.001 and the best wrong one > 0.03).
    """
    kmap, a = classify_pixels(image)
    height, width = kmap.shape
    min_area = max(3, round(height * width / 200)) if min_area is None else min_area
    fg = np.take_along_axis(a, kmap[..., None], -1)[..., 0] >= 0.5
    out: list[Detection] = []
    for k in np.unique(kmap[fg]):
        same = kmap == k
        labels, _ = ndimage.label(fg & same, structure=_EIGHT_CONNECTED)
        areas = np.bincount(labels.ravel())
        for idx, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None or areas[idx] < min_area:
                continue
            y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            wy0, wy1 = max(0, y0 - _PAD), min(height, y1 + _PAD)
            wx0, wx1 = max(0, x0 - _PAD), min(width, x1 + _PAD)
            win = (slice(wy0, wy1), slice(wx0, wx1))
            # Coverage of this colour, with every other object (any colour) blanked out.
            lab_w = labels[win]
            keep = same[win] & ~(fg[win] & (lab_w != idx))
            obs = np.where(keep, np.minimum(a[win][..., k], 1.0), 0.0).astype(np.float32)
            shape, err = _fit_shape(obs)
            if err > max_error:
                continue
            comp = np.where(lab_w == idx, obs, 0.0)
            ys, xs = np.mgrid[wy0:wy1, wx0:wx1] + 0.5
            m = float(comp.sum())
            out.append(Detection(
                cls=shape, color=COLORS[int(k)], bbox=(int(x0), int(y0), int(x1), int(y1)),
                centre=(float((comp * xs).sum()) / m, float((comp * ys).sum()) / m),
                area=int(areas[idx]), confidence=float(max(0.0, 1.0 - err)),
            ))
    return out


def evaluate(detections: Sequence[Detection], metadata: dict[str, Any]) -> tuple[bool, str]:
    """GenEval's `evaluate` on our detections: (correct, reason; reasons joined by "; ").

    Include clauses are ANDed: at least `count` detections of the class; the colour, if given,
    on at least `count` of the `count` most confident ones; the relation, if given, between each
    of those and every object matched by the referenced include clause. Exclude clauses are
    ORed: the image fails if any holds (counting's {class, count + 1} makes the count exact).
    As in GenEval, objects of classes the prompt does not mention do not fail an image: our
    training scenes have no distractors, but the benchmark's semantics are kept on purpose.
    """
    by_class: dict[str, list[Detection]] = {}
    for det in sorted(detections, key=lambda d: -d.confidence):
        by_class.setdefault(det.cls, []).append(det)
    correct, reasons = True, []
    matched: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        cls, count = req["class"], int(req["count"])
        found = by_class.get(cls, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        elif "color" in req:
            colors = [d.color for d in found]
            if colors.count(req["color"]) < count:
                ok = False
                seen = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                reasons.append(f"expected {req['color']} {cls}>={count}, found {seen}")
        if ok and "position" in req:
            rel, target = req["position"][0], int(req["position"][1])
            targets = matched[target] if target < len(matched) else None
            if targets is None:
                ok = False
                reasons.append(f"no target for {cls} to be {rel}")
            else:
                for det in found:
                    bad = [relations(det.bbox, t.bbox) for t in targets if rel not in relations(det.bbox, t.bbox)]
                    if bad:
                        ok = False
                        reasons.append(f"expected {cls} {rel} target, found {' and '.join(sorted(bad[0])) or 'no relation'}")
                        break
        correct &= ok
        matched.append(found if ok else None)
    for req in metadata.get("exclude", []):
        n = len(by_class.get(req["class"], []))
        if n >= int(req["count"]):
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, "; ".join(reasons)


def check(image: np.ndarray, metadata: dict[str, Any]) -> tuple[bool, str]:
    """Whether an image satisfies a GenEval record, by `detect` then `evaluate`."""
    return evaluate(detect(image), metadata)
