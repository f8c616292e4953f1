"""One image-caption interface over the sources: rendered scenes, Fashion-MNIST, a folder, a prepared cache.

Every source hands the trainer float32 images (N, C, H, W) in [-1, 1] (the DiT pixel-space
convention) with one caption each, addressed by (split, start index) so that a run resumes from
a position alone:

- "train" is an endless stream (index modulo the training set, reshuffled every epoch for
  finite sets); "val" is a fixed held-out set (`val_set(count)` = its first `count` images);
  "eval" is a further held-out stream where the source has one (else it equals "val").
- `vocabulary()` lists the words of every caption the source can produce, split by
  `caption_words` (for a word-level tokenizer).
- `object_masks` gives per-pixel object masks (N, H, W) for scenes, None elsewhere.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ecdit_cli.data import scenes
from ecdit_cli.errors import EcditError, did_you_mean

SOURCE_KINDS = ("scenes", "fashion_mnist", "folder", "prepared")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_CAPTIONS = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal",
                          "a shirt", "a sneaker", "a bag", "an ankle boot")
FOLDER_VAL_FRACTION = 0.05
_PERM_SALT = 0xDA7A  # epoch permutations, apart from the scene streams
_HELD_SALT = 0xDA7B  # the order of held-out (test) images


def caption_words(caption: str) -> list[str]:
    """Lower-case words of a caption (hyphenated words stay whole: "t-shirt")."""
    return re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*", caption.lower())


class ImageTextSource(Protocol):
    """What the trainer needs from a dataset."""

    kind: str
    image_size: int
    channels: int

    def batch(self, split: str, start: int, count: int) -> tuple[np.ndarray, list[str]]:
        """Images float32 (count, C, H, W) in [-1, 1] and captions of samples start..start+count-1."""
        ...

    def val_set(self, count: int) -> tuple[np.ndarray, list[str]]:
        """The fixed held-out validation set: the first `count` samples of "val"."""
        ...

    def vocabulary(self) -> list[str]: ...

    def object_masks(self, split: str, start: int, count: int) -> np.ndarray | None: ...


def _to_model_range(images_nhwc: np.ndarray, scale: float) -> np.ndarray:
    # (N, H, W, C) in [0, scale] -> (N, C, H, W) in [-1, 1]
    x = images_nhwc.transpose(0, 3, 1, 2).astype(np.float32) * (2.0 / scale) - 1.0
    return np.ascontiguousarray(x)


@functools.lru_cache(maxsize=4)
def _epoch_perm(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, _PERM_SALT, epoch]).permutation(n)


def _stream_indices(n: int, seed: int, start: int, count: int) -> np.ndarray:
    """Indices into a finite set of n for an endless, per-epoch reshuffled stream."""
    pos = np.arange(start, start + count)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(pos // n):
        sel = pos // n == epoch
        out[sel] = _epoch_perm(n, seed, int(epoch))[pos[sel] % n]
    return out


class SceneSource:
    """Rendered compositional scenes (scenes.py); RGB only."""

    kind = "scenes"

    def __init__(self, image_size: int = 32, min_objects: int = 1, max_objects: int = 4, seed: int = 0):
        self.spec = scenes.SceneSpec(image_size, min_objects, max_objects)
        self.image_size, self.channels, self.seed = image_size, 3, seed

    def batch_with_metadata(self, split: str, start: int, count: int
                            ) -> tuple[np.ndarray, list[str], list[dict[str, Any]], np.ndarray]:
        """Like `batch`, plus GenEval metadata and object masks (count, H, W) bool."""
        images, captions, metas, masks = scenes.render_batch(self.spec, self.seed, split, start, count)
        return _to_model_range(images, 1.0), captions, metas, masks

    def batch(self, split: str, start: int, count: int) -> tuple[np.ndarray, list[str]]:
        images, captions, _, _ = self.batch_with_metadata(split, start, count)
        return images, captions

    def val_set(self, count: int) -> tuple[np.ndarray, list[str]]:
        return self.batch("val", 0, count)

    def vocabulary(self) -> list[str]:
        return scenes.vocabulary()

    def object_masks(self, split: str, start: int, count: int) -> np.ndarray:
        """Object masks of the same samples as `batch(split, start, count)` (re-rendered)."""
        return self.batch_with_metadata(split, start, count)[3]


def _resize(images_nchw: torch.Tensor, size: int) -> torch.Tensor:
    if images_nchw.shape[-1] == size and images_nchw.shape[-2] == size:
        return images_nchw
    # antialias when shrinking, so 28 -> 16 averages instead of skipping pixels
    return F.interpolate(images_nchw, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < images_nchw.shape[-1])


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST format, unsigned bytes), gzipped or plain, as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise EcditError(f"cannot read {path}: {err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise EcditError(f"{path} is not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise EcditError(f"{path} is truncated: header says {dims}, found {body.size} values")
    return body.reshape(dims)


def _find_idx(folder: Path, name: str) -> Path:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    raise EcditError(
        f"Fashion-MNIST file {name}[.gz] not found in {folder}: install the data with "
        f"`apt-get install -y dataset-fashion-mnist` or set data.path to a folder holding the idx files"
    )


class FashionMNISTSource:
    """Fashion-MNIST (28 x 28 grey, 10 classes) resized to image_size, captioned by class name.

    "train" streams the 60k training images; "val" and "eval" are the two halves of the test
    file in a seeded order (the whole test file if it holds a single image).
    """

    kind = "fashion_mnist"

    def __init__(self, path: str | Path = "", image_size: int = 32, channels: int = 1, seed: int = 0):
        if channels not in (1, 3):
            raise EcditError(f"fashion_mnist gives 1 or 3 channels (grey replicated), not {channels}")
        folder = Path(path) if path else FASHION_MNIST_DIR
        self.image_size, self.channels, self.seed = image_size, channels, seed
        self.images, self.labels = {}, {}
        for split, prefix in (("train", "train"), ("test", "t10k")):
            images = read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))
            labels = read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or len(images) == 0:
                raise EcditError(f"Fashion-MNIST {prefix} files in {folder} disagree: images {images.shape}, "
                                 f"labels {labels.shape}")
            if labels.max() >= len(FASHION_MNIST_CAPTIONS):
                raise EcditError(f"Fashion-MNIST {prefix} labels in {folder} go up to {labels.max()}, expected 0..9")
            self.images[split], self.labels[split] = images, labels
        order = np.random.default_rng([seed, _HELD_SALT]).permutation(len(self.labels["test"]))
        half = max(1, len(order) // 2)
        self._held = {"val": order[:half], "eval": order[half:] if len(order) > half else order[:half]}

    def _indices(self, split: str, start: int, count: int) -> tuple[str, np.ndarray]:
        scenes.split_id(split)
        if split == "train":
            return "train", _stream_indices(len(self.labels["train"]), self.seed, start, count)
        held = self._held[split]
        return "test", held[np.arange(start, start + count) % len(held)]

    def batch(self, split: str, start: int, count: int) -> tuple[np.ndarray, list[str]]:
        part, idx = self._indices(split, start, count)
        x = torch.from_numpy(self.images[part][idx].astype(np.float32) / 255.0)[:, None]  # (N, 1, 28, 28)
        x = _resize(x, self.image_size).clamp_(0, 1) * 2 - 1
        if self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        captions = [FASHION_MNIST_CAPTIONS[int(k)] for k in self.labels[part][idx]]
        return np.ascontiguousarray(x.numpy(), dtype=np.float32), captions

    def val_set(self, count: int) -> tuple[np.ndarray, list[str]]:
        return self.batch("val", 0, count)

    def vocabulary(self) -> list[str]:
        return sorted({w for c in FASHION_MNIST_CAPTIONS for w in caption_words(c)})

    def object_masks(self, split: str, start: int, count: int) -> None:
        return None


def fit_square(im, size: int, channels: int) -> np.ndarray:
    """A PIL image resized (shorter side to `size`, bicubic) and centre-cropped, uint8 (S, S, C)."""
    from PIL import Image

    im = im.convert("RGB" if channels == 3 else "L")
    scale = size / min(im.size)
    w, h = max(size, round(im.size[0] * scale)), max(size, round(im.size[1] * scale))
    im = im.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8).reshape(size, size, channels)


def _load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """An image file resized (shorter side) and centre-cropped to size x size, uint8 (S, S, C)."""
    try:
        from PIL import Image  # comes with matplotlib
    except ImportError:  # pragma: no cover - matplotlib always brings pillow
        raise EcditError("reading image folders needs pillow: pip install pillow") from None
    try:
        with Image.open(path) as im:
            return fit_square(im, size, channels)
    except OSError as err:
        raise EcditError(f"cannot read image {path}: {err}") from None


def held_out_split(keys: list[str], fraction: float = FOLDER_VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): a deterministic ~`fraction` of the keys (by a hash of each
    key, at least one) is held out; with a single key, train and val share it."""
    ranked = sorted(range(len(keys)), key=lambda i: hashlib.sha256(keys[i].encode()).digest())
    n_val = max(1, round(fraction * len(keys)))
    val = np.asarray(sorted(ranked[:n_val]), dtype=np.int64)
    rest = sorted(ranked[n_val:])
    return (np.asarray(rest, dtype=np.int64) if rest else val), val


