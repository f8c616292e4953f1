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

import os
from dataclasses import dataclass
from typing import Any

import torch

from ecdit_cli import deepspeed_compat, devices
from ecdit_cli.config import RunConfig
from ecdit_cli.devices import resolve_device
from ecdit_cli.errors import ConfigError, EcditError
from ecdit_cli.train.launch import free_port


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_precision(cfg: RunConfig, device: str) -> str:
    """The run's precision on `device` (devices.resolve_precision: auto is bf16 on CUDA)."""
    return devices.resolve_precision(cfg.train.precision, device)


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
    device = resolve_device(cfg.train.device, "train.device")
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    elif world > 1 and device == "cpu":
        # Processes sharing a node split its cores instead of oversubscribing them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))

    deepspeed_compat.init_distributed("nccl" if device == "cuda" else "gloo",
                                      None if launched else f"tcp://127.0.0.1:{free_port()}")
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


def clips_by_hand(cfg: RunConfig, precision: str) -> bool:
    """Whether the trainer clips gradients itself instead of DeepSpeed.

    Without ZeRO in fp32, DeepSpeed clips by the mean over ranks of each rank's own norm (shared
    parameters plus its local experts), which under expert parallelism is not the global norm,
    so a clipped step on two processes would differ from the step on one. There the trainer
    clips by `grad_norm` (experts counted once each). Elsewhere DeepSpeed's clipping stays: on one
    expert-parallel rank the two agree, and ZeRO / bf16 hold the gradients themselves."""
    return (cfg.moe.is_moe and cfg.moe.ep_size > 1 and cfg.train.zero_stage == 0 and precision == "fp32"
            and cfg.train.grad_clip > 0)


def clip_gradients(model: torch.nn.Module, max_norm: float, norm: float) -> None:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)), as DeepSpeed's clip does."""
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)


def deepspeed_config(cfg: RunConfig, world_size: int, precision: str) -> dict[str, Any]:
    micro, accum = batch_layout(cfg, world_size)
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 0.0 if clips_by_hand(cfg, precision) else cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "steps_per_print": 2**31 - 1,  # progress is ours
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """A torch optimizer over DeepSpeed's MoE parameter groups (experts apart from shared)."""
    t = cfg.train
    groups = deepspeed_compat.moe_param_groups([p for p in model.parameters() if p.requires_grad])
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    return torch.optim.RMSprop(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def build_engine(cfg: RunConfig, model: torch.nn.Module, precision: str, world_size: int):
    if cfg.moe.is_moe and world_size % cfg.moe.ep_size:
        raise ConfigError(
            f"moe.ep_size={cfg.moe.ep_size} is invalid: must divide the number of processes ({world_size})"
        )
    optimizer = build_optimizer(cfg, model)
    try:
        engine = deepspeed_compat.initialize(model, optimizer, deepspeed_config(cfg, world_size, precision))
    except AssertionError as err:
        # E.g. ZeRO-3 with native MoE layers ("MoE not supported with Stage 3").
        raise EcditError(f"DeepSpeed refused the configuration: {err}") from None
    if cfg.moe.is_moe:
        ep_rank = deepspeed_compat.expert_parallel_rank(cfg.moe.ep_size)
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
    if torch.distributed.get_backend(group) == "nccl":
        t = t.cuda()  # NCCL reduces device tensors only
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX,
                                 group=group)
    return t.tolist()


def grad_square_sums(model: torch.nn.Module) -> tuple[torch.Tensor | None, int]:
    """(per-tensor sums of squared gradients in fp32, shared parameters first, then experts;
    how many are shared), on the device; (None, 0) when ZeRO holds the gradients.

    Expert parameters are the ones DeepSpeed marks `allreduce = False`."""
    shared, expert = [], []
    for p in model.parameters():
        if p.grad is not None:
            (expert if getattr(p, "allreduce", True) is False else shared).append(p.grad.detach().float())
    if not shared and not expert:
        return None, 0
    return torch.stack([g.square().sum() for g in shared + expert]), len(shared)


def norm_from_sums(sums: list[float], n_shared: int, ep_size: int) -> float:
    """Global L2 norm from `grad_square_sums` read back to the host (a collective on many processes).

    Shared parameters are identical on every rank after the all-reduce; expert parameters are
    distinct across expert-parallel ranks and replicated world/ep times, so their squares are
    summed over the world and divided by the replica count. The sums are added up in Python in
    parameter order (the order a per-tensor loop would add them in: the same float)."""
    return norms_from_sums([sums], n_shared, ep_size)[0]


def norms_from_sums(steps: list[list[float]], n_shared: int, ep_size: int) -> list[float]:
    """`norm_from_sums` of several steps, with one collective for all of them."""
    shared_sq = [sum(s[:n_shared]) for s in steps]
    expert_sq = [sum(s[n_shared:]) for s in steps]
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world > 1:
        expert_sq = [x / (world // ep_size) for x in all_reduce(expert_sq)]
    return [(a + b) ** 0.5 for a, b in zip(shared_sq, expert_sq, strict=True)]

