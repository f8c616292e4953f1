"""Distributed setup and the DeepSpeed engine, built from the RunConfig in code.

One process or many, the trainer runs the same code: `setup_distributed` reads the launcher's
environment (RANK / WORLD_SIZE / LOCAL_RANK, set by the DeepSpeed launcher or torchrun) or
fakes a world of one, and DeepSpeed picks gloo on CPU and nccl on GPU by itself. The
DeepSpeed config dict is derived from `TrainConfig` (`deepspeed_config`), never hand-edited:
gradient accumulation is `batch_size / (micro_batch_size * data-parallel size)` and lives only
there. The optimizer (AdamW, or RMSprop with momentum as in the paper) is a torch optimizer over
DeepSpeed's MoE parameter groups, so ZeRO-1/2 partition expert and shared states correctly.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

from ecdit_cli.config import RunConfig
from ecdit_cli.errors import ConfigError, EcditError


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(cfg: RunConfig) -> str:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise EcditError("train.device=cuda but no CUDA device is visible (use train.device=cpu or auto)")
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return want


def resolve_precision(cfg: RunConfig, device: str) -> str:
    if cfg.train.precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return cfg.train.precision


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_deepspeed() -> None:
    # DeepSpeed logs at INFO to stdout from every rank; our own logging says what matters.
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    logging.getLogger("torch.distributed").setLevel(logging.ERROR)


def setup_distributed(cfg: RunConfig) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU).

    Under a launcher (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set) this process is one
    rank of it; otherwise it is a world of one on a fresh local port. The port is not written
    into the environment, so processes started from here (a launched run, a test) never
    inherit a port this process is already listening on.
    """
    launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if not launched:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("LOCAL_RANK", "0")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    device = resolve_device(cfg)
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    elif world > 1 and device == "cpu":
        # Processes sharing a node split its cores instead of oversubscribing them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))

    import sys

    from ecdit_cli.utils import prepare_deepspeed_import

    prepare_deepspeed_import()
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (the module, not torch: see sys.modules below)

    _quiet_deepspeed()
    if device == "cpu" and os.environ.get("ECDIT_DS_SHM") != "1":
        # DeepSpeed JIT-compiles a shared-memory all-reduce op for CPU on its first init
        # (30-100 s with gcc on a 2-core machine); gloo is all these CPU runs need.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if not torch.distributed.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if launched:
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        else:
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                       init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    return DistInfo(rank, local_rank, world, torch.device(device, local_rank) if device == "cuda" else torch.device("cpu"))


def batch_layout(cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """(micro batch per process, gradient accumulation steps) for the global batch."""
    B = cfg.train.batch_size
    if B % world_size:
        raise ConfigError(f"train.batch_size={B} is invalid: must be divisible by the {world_size} processes")
    micro = cfg.train.micro_batch_size or B // world_size
    if B % (micro * world_size):
        raise ConfigError(
            f"train.micro_batch_size={micro} is invalid: batch_size {B} must be a multiple of "
            f"micro_batch_size x {world_size} processes"
        )
    return micro, B // (micro * world_size)


def deepspeed_config(cfg: RunConfig, world_size: int, precision: str) -> dict[str, Any]:
    micro, accum = batch_layout(cfg, world_size)
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "steps_per_print": 2**31 - 1,  # progress is ours
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """A torch optimizer over DeepSpeed's MoE parameter groups (experts apart from shared)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    groups = split_params_into_different_moe_groups_for_optimizer({"params": params, "name": "params"})
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    return torch.optim.RMSprop(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def build_engine(cfg: RunConfig, model: torch.nn.Module, precision: str, world_size: int):
    import deepspeed

    if cfg.moe.is_moe and world_size % cfg.moe.ep_size:
        raise ConfigError(
            f"moe.ep_size={cfg.moe.ep_size} is invalid: must divide the number of processes ({world_size})"
        )
    import contextlib
    import io

    optimizer = build_optimizer(cfg, model)
    try:
        # DeepSpeed print()s its MoE group creation on every rank; progress output is ours.
        with contextlib.redirect_stdout(io.StringIO()):
            engine, _, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=deepspeed_config(cfg, world_size, precision)
            )
    except AssertionError as err:
        # E.g. ZeRO-3 with native MoE layers ("MoE not supported with Stage 3").
        raise EcditError(f"DeepSpeed refused the configuration: {err}") from None
    if cfg.moe.is_moe:
        from deepspeed.utils import groups

        name = f"ep_size_{cfg.moe.ep_size}"
        ep_rank = groups._get_expert_parallel_rank(name)
        expected = torch.distributed.get_rank() % cfg.moe.ep_size
        # Expert initialisation assumed DeepSpeed's layout: consecutive ranks form an EP group.
        assert ep_rank == expected, f"unexpected expert-parallel rank {ep_rank} (expected {expected})"
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def lr_at(step: int, cfg: RunConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then constant or cosine."""
    import math

    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def all_reduce(values: list[float], op: str = "sum", group=None) -> list[float]:
    """All-reduce a few floats (a no-op in a world of one)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size(group) == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX,
                                 group=group)
    return t.tolist()


def grad_norm(model: torch.nn.Module, ep_size: int) -> float | None:
    """Global L2 norm of the (data-parallel reduced) gradients; None when ZeRO holds them.

    Shared parameters are identical on every rank after the all-reduce; expert parameters are
    distinct across expert-parallel ranks and replicated world/ep times, so their squares are
    summed over the world and divided by the replica count.
    """
    shared_sq, expert_sq, seen = 0.0, 0.0, False
    for p in model.parameters():
        if p.grad is None:
            continue
        seen = True
        sq = float(p.grad.detach().float().square().sum())
        if getattr(p, "allreduce", True) is False:
            expert_sq += sq
        else:
            shared_sq += sq
    if not seen:
        return None
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world > 1:
        (expert_sq,) = all_reduce([expert_sq])
        expert_sq /= world // ep_size
    return (shared_sq + expert_sq) ** 0.5
