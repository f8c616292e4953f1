"""An exact, deterministic object detector for the rendered scenes, and GenEval's image check.

PLACEHOLDER DOCSTRING (rewritten after calibration).
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

SHAPE_ERROR_SCALE = 0.15
COLOUR_ERROR_SCALE = 0.03
MIN_CONFIDENCE = 0.4
_MAX_Z = 1 / MIN_CONFIDENCE - 1
SIDE_RANGE = (0.15, 0.5625)
FOREGROUND_NORM = 0.4
MAX_UNEXPLAINED = 0.02


@dataclass(frozen=True)
class Detection:
    """One detected object. `cls` is GenEval's "class" (a shape name)."""

    cls: str
    color: str
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, exclusive upper edges
    centre: tuple[float, float]  # (x, y) coverage-weighted centroid, pixels
    area: int  # foreground pixels in the component
    confidence: float  # 1 / (1 + z), z = the larger of the two calibrated errors below
    shape_error: float = 0.0  # normalised squared error of the best template (coverage space)
    colour_error: float = 0.0  # share of the component's energy its palette colour leaves unexplained
    side: float = 0.0  # side of the best template, pixels

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.cls, "color": self.color, "bbox": list(self.bbox),
                "centre": list(self.centre), "area": self.area, "confidence": self.confidence,
                "shape_error": self.shape_error, "colour_error": self.colour_error, "side": self.side}


def as_float_image(image: np.ndarray) -> np.ndarray:
    """An (H, W, 3) image as float32 in [0, 1]; uint8 is divided by 255, floats are clipped."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise EcditError(f"expected an RGB image of shape (H, W, 3), got shape {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def _classify(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Palette index k (H, W), coverages a_k (H, W, K) and the winning residual (H, W)."""
    dots = x @ _PALETTE_KC.T  # (H, W, K)
    a = np.maximum(dots / _NORM2_K, 0.0)
    # Residual of the least-squares fit x ~ a * c_k: |x|^2 - a * (2 x.c_k - a |c_k|^2).
    resid = (x * x).sum(-1, keepdims=True) - a * (2 * dots - a * _NORM2_K)
    kmap = resid.argmin(-1)
    return kmap, a, np.maximum(np.take_along_axis(resid, kmap[..., None], -1)[..., 0], 0.0)


def classify_pixels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the palette index k (H, W) and every colour's coverage a_k (H, W, K) >= 0."""
    kmap, a, _ = _classify(as_float_image(image))
    return kmap, a


def _fit_shape(obs: np.ndarray) -> tuple[str, float, float]:
    """Best shape for a coverage window `obs` (h, w), its normalised error and its side (pixels)."""
    h, w = obs.shape
    mass = float(obs.sum())
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = float((obs * xs).sum()) / mass, float((obs * ys).sum()) / mass
    energy = float((obs * obs).sum())
    # Sizes that give each shape the observed area; a triangle's centroid sits s/6 below its
    # box centre (two thirds of the way down from the apex).
    hyp = {"circle": (2 * np.sqrt(mass / np.pi), 0.0), "square": (np.sqrt(mass), 0.0),
           "triangle": (np.sqrt(2 * mass), 1 / 6)}
    best, best_err, best_side = SHAPES[0], np.inf, 0.0
    for shape in SHAPES:
        size, shift = hyp[shape]
        sizes = size * np.asarray(_SCALES)
        tmpl = shape_coverage(shape, np.full(len(_SCALES), cx), cy - shift * sizes, sizes, h, w)  # (S, h, w)
        tmpl = np.concatenate([tmpl] + [ndimage.gaussian_filter(tmpl, (0, b, b), mode="constant") for b in _BLURS])
        errs = ((obs - tmpl) ** 2).sum(axis=(1, 2)) / energy
        i = int(errs.argmin())
        if errs[i] < best_err:
            best, best_err, best_side = shape, float(errs[i]), float(sizes[i % len(_SCALES)])
    return best, best_err, best_side


def _confidence(shape_error: float, colour_error: float) -> float:
    z = max(shape_error / SHAPE_ERROR_SCALE, colour_error / COLOUR_ERROR_SCALE)
    return 1.0 / (1.0 + z)


