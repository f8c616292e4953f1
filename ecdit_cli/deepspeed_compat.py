"""Everything ecdit takes from DeepSpeed, in one place (deepspeed >= 0.19.4, < 0.20).

The rest of the package calls these functions instead of importing DeepSpeed's modules, so a
DeepSpeed upgrade is checked here. What each relies on is in docs/deepspeed.md:

- `import_deepspeed`: the accelerator is named before the first import (left to guess on a
  machine without GPUs DeepSpeed logs a warning on every start) and its INFO logging is
  silenced (our own logging says what matters);
- `moe_classes`: `deepspeed.moe.layer.MoE`, the class the engine recognises as an MoE layer
  (expert-parallel groups, MoE optimizer groups), and `MOELayer`, its dispatch / all-to-all /
  combine, which calls our router through the 0.19.4+ sparse-route gate contract;
- `init_distributed`: gloo or nccl through DeepSpeed, without the shared-memory op it would
  otherwise JIT-compile for CPU all-reduces;
- expert-parallel groups by the name DeepSpeed gives them (`ep_size_<N>`), and the MoE
  parameter groups of an optimizer;
- `all_to_all_class`: the autograd function MOELayer exchanges tokens with (benchmarks time it).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any


def import_deepspeed():
    """The `deepspeed` module, imported with the accelerator set and its logging quiet."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    return deepspeed


def version() -> str | None:
    try:
        return import_deepspeed().__version__
    except ImportError:
        return None


def moe_classes() -> tuple[type, type]:
    """(deepspeed.moe.layer.MoE, deepspeed.moe.sharded_moe.MOELayer)."""
    import_deepspeed()
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.sharded_moe import MOELayer

    return MoE, MOELayer


def all_to_all_class() -> type:
    import_deepspeed()
    from deepspeed.moe import sharded_moe

    return sharded_moe._AllToAll


def init_distributed(backend: str, init_method: str | None = None) -> None:
    """torch.distributed through DeepSpeed; `init_method` (a tcp:// address) makes a world of one.

    On the CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op on its first init (30-100 s
    with gcc on a 2-core machine); gloo is all these runs need, so the build is skipped unless
    ECDIT_DS_SHM=1.
    """
    import importlib

    deepspeed = import_deepspeed()
    importlib.import_module("deepspeed.comm.torch")  # the module, not torch: see sys.modules below

    logging.getLogger("torch.distributed").setLevel(logging.ERROR)
    if backend == "gloo" and os.environ.get("ECDIT_DS_SHM") != "1":
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    import torch

    if torch.distributed.is_initialized():
        return
    if init_method is None:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    else:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   init_method=init_method, rank=0, world_size=1)


def initialize(model, optimizer, config: dict[str, Any]):
    """`deepspeed.initialize` -> the engine. DeepSpeed print()s its MoE group creation on every
    rank; that output is swallowed (progress output is ours)."""
    import contextlib
    import io

    deepspeed = import_deepspeed()
    with contextlib.redirect_stdout(io.StringIO()):
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    skip_single_process_allreduce(engine)
    return engine


def skip_single_process_allreduce(engine) -> None:
    """In a world of one process without ZeRO, DeepSpeed still flattens every gradient into
    buckets, all-reduces them over a group of one and copies them back after each backward:
    an identity that cost about 3% of a tiny-preset step (profiled). `enable_backward_allreduce`
    is the engine's own switch for it (pipeline parallelism turns it off the same way).

    The reduction has one side effect that training relies on: it gives every parameter without
    a gradient (the null caption when no caption was dropped, unused word embeddings) a zero
    gradient, so the optimizer still steps it with its momentum. `fill_missing_grads` keeps that
    behaviour when the reduction is skipped (without it the loss curves change after a few tens
    of steps)."""
    import torch

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False


def fill_missing_grads(module) -> None:
    """What DeepSpeed's gradient reduction does to parameters without a gradient: zeros."""
    import torch

    for p in module.parameters():
        if p.requires_grad and p.grad is None and p.numel():
            p.grad = torch.zeros_like(p)


def expert_group_name(ep_size: int) -> str:
    """The name DeepSpeed gives the expert-parallel group of size `ep_size` (its parameters'
    `group_name`, and the key of its process groups)."""
    return f"ep_size_{ep_size}"


def expert_parallel_rank(ep_size: int) -> int:
    from deepspeed.utils import groups

    return groups._get_expert_parallel_rank(expert_group_name(ep_size))


def expert_parallel_group(ep_size: int):
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(expert_group_name(ep_size))


def moe_param_groups(params: list) -> list[dict[str, Any]]:
    """Optimizer parameter groups with expert parameters apart from shared ones (ZeRO-1/2 need it)."""
    import_deepspeed()
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer({"params": params, "name": "params"})
