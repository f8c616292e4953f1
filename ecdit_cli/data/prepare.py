"""`ecdit prepare`: an image-text collection -> a sharded training cache (layout in prepared.py).

Each item is decoded and fitted to `image_size` (shorter side resized, centre crop, as a folder
source does); an item that cannot be used is skipped and counted by reason (unreadable, too
small, empty caption), never fatal. Kept images are stored as uint8 pixels, or, when a VAE is
given, as float16 scaled latents; with a text encoder the captions' per-token states and masks
are stored too (float16), as PixArt caches its T5 features.

Encoders are passed in (the model layer builds them): `image_encoder.encode_numpy(images)` maps
(N, C, H, W) float32 in [-1, 1] to latents, `text_encoder.encode_numpy(captions)` to (states,
mask); both have `identity()` (path, fingerprint, ...) for the manifest.

Resuming: shard k covers items k*S .. (k+1)*S - 1 and is sealed by its `.json`, written last
and atomically; a re-run with the same settings keeps the sealed shards and starts at the first
unsealed one, so an interrupted prepare ends with the same files as an uninterrupted one. A
re-run with other settings (or a changed collection) is refused, naming the difference.
"""

from __future__ import annotations

import io
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecdit_cli.data.collection import EMPTY_CAPTION, TOO_SMALL, UNREADABLE, decode, open_collection
from ecdit_cli.data.prepared import CACHE_FORMAT, CACHE_VERSION, MANIFEST, shard_name
from ecdit_cli.errors import EcditError
from ecdit_cli.files import atomic_write_bytes, atomic_write_json, read_json

SKIP_REASONS = (UNREADABLE, TOO_SMALL, EMPTY_CAPTION)


@dataclass
class PrepareOptions:
    image_size: int = 32  # side of the stored images (pixels) before any VAE
    channels: int = 3  # 3 (RGB) or 1 (grey); a VAE needs its own input channels
    min_size: int | None = None  # shorter sides below this are skipped as too small; None = image_size
    shard_size: int = 1000  # collection items per shard
    batch_size: int = 64  # images per encoder forward

    def __post_init__(self) -> None:
        if self.min_size is None:
            self.min_size = self.image_size
        for key in ("image_size", "shard_size", "batch_size"):
            if getattr(self, key) < 1:
                raise EcditError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.channels not in (1, 3):
            raise EcditError(f"--channels must be 1 or 3, got {self.channels}")
        if self.min_size < 0:
            raise EcditError(f"--min-size must be >= 0, got {self.min_size}")


@dataclass
class PrepareSummary:
    cache: str
    source_kind: str
    items: int  # items in the collection
    written: int  # images in the cache
    skipped: dict[str, int] = field(default_factory=dict)  # by reason
    shards: int = 0
    resumed_shards: int = 0  # shards found sealed at the start (0: a fresh prepare)
    seconds: float = 0.0  # this invocation's wall time
    images_per_s: float = 0.0  # items processed by this invocation per second of it
    space: str = "pixel"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _settings(collection, options: PrepareOptions, image_encoder, text_encoder) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION,
        "source": {"path": str(Path(collection.path).resolve()), "kind": collection.kind, "items": len(collection),
                   "fingerprint": collection.fingerprint()},
        "image_size": options.image_size, "channels": options.channels, "min_size": options.min_size,
        "shard_size": options.shard_size, "space": "pixel", "latent_shape": None, "vae": None, "text_encoder": None,
    }
    if image_encoder is not None:
        if image_encoder.image_channels != options.channels:
            raise EcditError(f"the VAE takes {image_encoder.image_channels}-channel images; --channels is {options.channels}")
        settings.update(space="latent", vae=image_encoder.identity(),
                        latent_shape=list(image_encoder.latent_shape(options.image_size)))
    if text_encoder is not None:
        settings["text_encoder"] = text_encoder.identity()
    return settings


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = ("image_size", "channels", "min_size", "shard_size", "space")
    out = [f"{k} {old.get(k)} -> {new[k]}" for k in keys if old.get(k) != new[k]]
    if old["source"]["fingerprint"] != new["source"]["fingerprint"]:
        out.append(f"the source changed ({old['source']['items']} -> {new['source']['items']} items, or their names/sizes)")
    for k in ("vae", "text_encoder"):
        a, b = (old.get(k) or {}).get("fingerprint"), (new.get(k) or {}).get("fingerprint")
        if a != b:
            out.append(f"another {k.replace('_', ' ')}")
    return out


def _sealed_shards(cache: Path, n: int) -> int:
    """Shards 0..k-1 that are sealed (their .json exists); the first unsealed one ends the run."""
    k = 0
    while k < n and (cache / f"{shard_name(k)}.json").is_file():
        k += 1
    return k


