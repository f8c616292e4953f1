"""Checkpoints: DeepSpeed's `save_checkpoint` plus what makes them safe to resume from.

Layout of `checkpoints/`:

    step00000100/            one DeepSpeed tag (model, optimizer and per-expert files, all ranks)
        ema_rank000.pt       this rank's EMA weights (experts are rank-local under EP)
        portable/            MoE runs: the same state independent of the expert-parallel size
                             (portable.py), read when a run resumes on another `moe.ep_size`
        ecdit_complete.json  written last, atomically, by rank 0: step, expert-parallel size,
                             whether portable/ is there, and every file's size
    latest                   the newest complete tag, replaced atomically (a hint only)

A tag without `ecdit_complete.json` (killed mid-save) or whose files no longer have their
recorded sizes (truncated) is skipped; a tag that fails to load (corrupt bytes) makes every
rank fall back to the previous complete one. Only `keep` complete tags are kept.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ecdit_cli.errors import EcditError
from ecdit_cli.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from ecdit_cli.train import portable

COMPLETE = "ecdit_complete.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], ema_state: dict[str, torch.Tensor] | None,
         rank: int, keep: int, ep_size: int = 1, num_experts: int = 0) -> str:
    """Save on all ranks (DeepSpeed requires it); rank 0 seals the tag and prunes old ones.

    `num_experts` > 0 (an MoE run) also writes the portable state where the optimizer allows it."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # a stale partial save of this step (killed earlier)
    _barrier()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as err:
        # The tag has no completion record, so a resume never picks it up.
        raise EcditError(f"cannot write checkpoint {tag_dir}: {_reason(err, ckpt_dir)}") from None
    if ema_state is not None:
        buf = io.BytesIO()
        torch.save(ema_state, buf)
        atomic_write_bytes(tag_dir / f"ema_rank{rank:03d}.pt", buf.getvalue())
    has_portable = num_experts > 0 and portable.supported(engine)
    if has_portable:
        portable.save(engine, tag_dir, client_state, ema_state, rank, ep_size, num_experts)
    _barrier()
    if rank == 0:
        files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}
        atomic_write_json(tag_dir / COMPLETE, {"step": step, "ep_size": ep_size, "portable": has_portable,
                                               "files": files})
        atomic_write_text(ckpt_dir / "latest", tag + "\n")
        for old in complete_tags(ckpt_dir)[keep:]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        for partial in ckpt_dir.glob("step*"):
            if partial.is_dir() and not (partial / COMPLETE).exists() and partial.name < tag:
                shutil.rmtree(partial, ignore_errors=True)
    _barrier()
    return tag


def _reason(err: BaseException, where: Path) -> str:
    """A short cause: torch.save reports a full disk as an opaque zip-writer error."""
    import errno

    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    if free is not None and free < 1 << 20:
        return f"no space left on device ({free // 1024} KiB free)"
    cause = err
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        return {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
                errno.EACCES: "permission denied"}.get(cause.errno or 0, cause.strerror or str(cause))
    return str(err)[:200]


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Sealed tags, newest first (not verified: see `verify`)."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.glob("step*") if (p / COMPLETE).is_file()]
    return sorted(tags, reverse=True)


def record(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """A sealed tag's completion record ({} if unreadable: `verify` reports that)."""
    try:
        return json.loads((ckpt_dir / tag / COMPLETE).read_text())
    except (OSError, ValueError):
        return {}


def verify(ckpt_dir: Path, tag: str) -> str | None:
    """None if every recorded file exists with its recorded size, else what is wrong."""
    tag_dir = ckpt_dir / tag
    try:
        record = json.loads((tag_dir / COMPLETE).read_text())
    except (OSError, ValueError):
        return f"{tag}: unreadable {COMPLETE}"
    for name, size in record.get("files", {}).items():
        p = tag_dir / name
        if not p.is_file():
            return f"{tag}: missing {name}"
        if p.stat().st_size != size:
            return f"{tag}: {name} is {p.stat().st_size} bytes, expected {size} (truncated?)"
    return None


def load_latest(engine, ckpt_dir: Path, rank: int, warn: Callable[[str], None],
                ep_size: int = 1) -> tuple[dict[str, Any], dict | None] | None:
    """Load the newest loadable checkpoint on all ranks; (client_state, ema_state) or None.

    A tag saved with another expert-parallel size (tags before this record say none: the same)
    is read from its portable state, sliced for this layout; without one it is an error."""
    from ecdit_cli.train.engine import all_reduce

    candidates = complete_tags(ckpt_dir)
    # Rank 0's view decides the order so every rank tries the same tags.
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        box = [candidates]
        torch.distributed.broadcast_object_list(box, src=0)
        candidates = box[0]
    for tag in candidates:
        problem = verify(ckpt_dir, tag)
        ok = problem is None
        client: dict[str, Any] | None = None
        ema = None
        saved_ep = int(record(ckpt_dir, tag).get("ep_size", ep_size))
        if ok and saved_ep != ep_size and not record(ckpt_dir, tag).get("portable"):
            raise EcditError(
                f"checkpoint {ckpt_dir / tag} was saved with moe.ep_size={saved_ep} and holds no portable expert "
                f"state (written only with train.zero_stage=0 in fp32), so it cannot resume with "
                f"moe.ep_size={ep_size}; resume with --ep {saved_ep}"
            )
        if ok and saved_ep != ep_size:
            try:
                client, ema = portable.load(engine, ckpt_dir / tag, rank, ep_size, ema_wanted=True)
            except Exception as err:
                ok, problem = False, f"{tag}: portable state cannot be loaded ({type(err).__name__}: {str(err)[:200]})"
        elif ok:
            try:
                path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
                if path is None:
                    raise RuntimeError("DeepSpeed found nothing to load")
                ema_file = ckpt_dir / tag / f"ema_rank{rank:03d}.pt"
                if ema_file.exists():
                    ema = torch.load(ema_file, map_location="cpu", weights_only=True)
            except Exception as err:  # corrupt bytes: torch/zip errors of many kinds
                ok, problem = False, f"{tag}: cannot be loaded ({type(err).__name__}: {str(err)[:200]})"
        # Every rank must agree, or ranks would continue from different steps.
        all_ok = all_reduce([0.0 if ok else 1.0], op="max")[0] == 0.0
        if all_ok:
            return client or {}, ema
        if rank == 0:
            warn(f"checkpoint {problem or tag + ': failed on another rank'}; falling back to an older one")
    return None