class CaptionedImages:
    """What a source of captioned images without object masks shares (a folder, a prepared cache):
    `batch` and `captions` are the subclass's."""

    captions: list[str]

    def val_set(self, count: int) -> tuple[np.ndarray, list[str]]:
        return self.batch("val", 0, count)

    def vocabulary(self) -> list[str]:
        return sorted({w for c in self.captions for w in caption_words(c)})

    def object_masks(self, split: str, start: int, count: int) -> None:
        return None


class FolderSource(CaptionedImages):
    """A folder of images with `captions.jsonl` lines {"path": relative path, "caption": text}.

    All images are decoded and resized once, at construction. A deterministic ~5% (by a hash of
    the path; at least one image) is held out as "val" (= "eval"); with a single image, train
    and val share it.
    """

    kind = "folder"

    def __init__(self, path: str | Path, image_size: int = 32, channels: int = 3, seed: int = 0):
        if channels not in (1, 3):
            raise EcditError(f"folder images are read as 1 (grey) or 3 (RGB) channels, not {channels}")
        if not str(path):
            raise EcditError("source 'folder' needs data.path: a folder with images and captions.jsonl")
        folder = Path(path)
        if not folder.is_dir():
            raise EcditError(f"image folder {folder} does not exist")
        index = folder / "captions.jsonl"
        if not index.is_file():
            raise EcditError(f'{index} not found: write one line per image, {{"path": "img.png", "caption": "..."}}')
        entries: list[tuple[str, str]] = []
        for lineno, line in enumerate(index.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise EcditError(f"{index}:{lineno}: not valid JSON ({err.msg})") from None
            if not (isinstance(rec, dict) and isinstance(rec.get("path"), str)
                    and isinstance(rec.get("caption"), str) and rec["caption"].strip()):
                raise EcditError(f'{index}:{lineno}: expected {{"path": str, "caption": non-empty str}}')
            if not (folder / rec["path"]).is_file():
                raise EcditError(f"{index}:{lineno}: image {folder / rec['path']} not found")
            entries.append((rec["path"], rec["caption"].strip()))
        if not entries:
            raise EcditError(f"{index} lists no images")
        self.image_size, self.channels, self.seed = image_size, channels, seed
        self.captions = [c for _, c in entries]
        self.images = np.stack([_load_image(folder / p, image_size, channels) for p, _ in entries])
        self.train_indices, self.val_indices = held_out_split([p for p, _ in entries])

    def batch(self, split: str, start: int, count: int) -> tuple[np.ndarray, list[str]]:
        scenes.split_id(split)
        if split == "train":
            idx = self.train_indices[_stream_indices(len(self.train_indices), self.seed, start, count)]
        else:
            idx = self.val_indices[np.arange(start, start + count) % len(self.val_indices)]
        return _to_model_range(self.images[idx], 255.0), [self.captions[i] for i in idx]



def make_source(kind: str, image_size: int = 32, channels: int = 3, path: str | Path = "",
                min_objects: int = 1, max_objects: int = 4, seed: int = 0) -> ImageTextSource:
    """The source named by data.source, sized for the model (image_size, channels)."""
    if kind == "scenes":
        if channels != 3:
            raise EcditError(f"source 'scenes' renders RGB images: model.in_channels must be 3, not {channels}")
        return SceneSource(image_size, min_objects, max_objects, seed)
    if kind == "fashion_mnist":
        return FashionMNISTSource(path, image_size, channels, seed)
    if kind == "folder":
        return FolderSource(path, image_size, channels, seed)
    if kind == "prepared":
        from ecdit_cli.data.prepared import PreparedSource

        return PreparedSource(path, seed)  # its image size and space are the cache's (checked by the trainer)
    raise EcditError(f"unknown data source '{kind}'{did_you_mean(kind, SOURCE_KINDS)}; "
                     f"choose from {', '.join(SOURCE_KINDS)}")
