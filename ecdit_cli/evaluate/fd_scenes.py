"""FD-scenes: a Fréchet distance on the features of a small network trained on the built-in scenes.

Not FID. FID needs Inception weights, which cannot be downloaded here and would measure the
wrong thing on 32x32 shape scenes anyway (docs/data.md). Instead a small CNN (`SceneNet`) learns,
from rendered scenes alone, a dense 8x8 map of what a scene holds: which palette colours cover
each cell, and in the cell holding an object's centre, that object's shape and colour (dense
targets: a global "which objects are present" target left the network at its prior within
the training budget). Its trunk, average-pooled to 2x2 cells (128 numbers), is the feature
space; FD-scenes is the Fréchet distance between Gaussians fitted to the features of generated
images and of rendered scenes for the same prompts (Heusel et al. 2017):

    FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))

Unlike GenEval's pass/fail checks it moves continuously, so it separates models that all still
score 0 on GenEval. Its value depends on the network and on the number of images (FD is biased
upwards for small samples): compare runs at the same image count and size only. `fd_scenes`
also returns the floor, the same distance between two independent rendered sets.

The network trains on first use (about a minute on 2 CPU cores) from a fixed seed and is cached
per image size in `$ECDIT_CACHE_DIR` (default `~/.cache/ecdit`).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ecdit_cli.errors import EcditError

NET_VERSION = 1  # bump when the architecture or the recipe changes (invalidates cached networks)
GRID = 8  # target map cells per side
WIDTH = 16
TRAIN_IMAGES = 12_000
TRAIN_STEPS = 1200
BATCH = 64
LR = 2e-3
SEED = 0


def cache_dir() -> Path:
    return Path(os.environ.get("ECDIT_CACHE_DIR") or Path.home() / ".cache" / "ecdit")


def downsamplings(size: int) -> int:
    """Stride-2 blocks that take a side of `size` to the GRID x GRID target map (2 at 32 px)."""
    n = (size // GRID).bit_length() - 1
    if size % GRID or size != GRID << n or not 16 <= size <= 64:
        raise EcditError(f"FD-scenes needs an image side of 16, 32 or 64 (the {GRID}x{GRID} target map "
                         f"times a power of 2), got {size}")
    return n


class SceneNet(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> a (B, 2W, GRID, GRID) map with three 1x1 heads.

    The trunk has five 3x3 conv blocks; as many of them as `downsamplings(size)` asks stride by 2
    (the 2nd and 4th at 32 px, only the 2nd at 16 px), so every size maps to the same grid."""

    def __init__(self, num_colors: int, num_shapes: int, width: int = WIDTH, size: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GELU())

        w, down = width, downsamplings(size)
        strides = [1, 2, 1, 2 if down >= 2 else 1, 2 if down >= 3 else 1]
        self.trunk = nn.Sequential(block(3, w, strides[0]), block(w, w, strides[1]), block(w, 2 * w, strides[2]),
                                   block(2 * w, 2 * w, strides[3]), block(2 * w, 2 * w, strides[4]))
        self.occupancy = nn.Conv2d(2 * w, num_colors, 1)  # per colour: covers this cell?
        self.shape = nn.Conv2d(2 * w, 1 + num_shapes, 1)  # no object centre here, or its shape
        self.color = nn.Conv2d(2 * w, num_colors, 1)  # the colour of the object centred here

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.trunk(x_BCHW * 2 - 1)
        return self.occupancy(h), self.shape(h), self.color(h)

    def features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, 2W x 2 x 2) = (B, 128) at the default width."""
        return F.adaptive_avg_pool2d(self.trunk(x_BCHW * 2 - 1), 2).flatten(1)


def targets(images: np.ndarray, metas: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per GRID x GRID cell: colour occupancy (B, K, G, G) float, centre shape (B, G, G) (0 =
    none), centre colour (B, G, G) (-100 = ignored where no centre)."""
    from ecdit_cli.data.scenes import COLORS, PALETTE, SHAPES

    B, H, W, _ = images.shape
    cell = H // GRID
    cover = np.stack([np.abs(images - np.asarray(PALETTE[c], dtype=np.float32)).max(-1) < 0.1 for c in COLORS], 1)
    occ = cover.reshape(B, len(COLORS), GRID, cell, GRID, cell).mean(axis=(3, 5)) > 0.1
    shape = np.zeros((B, GRID, GRID), dtype=np.int64)
    color = np.full((B, GRID, GRID), -100, dtype=np.int64)
    for i, meta in enumerate(metas):
        for o in meta["objects"]:
            gx, gy = (min(GRID - 1, int(v // cell)) for v in o["centre"])
            shape[i, gy, gx] = 1 + SHAPES.index(o["class"])
            color[i, gy, gx] = COLORS.index(o["color"])
    return torch.from_numpy(occ.astype(np.float32)), torch.from_numpy(shape), torch.from_numpy(color)


@dataclass
class TrainedNet:
    net: SceneNet
    size: int
    val_shape_acc: float  # held-out scenes: shape right in the cells holding an object's centre
    val_color_acc: float  # ... and colour right there
    val_occupancy_acc: float  # per (cell, colour)


def _loss(net: SceneNet, x: torch.Tensor, occ: torch.Tensor, shape: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    o, s, c = net(x)
    # x6: the occupancy BCE averages over 6 colours per cell; this puts it on the scale of one CE.
    return 6 * F.binary_cross_entropy_with_logits(o, occ) + F.cross_entropy(s, shape) + F.cross_entropy(c, color)


def train_scene_net(size: int, images: int | None = None, steps: int | None = None, seed: int = SEED,
                    on_progress: Callable[[int, int], None] | None = None) -> TrainedNet:
    """Train SceneNet on rendered training scenes of side `size`; deterministic for a seed.

    images / steps default to TRAIN_IMAGES / TRAIN_STEPS, read at call time (tests shrink them).
    """
    from ecdit_cli.data.scenes import COLORS, SHAPES, SceneSpec, render_batch

    images = TRAIN_IMAGES if images is None else images
    steps = TRAIN_STEPS if steps is None else steps

    downsamplings(size)  # a clear error for a side the network cannot map to its grid
    spec = SceneSpec(size)
    x, _, metas, _ = render_batch(spec, seed, "train", 0, images)
    vx, _, vmetas, _ = render_batch(spec, seed, "val", 0, 1000)
    X = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    occ, shape, color = targets(x, metas)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = SceneNet(len(COLORS), len(SHAPES), size=size)
    opt = torch.optim.AdamW(net.parameters(), lr=LR)
    net.train()
    for step in range(steps):
        idx = torch.randint(0, images, (BATCH,), generator=gen)
        loss = _loss(net, X[idx], occ[idx], shape[idx], color[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_progress is not None:
            on_progress(step + 1, steps)
    net.eval()
    with torch.no_grad():
        o, s, c = net(torch.from_numpy(vx).permute(0, 3, 1, 2).contiguous())
    v_occ, v_shape, v_color = targets(vx, vmetas)
    centre = v_shape > 0
    return TrainedNet(net, size, float((s.argmax(1)[centre] == v_shape[centre]).float().mean()),
                      float((c.argmax(1)[centre] == v_color[centre]).float().mean()),
                      float(((o > 0).float() == v_occ).float().mean()))


def _cache_path(size: int) -> Path:
    return cache_dir() / f"scene_net_v{NET_VERSION}_{size}px_seed{SEED}.pt"


def load_scene_net(size: int, on_progress: Callable[[int, int], None] | None = None) -> TrainedNet:
    """The cached network for `size`; trained (and cached, where the cache is writable) on first use."""
    from ecdit_cli.data.scenes import COLORS, SHAPES
    from ecdit_cli.files import atomic_write_bytes

    path = _cache_path(size)
    accs = ("val_shape_acc", "val_color_acc", "val_occupancy_acc")
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            net = SceneNet(len(COLORS), len(SHAPES), size=size)
            net.load_state_dict(blob["state_dict"])
            net.eval()
            return TrainedNet(net, size, *(float(blob[k]) for k in accs))
        except Exception:  # noqa: BLE001 - a damaged cache entry is retrained, never fatal
            pass
    trained = train_scene_net(size, on_progress=on_progress)
    buf = io.BytesIO()
    torch.save({"state_dict": trained.net.state_dict(), **{k: getattr(trained, k) for k in accs}}, buf)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except (OSError, EcditError):
        pass  # an unwritable cache only costs a retrain next time
    return trained


@torch.no_grad()
def scene_features(net: SceneNet, images_BHWC: np.ndarray, batch: int = 512) -> np.ndarray:
    """(B, H, W, 3) images in [0, 1] -> (B, 128) float64 features."""
    x = torch.from_numpy(np.ascontiguousarray(images_BHWC, dtype=np.float32)).permute(0, 3, 1, 2)
    return torch.cat([net.features(x[i:i + batch]) for i in range(0, len(x), batch)]).double().numpy()


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (N >= 2 each)."""
    from scipy import linalg

    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise EcditError(f"feature sets must be (N, D) with the same D; got {feats_a.shape} and {feats_b.shape}")
    if min(len(feats_a), len(feats_b)) < 2:
        raise EcditError("a Fréchet distance needs at least 2 images per set")
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(feats_a, rowvar=False)), np.atleast_2d(np.cov(feats_b, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular products are handled below
        covmean = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():
            # Fewer images than dimensions, or constant features: regularise as pytorch-fid does.
            eps = np.eye(len(cov_a)) * 1e-6
            covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    d = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(np.real(covmean)))
    return max(d, 0.0)  # tiny negative values are round-off


def reference_images(records: list[dict[str, Any]], n: int, size: int, seed: int) -> np.ndarray:
    """(P, n, H, W, 3) rendered scenes for the prompt records (n per prompt), in [0, 1]."""
    from ecdit_cli.data.scenes import SceneSpec, scene_for_metadata

    spec = SceneSpec(size)
    return np.stack([np.stack([scene_for_metadata(spec, r, seed, j).image for j in range(n)]) for r in records])


REFERENCE_SEED, FLOOR_SEED = 10_000, 20_000  # rendered sets, independent of training and eval noise


def fd_scenes(net: SceneNet, generated: np.ndarray, records: list[dict[str, Any]]) -> dict[str, float]:
    """FD-scenes of generated images (P, N, H, W, 3) against N rendered scenes per prompt, and the
    floor: the distance of another N rendered scenes per prompt to the same reference."""
    P, N, H = generated.shape[:3]
    if P != len(records):
        raise EcditError(f"{P} prompts of images but {len(records)} prompt records")
    ref, other = (reference_images(records, N, H, s) for s in (REFERENCE_SEED, FLOOR_SEED))
    f_gen, f_ref, f_other = (scene_features(net, a.reshape(P * N, *a.shape[2:])) for a in (generated, ref, other))
    return {"fd_scenes": frechet_distance(f_gen, f_ref), "fd_scenes_floor": frechet_distance(f_other, f_ref)}