def _candidates(x: np.ndarray, min_area: int, prefilter: bool = True) -> list[Detection]:
    """Components of at least min_area pixels as Detections, before the acceptance test.

    prefilter: skip the template fit of components whose colour error or possible template
    sizes already rule them out (False keeps every component, for calibration).
    """
    kmap, a, resid = _classify(x)
    height, width = kmap.shape
    energy = (x * x).sum(-1)
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
            lab_w = labels[win]
            in_comp = lab_w == idx
            colour_error = float(resid[win][in_comp].sum() / max(float(energy[win][in_comp].sum()), 1e-12))
            # Coverage of this colour, with every other object (any colour) blanked out.
            keep = same[win] & ~(fg[win] & ~in_comp)
            obs = np.where(keep, np.minimum(a[win][..., k], 1.0), 0.0).astype(np.float32)
            if prefilter and (colour_error > _MAX_Z * COLOUR_ERROR_SCALE or not _side_possible(obs, height, width)):
                continue
            shape, shape_error, side = _fit_shape(obs)
            comp = np.where(in_comp, obs, 0.0)
            ys, xs = np.mgrid[wy0:wy1, wx0:wx1] + 0.5
            m = float(comp.sum())
            out.append(Detection(
                cls=shape, color=COLORS[int(k)], bbox=(int(x0), int(y0), int(x1), int(y1)),
                centre=(float((comp * xs).sum()) / m, float((comp * ys).sum()) / m),
                area=int(areas[idx]), confidence=_confidence(shape_error, colour_error),
                shape_error=shape_error, colour_error=colour_error, side=side,
            ))
    return out


def _side_possible(obs: np.ndarray, height: int, width: int) -> bool:
    # Template sides run from 0.9 x the square's area-based size sqrt(m) (the smallest of the
    # three hypotheses) to 1.1 x the triangle's sqrt(2 m) (the largest).
    mass = float(obs.sum())
    lo, hi = (r * np.sqrt(height * width) for r in SIDE_RANGE)
    return min(_SCALES) * np.sqrt(mass) <= hi and max(_SCALES) * np.sqrt(2 * mass) >= lo


def _default_min_area(height: int, width: int) -> int:
    return max(3, round(height * width / 64))


def _accepted(det: Detection, height: int, width: int, max_error: float) -> bool:
    side = det.side / np.sqrt(height * width)
    return (det.confidence >= MIN_CONFIDENCE and det.shape_error <= max_error
            and SIDE_RANGE[0] <= side <= SIDE_RANGE[1])


def _unexplained(x: np.ndarray, detections: Sequence[Detection]) -> float:
    height, width = x.shape[:2]
    fore = np.sqrt((x * x).sum(-1)) >= FOREGROUND_NORM
    for det in detections:
        x0, y0, x1, y1 = det.bbox
        fore[max(0, y0 - _PAD):y1 + _PAD, max(0, x0 - _PAD):x1 + _PAD] = False
    return float(fore.sum()) / (height * width)


@dataclass(frozen=True)
class Reading:
    """What the detector reads in one image: accepted detections and the unexplained share."""

    detections: list[Detection]
    unexplained: float  # share of the image's pixels: foreground-like, outside every detection

    @property
    def readable(self) -> bool:
        return self.unexplained <= MAX_UNEXPLAINED

    def verdict(self, metadata: dict[str, Any]) -> tuple[bool, str]:
        """GenEval's check of this reading against a record; unreadable images fail every record."""
        if not self.readable:
            return False, f"unreadable: {self.unexplained:.0%} of the image is unexplained foreground"
        return evaluate(self.detections, metadata)


def read_scene(image: np.ndarray, min_area: int | None = None, max_error: float = np.inf) -> Reading:
    """Detections in an (H, W, 3) image and the share of its foreground they leave unexplained."""
    x = as_float_image(image)
    height, width = x.shape[:2]
    min_area = _default_min_area(height, width) if min_area is None else min_area
    dets = [d for d in _candidates(x, min_area) if _accepted(d, height, width, max_error)]
    return Reading(dets, _unexplained(x, dets))


def detect(image: np.ndarray, min_area: int | None = None, max_error: float = np.inf) -> list[Detection]:
    """Objects in an (H, W, 3) image in [0, 1] (or uint8), ordered by colour then position."""
    return read_scene(image, min_area, max_error).detections


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
    """Whether an image satisfies a GenEval record, by `read_scene` then `Reading.verdict`."""
    return read_scene(image).verdict(metadata)
