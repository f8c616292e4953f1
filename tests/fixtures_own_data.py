"""Builders for the own-data tests: tiny random pretrained stand-ins, image folders, shards."""

import importlib.util
import io
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny_pretrained = _script("tiny_pretrained")
scenes_folder = _script("scenes_folder")


def png_bytes(image_u8: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_u8).save(buf, format="PNG")
    return buf.getvalue()


def folder_items(folder: Path) -> list[tuple[str, bytes, str]]:
    """(stem, png bytes, caption) of a scenes folder, in name order."""
    return [(p.stem, p.read_bytes(), p.with_suffix(".txt").read_text().strip()) for p in sorted(folder.glob("*.png"))]


def write_manifests(folder: Path, out: Path) -> tuple[Path, Path]:
    """A JSONL and a CSV manifest listing the folder's images (paths relative to `out`)."""
    import csv

    out.mkdir(parents=True, exist_ok=True)
    rows = [(f"{folder.name}/{stem}.png", caption) for stem, _, caption in folder_items(folder)]
    jsonl = out / "images.jsonl"
    jsonl.write_text("".join(json.dumps({"path": p, "caption": c}) + "\n" for p, c in rows))
    with open(out / "images.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        w.writerows(rows)
    return jsonl, out / "images.csv"


def write_shards(folder: Path, out: Path, per_shard: int) -> list[Path]:
    """The folder's images as WebDataset shards (png + txt per sample) written by webdataset's TarWriter."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    items = folder_items(folder)
    paths = []
    for s in range(0, len(items), per_shard):
        path = out / f"shard-{s // per_shard:03d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for stem, data, caption in items[s:s + per_shard]:
                sink.write({"__key__": stem, "png": data, "txt": caption})
        paths.append(path)
    return paths
