"""One process of the expert-parallel benchmark (run alone or under torch.distributed.run).

    python -m ecdit_cli.bench.ep_worker OUT.json --preset P --batch B --reps N --warmup W --ep EP [--set K=V]

Builds the expert-choice model of preset P with moe.ep_size = EP on the DeepSpeed engine, runs
W + N training steps on a fixed batch (B images over all processes), and times each step and
the all-to-all calls inside it (DeepSpeed's `_AllToAll`, forward and backward). Rank 0 writes
medians over steps to OUT.json: step_ms (slowest rank), images_per_s, a2a_ms and a2a_share
(mean over ranks), threads per process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


class AllToAllTimer:
    """Accumulates the seconds spent in DeepSpeed's `_AllToAll.forward` (its backward calls it too)."""

    def __init__(self) -> None:
        from ecdit_cli import deepspeed_compat

        self.seconds = 0.0
        self.calls = 0
        self._cls = deepspeed_compat.all_to_all_class()
        self._orig = self._cls.forward
        orig = self._orig

        def timed(ctx, group, input):
            t0 = time.perf_counter()
            out = orig(ctx, group, input)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return out

        self._cls.forward = staticmethod(timed)

    def restore(self) -> None:
        self._cls.forward = staticmethod(self._orig)


def run(out: str, preset: str, overrides: list[str], batch: int, reps: int, warmup: int, ep: int,
        deepspeed_layer: bool) -> None:
    import torch

    from ecdit_cli.bench.step import _Bench
    from ecdit_cli.config import resolve_config
    from ecdit_cli.train.engine import setup_distributed

    cfg = resolve_config(preset=preset, overrides=[
        *overrides, "moe.routing=expert_choice", f"moe.ep_size={ep}", f"moe.deepspeed_layer={str(deepspeed_layer).lower()}",
        f"train.batch_size={batch}", "train.micro_batch_size=0", "train.zero_stage=0", "train.device=cpu",
        "train.precision=fp32",
    ])
    dist = setup_distributed(cfg)
    world = dist.world_size
    if world != ep:
        raise SystemExit(f"ep_worker: --ep {ep} needs {ep} processes, got {world}")
    # Each process gets its share of the batch and holds its share of the experts.
    bench = _Bench(cfg, torch.device("cpu"), torch.float32, ep_rank=dist.rank % ep, rank=dist.rank, world=world)
    timer = AllToAllTimer()
    try:
        for _ in range(warmup):
            bench.train_step()
        steps, a2a = [], []
        for _ in range(reps):
            if world > 1:
                torch.distributed.barrier()
            timer.seconds = 0.0
            t0 = time.perf_counter()
            bench.train_step()
            steps.append(time.perf_counter() - t0)
            a2a.append(timer.seconds)
    finally:
        timer.restore()
    per_rank = [(steps, a2a, torch.get_num_threads())]
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, per_rank[0])
        per_rank = gathered
    if dist.rank == 0:
        # The step of all ranks ends with the slowest one.
        step_max = [max(r[0][i] for r in per_rank) for i in range(reps)]
        step_s = statistics.median(step_max)
        a2a_s = statistics.mean(statistics.median(r[1]) for r in per_rank)
        share = statistics.mean(statistics.median(a / s for a, s in zip(r[1], r[0], strict=True)) for r in per_rank)
        result = {
            "processes": world, "ep_size": ep, "deepspeed_layer": deepspeed_layer or ep > 1,
            "threads_per_process": per_rank[0][2], "step_ms": 1e3 * step_s, "images_per_s": batch / step_s,
            "a2a_ms": 1e3 * a2a_s, "a2a_share": share, "a2a_calls_per_step": timer.calls // max(1, reps + warmup),
            "steps_ms": [1e3 * s for s in step_max],
        }
        with open(out, "w") as f:
            json.dump(result, f)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ecdit_cli.bench.ep_worker")
    p.add_argument("out")
    p.add_argument("--preset", default="medium")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--deepspeed-layer", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)  # the deepspeed launcher passes it
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    run(a.out, a.preset, a.overrides, a.batch, a.reps, a.warmup, a.ep, a.deepspeed_layer)


if __name__ == "__main__":
    main()
