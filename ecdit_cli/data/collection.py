"""Image-text collections that `ecdit prepare` reads: a folder, a manifest, WebDataset shards.

- A folder of images (png, jpg, jpeg, webp, bmp, gif, tif, tiff; searched recursively) with a
  same-named `.txt` caption beside each (`cat.jpg` + `cat.txt`).
- A manifest: `.jsonl` lines `{"path": ..., "caption": ...}` or a `.csv` with `path` and
  `caption` columns; relative paths are relative to the manifest's folder.
- WebDataset tar shards (the `webdataset` library): one `.tar`, a brace pattern
  (`data-{000..009}.tar`) or a folder of `.tar` files; a sample's image is its jpg / png /
  webp / ... member, its caption the `txt` member (or `caption`, or a `json` with a
  "caption" / "text" / "prompt" field).

Every collection lists its items in a fixed order (sorted paths, manifest order, shard then tar
order), so item i is the same on every pass and a prepare can resume at an item index. Items
are never judged here: `decode` says why one is unusable (unreadable, too small, empty caption).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecdit_cli.errors import EcditError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_KEYS = ("txt", "caption", "text")
JSON_CAPTION_FIELDS = ("caption", "text", "prompt")
ACCEPTED = ("a folder of images with same-named .txt captions, a .jsonl or .csv manifest (path, caption), "
            "or WebDataset .tar shards (a file, a {000..009} brace pattern or a folder of them)")
# Why an item is skipped (the summary counts each).
UNREADABLE, TOO_SMALL, EMPTY_CAPTION = "unreadable", "too small", "empty caption"


@dataclass
class Item:
    key: str  # unique within the collection: relative path, or shard name / sample key
    caption: str | None  # None when the item has no caption at all
    image: bytes | Path | None  # encoded image bytes, or a file to read; None when missing


class Collection:
    """A fixed-order list of items; `items(start)` yields items start, start + 1, ..."""

    kind = ""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __len__(self) -> int:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A hash of what the collection lists (names and sizes): a resumed prepare checks it."""
        raise NotImplementedError

    def items(self, start: int = 0) -> Iterator[Item]:
        raise NotImplementedError


def _hash_lines(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


class FolderCollection(Collection):
    kind = "folder"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix[1:].lower() in IMAGE_EXTS),
                            key=lambda p: p.relative_to(path).as_posix())

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        return _hash_lines([f"{p.relative_to(self.path).as_posix()}\t{p.stat().st_size}" for p in self.files])

    def items(self, start: int = 0) -> Iterator[Item]:
        for p in self.files[start:]:
            txt = p.with_suffix(".txt")
            caption = txt.read_text(errors="replace") if txt.is_file() else None
            yield Item(p.relative_to(self.path).as_posix(), caption, p)


class ManifestCollection(Collection):
    kind = "manifest"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entries: list[tuple[str, str | None]] = []  # (path, caption); an unusable line has path ""
        text = path.read_text(errors="replace")
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(io.StringIO(text))
            if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
                raise EcditError(f"{path}: a CSV manifest needs a header with 'path' and 'caption' columns, "
                                 f"found {reader.fieldnames}")
            self.entries = [((row.get("path") or "").strip(), row.get("caption")) for row in reader]
        else:
            for line in text.splitlines():
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    rec = None
                if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
                    self.entries.append(("", None))
                    continue
                caption = rec.get("caption")
                self.entries.append((rec["path"], caption if isinstance(caption, str) else None))

    def __len__(self) -> int:
        return len(self.entries)

    def fingerprint(self) -> str:
        return _hash_lines([f"{p}\t{c}" for p, c in self.entries])

    def items(self, start: int = 0) -> Iterator[Item]:
        for i, (p, caption) in enumerate(self.entries[start:], start=start):
            image = (self.path.parent / p) if p else None
            yield Item(p or f"line{i}", caption, image)


def _require_webdataset():
    try:
        import webdataset
    except ImportError:
        raise EcditError("reading WebDataset shards needs webdataset: pip install -e '.[data]'") from None
    return webdataset


