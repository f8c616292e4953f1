"""Portable expert checkpoints: a run's full state in a form that does not depend on its
expert-parallel size, so a run saved with `moe.ep_size=1` resumes with `--ep 2` and back.

DeepSpeed's own MoE checkpoint is per expert-parallel rank: its optimizer file
`expp_rank_<r>_..._optim_states.pt` holds the torch optimizer state of rank r's local experts
by parameter position, and nothing in it can be re-cut for another layout (DeepSpeed issue
#6589 reports even the expert weights coming back to the wrong ranks). So beside DeepSpeed's
tag every checkpoint of an MoE run also writes

    portable/shared.pt          rank 0: every non-expert parameter and buffer, its optimizer
                                state, its EMA, the client state (step, logging window, ...)
                                and the engine's counters
    portable/experts_epNNN.pt   expert-parallel rank NNN of the first expert-data-parallel
                                replica: global experts [first, first + count) of every MoE
                                layer, stacked (count, ...), with their optimizer state and EMA

keyed by parameter name (the names do not change with the layout). A resume with the saved
expert-parallel size loads DeepSpeed's tag as before; with another size every rank reads
shared.pt and the expert files that overlap the experts it now owns, and slices them.

Scope: the plain torch optimizer that DeepSpeed runs without ZeRO in fp32 (`train.zero_stage=0`,
fp32: the CPU default). ZeRO-1/2 and bf16 keep flattened fp32 partitions whose layout is
DeepSpeed's; such runs write no portable state, and a resume on another expert-parallel size is
refused in one line. Files hold plain tensors and Python scalars (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from ecdit_cli.errors import EcditError
from ecdit_cli.files import atomic_write_bytes

DIR = "portable"
SHARED = "shared.pt"
FORMAT = 1


def expert_file(ep_rank: int) -> str:
    return f"experts_ep{ep_rank:03d}.pt"


def supported(engine) -> bool:
    """Whether this engine's optimizer state is per parameter (no ZeRO, no bf16/fp16 wrapper)."""
    return (engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled() and not engine.fp16_enabled()
            and isinstance(engine.optimizer, torch.optim.Optimizer))


def _is_expert(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False


def _optim_state(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v)}


def _write(path: Path, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def save(engine, tag_dir: Path, client: dict[str, Any], ema: dict[str, torch.Tensor] | None, rank: int,
         ep_size: int, num_experts: int) -> None:
    """Write this rank's part of the portable state into `tag_dir/portable` (all ranks call it)."""
    module, optimizer = engine.module, engine.optimizer
    out = tag_dir / DIR
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        params = {n: p.detach().clone() for n, p in module.named_parameters() if not _is_expert(p)}
        _write(out / SHARED, {
            "format": FORMAT, "ep_size": ep_size, "num_experts": num_experts,
            "params": params,
            "buffers": {n: b.detach().clone() for n, b in module.named_buffers()},
            "optim": {n: _optim_state(optimizer, p) for n, p in module.named_parameters() if not _is_expert(p)},
            "ema": {n: t for n, t in ema.items() if n in params} if ema is not None else None,
            "client": client,
            "engine": {"global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples),
                       "skipped_steps": int(engine.skipped_steps)},
        })
    # Ranks 0..ep-1 form the first expert-parallel group (DeepSpeed's layout, checked in
    # engine.build_engine); the other replicas hold the same experts.
    if rank < ep_size:
        experts = {n: p for n, p in module.named_parameters() if _is_expert(p)}
        count = num_experts // ep_size
        _write(out / expert_file(rank), {
            "format": FORMAT, "first": rank * count, "count": count,
            "params": {n: p.detach().clone() for n, p in experts.items()},
            "optim": {n: _optim_state(optimizer, p) for n, p in experts.items()},
            "ema": {n: ema[n] for n in experts} if ema is not None else None,
        })


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise EcditError(f"missing portable checkpoint file {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def _slice(pieces: list[tuple[int, torch.Tensor]], lo: int, hi: int, name: str) -> torch.Tensor:
    """Experts [lo, hi) of a tensor stored as (first expert, (count, ...)) pieces."""
    parts, at = [], lo
    for first, t in pieces:
        a, b = max(at, first), min(hi, first + t.shape[0])
        if a < b and a == at:
            parts.append(t[a - first: b - first])
            at = b
    if at != hi:
        raise EcditError(f"portable checkpoint: experts {at}..{hi - 1} of {name} are missing")
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


@torch.no_grad()
def load(engine, tag_dir: Path, rank: int, ep_size: int, ema_wanted: bool) -> tuple[dict[str, Any], dict | None]:
    """Restore weights, optimizer state and engine counters from `tag_dir/portable` on this rank's
    expert-parallel layout; returns (client_state, ema_state or None)."""
    src = tag_dir / DIR
    shared = _read(src / SHARED)
    if shared.get("format") != FORMAT:
        raise EcditError(f"{src / SHARED}: portable format {shared.get('format')!r}, this ecdit reads {FORMAT}")
    saved_ep, E = int(shared["ep_size"]), int(shared["num_experts"])
    count = E // ep_size
    lo, hi = (rank % ep_size) * count, (rank % ep_size + 1) * count
    # Only the saved ranks whose experts overlap [lo, hi) are read.
    saved_count = E // saved_ep
    files = [_read(src / expert_file(r)) for r in range(lo // saved_count, (hi - 1) // saved_count + 1)]

    def experts(section: str, name: str, key: str | None = None) -> torch.Tensor:
        pieces = [(int(f["first"]), f[section][name] if key is None else f[section][name][key]) for f in files]
        return _slice(pieces, lo, hi, name)

    module, optimizer = engine.module, engine.optimizer
    for n, b in module.named_buffers():
        if n in shared["buffers"]:
            b.copy_(shared["buffers"][n])
    for n, p in module.named_parameters():
        if _is_expert(p):
            p.copy_(experts("params", n))
            # Moments are stacked like the weight and are sliced with it; scalars ('step') are shared.
            stacked = files[0]["params"][n].shape
            state = {k: experts("optim", n, k) if v.shape == stacked else v.clone()
                     for k, v in files[0]["optim"][n].items()}
        else:
            p.copy_(shared["params"][n])
            state = {k: v.clone() for k, v in shared["optim"][n].items()}
        if state:
            optimizer.state[p] = state
        else:
            optimizer.state.pop(p, None)
    for k, v in shared["engine"].items():
        setattr(engine, k, v)
    ema = None
    if ema_wanted and shared["ema"] is not None:
        ema = dict(shared["ema"])
        for n in files[0]["ema"]:
            ema[n] = experts("ema", n)
    return dict(shared["client"]), ema