def prepare(
    source: str | Path,
    out: str | Path,
    options: PrepareOptions | None = None,
    image_encoder: Any = None,
    text_encoder: Any = None,
    on_progress: Callable[[int, int], None] | None = None,
    on_shard: Callable[[int, int], None] | None = None,
) -> PrepareSummary:
    """Write (or finish) the cache of `source` in `out`; returns the summary over all shards.

    on_progress(items_done, items_total) after each encoder batch; on_shard(k, num_shards)
    after shard k is sealed.
    """
    options = options or PrepareOptions()
    t0 = time.time()
    collection = open_collection(source)
    cache = Path(out)
    if cache.exists() and not cache.is_dir():
        raise EcditError(f"output {cache} exists and is not a folder")
    if not len(collection):
        raise EcditError(f"source {source} lists no items")
    settings = _settings(collection, options, image_encoder, text_encoder)
    num_shards = math.ceil(len(collection) / options.shard_size)
    settings["num_shards"] = num_shards
    if (cache / MANIFEST).is_file():
        old = read_json(cache / MANIFEST, what="prepared cache manifest")
        if old.get("format") != CACHE_FORMAT:
            raise EcditError(f"{cache} holds a {MANIFEST} that is not an ecdit cache's; choose another -o")
        diff = _differences(old, settings)
        if diff:
            raise EcditError(f"{cache} holds a cache prepared with other settings ({'; '.join(diff)}): "
                             "re-run with the same ones to resume, or choose another -o")
    elif cache.is_dir() and any(cache.iterdir()):
        raise EcditError(f"output folder {cache} is not empty and holds no {MANIFEST}; choose another -o")
    atomic_write_json(cache / MANIFEST, {**settings, "complete": False})

    done = _sealed_shards(cache, num_shards)
    start_item = done * options.shard_size
    items = collection.items(start_item)
    processed = 0
    if on_progress is not None:
        on_progress(start_item, len(collection))
    for k in range(done, num_shards):
        count = min(options.shard_size, len(collection) - k * options.shard_size)
        batch = list(itertools.islice(items, count))
        if len(batch) < count:
            raise EcditError(f"source {source} listed {len(collection)} items but yielded only "
                             f"{k * options.shard_size + len(batch)} (did it change while being read?)")
        _write_shard(cache, k, batch, options, image_encoder, text_encoder, k * options.shard_size,
                     len(collection), on_progress)
        processed += count
        if on_shard is not None:
            on_shard(k, num_shards)

    written, skipped = 0, Counter({r: 0 for r in SKIP_REASONS})
    for k in range(num_shards):
        meta = read_json(cache / f"{shard_name(k)}.json", what="prepared shard")
        written += len(meta["keys"])
        skipped.update(meta["skipped"])
    seconds = time.time() - t0
    summary = PrepareSummary(cache=str(cache), source_kind=collection.kind, items=len(collection), written=written,
                             skipped=dict(skipped), shards=num_shards, resumed_shards=done, seconds=seconds,
                             images_per_s=processed / seconds if seconds > 0 else 0.0, space=settings["space"])
    atomic_write_json(cache / MANIFEST, {**settings, "complete": True,
                                         "totals": {"written": written, "skipped": dict(skipped)}})
    return summary


def _write_shard(cache: Path, k: int, items: list, options: PrepareOptions, image_encoder: Any, text_encoder: Any,
                 first: int, total: int, on_progress: Callable[[int, int], None] | None) -> None:
    """Decode, encode and store one shard's items; its .json goes last (it seals the shard)."""
    keys, captions, pixels = [], [], []
    skipped = Counter({r: 0 for r in SKIP_REASONS})
    for item in items:
        image, caption, reason = decode(item, options.image_size, options.channels, options.min_size)
        if reason:
            skipped[reason] += 1
            continue
        keys.append(item.key)
        captions.append(caption)
        pixels.append(image)
    S, C = options.image_size, options.channels
    pix = np.stack(pixels) if pixels else np.zeros((0, S, S, C), np.uint8)
    arrays: dict[str, np.ndarray] = {}
    parts: dict[str, list[np.ndarray]] = {"latents": [], "text": [], "mask": []}
    B = options.batch_size
    for b in range(0, len(pix), B):
        if image_encoder is not None:
            x = pix[b:b + B].transpose(0, 3, 1, 2).astype(np.float32) * (2.0 / 255.0) - 1.0
            parts["latents"].append(image_encoder.encode_numpy(x).astype(np.float16))
        if text_encoder is not None:
            states, mask = text_encoder.encode_numpy(captions[b:b + B])
            parts["text"].append(states.astype(np.float16))
            parts["mask"].append(mask.astype(bool))
        if on_progress is not None:
            on_progress(first + min(len(items), round((b + B) / max(1, len(pix)) * len(items))), total)
    if image_encoder is not None:
        c, h, w = image_encoder.latent_shape(S)
        arrays["latents"] = np.concatenate(parts["latents"]) if parts["latents"] else np.zeros((0, c, h, w), np.float16)
    else:
        arrays["pixels"] = pix
    if text_encoder is not None:
        L, W = text_encoder.max_len, text_encoder.width
        arrays["text"] = np.concatenate(parts["text"]) if parts["text"] else np.zeros((0, L, W), np.float16)
        arrays["mask"] = np.concatenate(parts["mask"]) if parts["mask"] else np.zeros((0, L), bool)
    for name, array in arrays.items():
        atomic_write_bytes(cache / f"{shard_name(k)}.{name}.npy", _npy_bytes(array))
    atomic_write_json(cache / f"{shard_name(k)}.json", {
        "shard": k, "first_item": first, "items": len(items), "keys": keys, "captions": captions,
        "skipped": dict(skipped)})
    if on_progress is not None:
        on_progress(first + len(items), total)
