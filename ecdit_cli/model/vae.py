"""Latent diffusion: a frozen diffusers `AutoencoderKL` read from a local folder.

The DiT then denoises latents instead of pixels (LDM, Rombach et al. 2022; PixArt, SD3 and
EC-DiT itself train this way). The latent convention is diffusers' own for SD3 / FLUX:

    z = (mean(E(x)) - shift_factor) * scaling_factor        x = D(z / scaling_factor + shift_factor)

with both factors read from the VAE's `config.json` (`shift_factor` absent or null means 0, as
for SD 1.x/2.x and SDXL), so latents have roughly unit variance. We encode to the posterior
mean, not a sample: the encoding is then a pure function of the image, so a latent cached by
`ecdit prepare` equals one computed on the fly (to float16 rounding), and a resumed run
repeats an uninterrupted one.

Images are (N, C, H, W) in [-1, 1] on both sides (the DiT's pixel convention and the VAE's).
The spatial downsampling is 2^(levels - 1) for `len(block_out_channels)` levels, as diffusers'
pipelines compute `vae_scale_factor`.

`LatentSource` wraps a pixel source (the built-in scenes, Fashion-MNIST, a folder) so that
training encodes on the fly: GenEval still scores the decoded images of a latent scenes run.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ecdit_cli.errors import EcditError
from ecdit_cli.files import fingerprint

ENCODE_CHUNK = 64  # images per VAE forward when a source encodes a batch (bounds activation memory)


def require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise EcditError("model.space=latent needs diffusers: pip install -e '.[latent]'") from None
    return diffusers


class VAE:
    """A frozen AutoencoderKL with its scaling and shift factors; encode/decode in model range."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise EcditError(f"VAE folder {folder} has no config.json: expected a diffusers AutoencoderKL folder "
                             "(written by save_pretrained)")
        diffusers = require_diffusers()
        try:
            model = diffusers.AutoencoderKL.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise EcditError(f"cannot load an AutoencoderKL from {folder}: {str(err).splitlines()[0]}") from None
        self.model = model.to(device).eval().requires_grad_(False)
        c = self.model.config
        self.path = str(folder.resolve())
        self.device = torch.device(device)
        self.scaling_factor = float(c.scaling_factor)
        self.shift_factor = float(c.get("shift_factor") or 0.0)
        self.latent_channels = int(c.latent_channels)
        self.image_channels = int(c.in_channels)
        self.downsample = 2 ** (len(c.block_out_channels) - 1)
        self.fingerprint = fingerprint(folder)

    def identity(self) -> dict[str, Any]:
        """What a prepared cache records about the VAE (and a run checks against it)."""
        return {"path": self.path, "fingerprint": self.fingerprint, "class": type(self.model).__name__,
                "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "latent_channels": self.latent_channels, "downsample": self.downsample}

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.downsample:
            raise EcditError(f"image size {image_size} is not a multiple of the VAE's downsampling ({self.downsample})")
        side = image_size // self.downsample
        return self.latent_channels, side, side

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (N, C, H, W) in [-1, 1] -> scaled latents (N, c, H/d, W/d) float32."""
        x = images.to(self.device, self.model.dtype)
        mean = self.model.encode(x).latent_dist.mean
        return ((mean.float() - self.shift_factor) * self.scaling_factor)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (N, c, h, w) -> images (N, C, h*d, w*d) float32 in about [-1, 1]."""
        z = latents.to(self.device, self.model.dtype) / self.scaling_factor + self.shift_factor
        return self.model.decode(z).sample.float()

    def encode_numpy(self, images: np.ndarray) -> np.ndarray:
        """Images (N, C, H, W) float32 in [-1, 1] -> latents float32, in chunks of ENCODE_CHUNK."""
        out = [self.encode(torch.from_numpy(images[i:i + ENCODE_CHUNK])).cpu().numpy()
               for i in range(0, len(images), ENCODE_CHUNK)]
        return np.concatenate(out) if out else np.zeros((0, self.latent_channels, 0, 0), np.float32)


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str) -> VAE:
    return VAE(path, device)


def load_vae(path: str | Path, device: str = "cpu") -> VAE:
    """One shared, frozen VAE per (folder, device): training data, sampling and evaluation reuse it."""
    if not str(path):
        raise EcditError("model.vae_path is empty: model.space=latent needs a local AutoencoderKL folder")
    return _load(str(Path(path).resolve()), str(device))


class LatentSource:
    """A pixel source seen through a VAE: `batch` and `val_set` return scaled latents.

    The wrapped source renders or reads images at the VAE's input size (latent side x
    downsampling); captions, vocabulary and the sample order are the wrapped source's.
    """

    def __init__(self, pixels: Any, vae: VAE) -> None:
        self.pixels, self.vae = pixels, vae
        self.kind = pixels.kind
        self.channels, self.image_size, _ = vae.latent_shape(pixels.image_size)

    def batch(self, split: str, start: int, count: int) -> tuple[np.ndarray, list[str]]:
        images, captions = self.pixels.batch(split, start, count)
        return self.vae.encode_numpy(images), captions

    def val_set(self, count: int) -> tuple[np.ndarray, list[str]]:
        images, captions = self.pixels.val_set(count)
        return self.vae.encode_numpy(images), captions

    def vocabulary(self) -> list[str]:
        return self.pixels.vocabulary()

    def object_masks(self, split: str, start: int, count: int) -> np.ndarray | None:
        return self.pixels.object_masks(split, start, count)  # pixel resolution, not latent cells