class WebDatasetCollection(Collection):
    kind = "webdataset"

    def __init__(self, path: Path, urls: list[str]) -> None:
        super().__init__(path)
        self.urls = urls
        from webdataset.tariterators import base_plus_ext

        # Count samples from the tar headers alone (no image bytes read), grouping members by
        # key the way webdataset's group_by_keys does: consecutive members with one prefix.
        self.counts: list[tuple[str, int, int]] = []
        for url in urls:
            n, size, last = 0, 0, None
            try:
                with tarfile.open(url) as tar:
                    for m in tar:
                        if not m.isfile():
                            continue
                        size += m.size
                        prefix, _ = base_plus_ext(m.name)
                        if prefix is not None and prefix != last:
                            n, last = n + 1, prefix
            except (OSError, tarfile.TarError) as err:
                raise EcditError(f"cannot read WebDataset shard {url}: {err}") from None
            self.counts.append((Path(url).name, n, size))

    def __len__(self) -> int:
        return sum(n for _, n, _ in self.counts)

    def fingerprint(self) -> str:
        return _hash_lines([f"{name}\t{n}\t{size}" for name, n, size in self.counts])

    def items(self, start: int = 0) -> Iterator[Item]:
        wds = _require_webdataset()
        dataset = wds.WebDataset(self.urls, shardshuffle=False, empty_check=False)
        for i, sample in enumerate(dataset):
            if i < start:
                continue
            keys = {k.lower(): v for k, v in sample.items() if not k.startswith("__")}
            image = next((keys[e] for e in IMAGE_EXTS if e in keys), None)
            caption = next((keys[c] for c in CAPTION_KEYS if c in keys), None)
            if caption is None and "json" in keys:
                try:
                    meta = json.loads(keys["json"])
                    caption = next((meta[f] for f in JSON_CAPTION_FIELDS if isinstance(meta.get(f), str)), None)
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                    caption = None
            if isinstance(caption, bytes):
                caption = caption.decode("utf-8", errors="replace")
            url = Path(sample.get("__url__", "")).name
            yield Item(f"{url}/{sample['__key__']}", caption, image)


def open_collection(source: str | Path) -> Collection:
    """The collection at `source`, recognised by its form; anything else names what is accepted."""
    text = str(source)
    if "{" in text and text.endswith(".tar"):
        _require_webdataset()
        import braceexpand  # webdataset's own dependency, which expands its shard patterns

        urls = list(braceexpand.braceexpand(text))
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise EcditError(f"WebDataset shard {missing[0]} not found ({len(missing)} of {len(urls)} missing)")
        return WebDatasetCollection(Path(urls[0]).parent, urls)
    path = Path(source)
    if not path.exists():
        raise EcditError(f"source {path} not found; give {ACCEPTED}")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".csv"):
            return ManifestCollection(path)
        if suffix == ".tar":
            return WebDatasetCollection(path.parent, [str(path)])
        raise EcditError(f"source {path} is a '{suffix or path.name}' file; give {ACCEPTED}")
    folder = FolderCollection(path)
    if len(folder):
        return folder
    tars = sorted(str(p) for p in path.glob("*.tar"))
    if tars:
        return WebDatasetCollection(path, tars)
    raise EcditError(f"source folder {path} holds no images ({', '.join(IMAGE_EXTS)}) and no .tar shards; "
                     f"give {ACCEPTED}")


def decode(item: Item, size: int, channels: int, min_size: int) -> tuple[np.ndarray | None, str, str]:
    """(image uint8 (S, S, C) or None, caption, why it is skipped or '')."""
    from PIL import Image

    from ecdit_cli.data.sources import fit_square

    caption = (item.caption or "").strip()
    if item.image is None:
        return None, caption, UNREADABLE
    try:
        with Image.open(io.BytesIO(item.image) if isinstance(item.image, bytes) else item.image) as im:
            im.load()  # decode now: a truncated or corrupt file fails here, not later
            if min(im.size) < min_size:
                return None, caption, TOO_SMALL
            pixels = fit_square(im, size, channels)
    except Exception:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        return None, caption, UNREADABLE
    if not caption:
        return None, caption, EMPTY_CAPTION
    return pixels, caption, ""
