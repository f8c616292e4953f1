"""Files: atomic writes, JSON and JSONL, and one-line errors for failed file operations.

A reader (or a process killed half-way) must never see a half-written `summary.json`,
`config.yaml` or `manifest.csv`: everything is written to a temporary file in the same
directory, fsynced, then renamed over the target (rename is atomic on POSIX). Errors name the
path (full disk, read-only directory).
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ecdit_cli.errors import EcditError


def io_error(path: Path, err: OSError, what: str = "write") -> EcditError:
    """'cannot write PATH: no space left on device' for an OSError."""
    reason = {
        errno.ENOSPC: "no space left on device",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EDQUOT: "disk quota exceeded",
    }.get(err.errno or 0, err.strerror or str(err))
    return EcditError(f"cannot {what} {path}: {reason}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise io_error(path, err) from None
    try:
        # mkstemp creates 0600 files; give the file the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise io_error(path, err) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _finite(o: Any) -> Any:
    # JSON has no NaN/Infinity; write null so pandas and other readers parse the file.
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def to_json(obj: Any, indent: int | None = None) -> str:
    return json.dumps(_finite(obj), indent=indent, default=_json_default, allow_nan=False)


def npz_bytes(**arrays: Any) -> bytes:
    """A compressed .npz of the arrays, in memory (for an atomic write)."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, to_json(obj, indent=2) + "\n")


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one whole line and flush it to disk (a crash leaves at most a partial last line)."""
    path = Path(path)
    line = to_json(record) + "\n"
    try:
        with open(path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise io_error(path, err) from None


def read_jsonl(path: str | Path, warnings: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Yield the well-formed records of a JSONL file; a corrupt or truncated line is skipped.

    Skipped lines are reported through `warnings` (line numbers are 1-based).
    """
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError
            except (ValueError, UnicodeDecodeError):
                if warnings is not None:
                    warnings.append(f"{path}: skipped corrupt or truncated line {n}")
                continue
            yield rec


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EcditError(f"{what} not found: {path}") from None
    except (ValueError, UnicodeDecodeError):
        raise EcditError(f"{what} {path} is not valid JSON (truncated or corrupt)") from None


def rewrite_jsonl(path: str | Path, keep: Any) -> int:
    """Atomically keep only the records for which `keep(record)` is true; returns lines dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    kept = [to_json(rec) for rec in read_jsonl(path, warnings=[]) if keep(rec)]
    # Corrupt lines are dropped too, so count against the lines on disk.
    total_lines = sum(1 for line in open(path, "rb") if line.strip())
    dropped = total_lines - len(kept)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


FINGERPRINT_FULL_BYTES = 64 << 20  # files up to this size are hashed whole
FINGERPRINT_SAMPLE_BYTES = 16 << 20  # larger ones: their first and last 16 MiB (plus the size)


def fingerprint(folder: str | Path) -> str:
    """A sha256 over a folder's files (relative names, sizes and contents), to tell whether two
    folders hold the same model weights. Files above 64 MiB contribute their size and their
    first and last 16 MiB only, so checking a 20 GB encoder at every training start costs well
    under a second instead of a full read; a retrained checkpoint of the same shape still
    differs in those bytes."""
    import hashlib

    root = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        h.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        try:
            with open(path, "rb") as f:
                if size <= FINGERPRINT_FULL_BYTES:
                    h.update(f.read())
                else:
                    h.update(f.read(FINGERPRINT_SAMPLE_BYTES))
                    f.seek(size - FINGERPRINT_SAMPLE_BYTES)
                    h.update(f.read(FINGERPRINT_SAMPLE_BYTES))
        except OSError as err:
            raise io_error(path, err, "read") from None
    return h.hexdigest()
