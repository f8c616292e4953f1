"""A prepared training cache (written by `ecdit prepare`, read as `data.source=prepared`).

Layout of CACHE_DIR:

    manifest.json              format, source, image size, space, encoders (+ fingerprints), totals
    shard-000000.json          the shard's keys, captions and skip counts; written last (it seals the shard)
    shard-000000.pixels.npy    uint8 (N, H, W, C)                       pixel space
    shard-000000.latents.npy   float16 (N, c, h, w), scaled latents      latent space (a VAE was given)
    shard-000000.text.npy      float16 (N, L, W) per-token text states   when a text encoder was given
    shard-000000.mask.npy      bool (N, L) their padding mask

Shard k holds what survived of the collection's items k*S .. (k+1)*S - 1 (S = shard_size), so
shard boundaries do not depend on what was skipped and an interrupted prepare resumes at the
first shard without its `.json`. Arrays are memory-mapped when read: a cache larger than memory
trains as well as a small one. The text states are stored the way PixArt caches its T5
features, so training never runs the text encoder.

`PreparedSource` serves a cache through the source interface of sources.py (images in [-1, 1]
or scaled latents); a deterministic ~5% of the items (by a hash of their keys) is held out as
"val" (= "eval"), as for a folder source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ecdit_cli.data.sources import CaptionedImages, _stream_indices, _to_model_range, held_out_split
from ecdit_cli.errors import EcditError
from ecdit_cli.files import read_json

CACHE_FORMAT = "ecdit-prepared-cache"
CACHE_VERSION = 1
MANIFEST = "manifest.json"


def shard_name(k: int) -> str:
    return f"shard-{k:06d}"


def read_manifest(cache: str | Path) -> dict[str, Any]:
    cache = Path(cache)
    if not (cache / MANIFEST).is_file():
        raise EcditError(f"{cache} is not a prepared cache (no {MANIFEST}); write one with `ecdit prepare SOURCE -o {cache}`")
    manifest = read_json(cache / MANIFEST, what="prepared cache manifest")
    if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
        raise EcditError(f"{cache / MANIFEST} is not an ecdit cache of version {CACHE_VERSION} "
                         f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})")
    return manifest


class PreparedSource(CaptionedImages):
    """The images (or latents), captions and cached text states of a prepared cache."""

    kind = "prepared"

    def __init__(self, path: str | Path, seed: int = 0) -> None:
        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        if not m.get("complete"):
            raise EcditError(f"prepared cache {self.path} is incomplete: re-run the `ecdit prepare` that wrote it "
                             "to finish it (it resumes)")
        self.space = m["space"]
        if self.space == "latent":
            self.channels, self.image_size, _ = m["latent_shape"]
        else:
            self.channels, self.image_size = m["channels"], m["image_size"]
        self.has_text = m.get("text_encoder") is not None
        self.use_text_states = False  # set by the trainer once the run's encoder is checked against the cache's
        self.seed = seed
        self.keys: list[str] = []
        self.captions: list[str] = []
        self.arrays: dict[str, list[np.ndarray]] = {"x": [], "text": [], "mask": []}
        x_name = "latents" if self.space == "latent" else "pixels"
        for k in range(m["num_shards"]):
            meta = read_json(self.path / f"{shard_name(k)}.json", what="prepared shard")
            self.keys += meta["keys"]
            self.captions += meta["captions"]
            self.arrays["x"].append(self._load(k, x_name))
            if self.has_text:
                self.arrays["text"].append(self._load(k, "text"))
                self.arrays["mask"].append(self._load(k, "mask"))
        if not self.keys:
            raise EcditError(f"prepared cache {self.path} holds no images (every item was skipped)")
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays["x"]])
        self.train_indices, self.val_indices = held_out_split(self.keys)

    def _load(self, k: int, name: str) -> np.ndarray:
        path = self.path / f"{shard_name(k)}.{name}.npy"
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise EcditError(f"cannot read {path}: {err}") from None

    def __len__(self) -> int:
        return len(self.keys)

    def indices(self, split: str, start: int, count: int) -> np.ndarray:
        """Global item indices of samples start..start+count-1 of a split."""
        from ecdit_cli.data.scenes import split_id

        split_id(split)
        if split == "train":
            return self.train_indices[_stream_indices(len(self.train_indices), self.seed, start, count)]
        return self.val_indices[np.arange(start, start + count) % len(self.val_indices)]

    def gather(self, name: str, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` (global) of one array kind ("x", "text", "mask"), in the order given."""
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        parts = self.arrays[name]
        return np.stack([parts[s][i - self.offsets[s]] for s, i in zip(shard, idx)])

    def batch(self, split: str, start: int, count: int) -> tuple[np.ndarray, list[str]]:
        idx = self.indices(split, start, count)
        x = self.gather("x", idx)
        x = _to_model_range(x, 255.0) if self.space == "pixel" else np.ascontiguousarray(x, dtype=np.float32)
        return x, [self.captions[i] for i in idx]

    def text_states(self, split: str, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Cached per-token states (count, L, W) float32 and mask (count, L) of the same samples as `batch`."""
        idx = self.indices(split, start, count)
        return self.gather("text", idx).astype(np.float32), self.gather("mask", idx).astype(bool)



def cache_mismatches(manifest: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """What differs between a cache and what a run needs, one phrase each ('' when all match).

    `want` holds space, image_size / channels (pixel) or latent_shape + vae_fingerprint (latent),
    and, for a frozen text encoder, text_fingerprint and max_len (absent for a learned one)."""
    out = []
    if manifest["space"] != want["space"]:
        out.append(f"space {manifest['space']} in the cache vs model.space={want['space']}")
        return out
    if want["space"] == "pixel":
        if manifest["image_size"] != want["image_size"]:
            out.append(f"image size {manifest['image_size']} vs model.input_size={want['image_size']}")
        if manifest["channels"] != want["channels"]:
            out.append(f"channels {manifest['channels']} vs model.in_channels={want['channels']}")
    else:
        c, s, _ = manifest["latent_shape"]
        if c != want["latent_shape"][0]:
            out.append(f"latent channels {c} vs model.in_channels={want['latent_shape'][0]}")
        if s != want["latent_shape"][1]:
            out.append(f"latent side {s} ({manifest['image_size']}-px images) vs model.input_size={want['latent_shape'][1]}")
        if manifest["vae"]["fingerprint"] != want["vae_fingerprint"]:
            out.append(f"the VAE in model.vae_path is not the cache's ({manifest['vae']['path']})")
    enc = manifest.get("text_encoder")
    if enc is not None and "text_fingerprint" in want:
        if enc["fingerprint"] != want["text_fingerprint"]:
            out.append(f"the text encoder is not the cache's ({enc['path']})")
        if enc["max_len"] != want["max_len"]:
            out.append(f"text max_len {enc['max_len']} vs text.max_len={want['max_len']}")
    return out
