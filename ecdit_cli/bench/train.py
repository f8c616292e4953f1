"""`ecdit bench train`: the whole training loop next to its engine step and plain PyTorch, side by side.

Per routing of one preset, in one process, for `rounds` rounds:

- **full loop**: a real `train()` run of `steps` steps at the demo's settings (data, logging every
  10 steps, validation every 100, checkpoints every 200, EMA), timed from the end of its first
  step to the end of its last: images/s with everything a run does per step amortised;
- **engine step**: the same model on its DeepSpeed engine, one step of ecdit's step code
  (`train/step.py`) on a fixed batch: no data, no logging;
- **plain loop**: an identically initialised copy of the model in a plain PyTorch loop (AdamW,
  `clip_grad_norm_`, no DeepSpeed);
- **plain DiT**: `plain_dit.PlainDiT` of the same width, depth and heads (dense FFNs, no text
  encoder), the same plain loop;
- **sgemm**: one matmul of the FFN's dominant shape (tokens x D x 4D), the machine's ceiling;
- **compiled engine step** (`--compile` only): the engine step of a third identically initialised
  model whose engine ran `engine.compile()` (what `train.compile=true` does), against the
  uncompiled one. Its first call compiles (inductor; about 100 s for the debug expert-choice
  model on this 2-core machine), which the warm-up call absorbs.

The four timed steps run interleaved after each full-loop round, so a slow spell of the machine
hits them alike; ratios are per-round paired ratios, reported as medians with IQR. Start-up is
the wall time of a whole `ecdit train` process of one step (minus that step), next to the time of
`import deepspeed` alone. Targets (issue "Training throughput") are marked met or not.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ecdit_cli.bench.timing import interleaved, load_average, machine_info, summary
from ecdit_cli.config import RunConfig, resolve_config
from ecdit_cli.errors import EcditError
from ecdit_cli.model.accounting import count

STEPS = ("engine step", "plain loop", "plain DiT", "sgemm")
COMPILED = "compiled engine step"  # with --compile
# The demo's logging settings (sweeps/demo.yaml), so the full loop pays what a demo run pays.
DEMO_TRAIN = ["train.log_every=10", "train.val_every=100", "train.ckpt_every=200", "data.val_size=64",
              "train.lr=1e-3", "train.warmup_steps=25"]
TARGETS = {
    "full loop / engine step": 1.05,
    "engine step / plain loop": 1.05,
    "plain loop / plain DiT (per FLOP)": 1.10,
    "EC / dense engine step per activated FLOP": 1.10,
    "start-up beyond import deepspeed (s)": 3.0,
    "ecdit train process / plain script": 1.25,
}


def train_config(preset: str, routing: str, steps: int, batch: int, overrides: list[str] | None = None) -> RunConfig:
    return resolve_config(preset=preset, overrides=[f"moe.routing={routing}", f"train.steps={steps}",
                                                    f"train.batch_size={batch}", "train.micro_batch_size=0",
                                                    "train.device=cpu", *DEMO_TRAIN, *(overrides or [])])


class _Models:
    """The engine model, its plain-loop twin and the plain DiT, each with a fixed batch."""

    def __init__(self, cfg: RunConfig, compile: bool = False) -> None:
        from ecdit_cli.bench.plain_dit import PlainDiT
        from ecdit_cli.data.sources import make_source
        from ecdit_cli.model.t2i import TextToImage
        from ecdit_cli.train.engine import build_engine, setup_distributed
        from ecdit_cli.train.step import StepContext, micro_batch_inputs

        self.cfg = cfg
        dist = setup_distributed(cfg)
        d = cfg.data
        source = make_source(d.source, image_size=cfg.model.input_size, channels=cfg.model.in_channels,
                             min_objects=d.min_objects, max_objects=d.max_objects, seed=d.seed)
        torch.manual_seed(cfg.train.seed)
        self.model = TextToImage(cfg, source.vocabulary())
        torch.manual_seed(cfg.train.seed)
        self.twin = TextToImage(cfg, source.vocabulary())
        self.engine = build_engine(cfg, self.model, "fp32", 1)
        B = cfg.train.batch_size
        self.ctx = StepContext(cfg, self.engine, self.model, source, dist, B, 1, torch.float32)
        self.batch = micro_batch_inputs(self.ctx, 0, 0)
        self.compiled_ctx = None
        if compile:
            torch.manual_seed(cfg.train.seed)
            compiled_model = TextToImage(cfg, source.vocabulary())
            compiled_engine = build_engine(cfg, compiled_model, "fp32", 1)
            compiled_engine.compile()  # as train.compile does (loop.py)
            self.compiled_ctx = StepContext(cfg, compiled_engine, compiled_model, source, dist, B, 1, torch.float32)
        t = cfg.train
        self.twin_opt = torch.optim.AdamW(self.twin.parameters(), lr=t.lr, betas=(t.beta1, t.beta2),
                                          weight_decay=t.weight_decay)
        torch.manual_seed(cfg.train.seed)
        self.plain = PlainDiT(cfg)
        self.plain_opt = torch.optim.AdamW(self.plain.parameters(), lr=t.lr, betas=(t.beta1, t.beta2))
        self.text_states = torch.randn(B, cfg.text.max_len, cfg.text.width, generator=torch.Generator().manual_seed(0))
        m = cfg.model
        tokens, D = B * m.tokens_per_image, m.hidden_size
        self.a, self.b = torch.randn(tokens, D), torch.randn(D, m.mlp_hidden)
        self.sgemm_flops = 2 * tokens * D * m.mlp_hidden

    def engine_step(self) -> None:
        from ecdit_cli.train.step import forward_backward, optimizer_step

        forward_backward(self.ctx, 0, inputs=lambda ctx, step, m: self.batch)
        optimizer_step(self.engine, self.cfg.train.lr)

    def compiled_engine_step(self) -> None:
        from ecdit_cli.train.step import forward_backward, optimizer_step

        forward_backward(self.compiled_ctx, 0, inputs=lambda ctx, step, m: self.batch)
        optimizer_step(self.compiled_ctx.engine, self.cfg.train.lr)

    def plain_loop(self) -> None:
        x_t, t, text, mask, drop, v = self.batch
        out = self.twin(x_t, t, text, mask, drop)
        loss = (out.velocity - v).square().mean()
        aux = [r.aux_loss for r in out.routing if r.aux_loss is not None]
        if aux:
            loss = loss + self.cfg.moe.aux_loss_weight * torch.stack(aux).mean()
        self._plain_update(self.twin, self.twin_opt, loss)

    def plain_dit(self) -> None:
        x_t, t, _, _, _, v = self.batch
        loss = (self.plain(x_t, t, self.text_states) - v).square().mean()
        self._plain_update(self.plain, self.plain_opt, loss)

    def _plain_update(self, model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        loss.backward()
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sgemm(self) -> None:
        torch.mm(self.a, self.b)

    def fns(self) -> dict[str, Callable[[], None]]:
        fns = {"engine step": self.engine_step, "plain loop": self.plain_loop, "plain DiT": self.plain_dit,
               "sgemm": self.sgemm}
        if self.compiled_ctx is not None:
            fns[COMPILED] = self.compiled_engine_step
        return fns


def _full_loop(cfg: RunConfig, root: Path) -> dict[str, float]:
    """One real run: seconds from the call to the first step's end, and per step after it."""
    from ecdit_cli.train.loop import train
    from ecdit_cli.train.records import Callbacks

    marks: dict[int, float] = {}
    t0 = time.perf_counter()
    train(cfg, root, Callbacks(on_step=lambda step, info: marks.__setitem__(step, time.perf_counter())))
    steps = cfg.train.steps
    return {"setup_s": marks[1] - t0, "step_s": (marks[steps] - marks[1]) / (steps - 1)}


def _startup(preset: str, routing: str, batch: int, overrides: list[str]) -> dict[str, float]:
    """Wall seconds of `import deepspeed` alone and of a whole one-step `ecdit train` process."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "from ecdit_cli import deepspeed_compat; deepspeed_compat.import_deepspeed()"],
                       check=True, capture_output=True)
        t_ds = time.perf_counter() - t0
        args = [sys.executable, "-m", "ecdit_cli", "train", preset, "-q", "--out", str(Path(tmp) / "run")]
        for o in [f"moe.routing={routing}", "train.steps=1", f"train.batch_size={batch}", *DEMO_TRAIN, *overrides]:
            args += ["--set", o]
        t0 = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True)
        t_run = time.perf_counter() - t0
    if proc.returncode != 0:
        raise EcditError(f"the start-up run failed: {proc.stderr.strip().splitlines()[-1:]}")
    return {"import_deepspeed_s": t_ds, "one_step_process_s": t_run}


def _whole_processes(preset: str, routing: str, steps: int, batch: int, overrides: list[str],
                     root: Path) -> dict[str, float]:
    """Wall seconds of a whole `ecdit train` process and of `plain_script` for the same steps and batch.

    Both run from process start to exit (imports, set-up, data, the loop, the final save); the
    ecdit run pays everything a real run does (validation, EMA, checkpoints, summaries)."""
    sets = [f"moe.routing={routing}", f"train.steps={steps}", f"train.batch_size={batch}", *DEMO_TRAIN, *overrides]
    ecdit = [sys.executable, "-m", "ecdit_cli", "train", preset, "-q", "--out", str(root / "ecdit")]
    for o in sets:
        ecdit += ["--set", o]
    plain = [sys.executable, "-m", "ecdit_cli.bench.plain_script", preset, str(steps), str(batch),
             str(root / "plain.pt"), *DEMO_TRAIN, *overrides]
    out = {}
    for name, args in (("ecdit_train_process_s", ecdit), ("plain_script_process_s", plain)):
        t0 = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True)
        out[name] = time.perf_counter() - t0
        if proc.returncode != 0:
            raise EcditError(f"the whole-process run ({name}) failed: {proc.stderr.strip().splitlines()[-1:]}")
    return out


def _ratios(a: list[float], b: list[float]) -> dict[str, float]:
    s = summary([x / y for x, y in zip(a, b, strict=True)])
    return {"median": s["median"], "iqr": s["iqr"]}


def bench_train(preset: str = "tiny", routings: tuple[str, ...] = ("dense", "expert_choice"), steps: int = 200,
                rounds: int = 3, reps: int = 10, batch: int = 32, overrides: list[str] | None = None,
                startup: bool = True, whole: bool = True, compile: bool = False,
                on_progress: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    if steps < 2 or rounds < 1 or reps < 1 or batch < 1:
        raise EcditError(f"steps={steps}, rounds={rounds}, reps={reps}, batch={batch} are invalid: "
                         "steps must be >= 2 and the others >= 1")
    overrides = list(overrides or [])
    machine = machine_info(torch.device("cpu"), torch.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for routing in routings:
            cfg = train_config(preset, routing, steps, batch, overrides)
            on_progress(f"{preset} {routing}: building the engine, plain and reference models")
            models = _Models(cfg, compile)
            timed = (*STEPS, COMPILED) if compile else STEPS
            per_step: dict[str, list[float]] = {name: [] for name in ("full loop", *timed)}
            setups = []
            processes: dict[str, list[float]] = {"ecdit_train_process_s": [], "plain_script_process_s": []}
            for r in range(rounds):
                on_progress(f"{preset} {routing}: round {r + 1}/{rounds}: a {steps}-step run, then "
                            f"{len(timed)} steps x {reps} interleaved" + (" (the first compiled step compiles)"
                                                                          if compile and r == 0 else ""))
                full = _full_loop(cfg, Path(tmp) / f"{routing}-{r}")
                per_step["full loop"].append(full["step_s"])
                setups.append(full["setup_s"])
                times = interleaved(models.fns(), reps, warmup=1 if r == 0 else 0)
                for name in timed:
                    per_step[name].append(summary(times[name])["median"])
                if whole:
                    on_progress(f"{preset} {routing}: round {r + 1}/{rounds}: a whole `ecdit train` process, "
                                "then the plain script")
                    for k, v in _whole_processes(preset, routing, steps, batch, overrides,
                                                 Path(tmp) / f"whole-{routing}-{r}").items():
                        processes[k].append(v)
            acc = count(cfg, vocab_size=len(models.model.tokenizer.vocab))
            dense_flops = count(train_config(preset, "dense", steps, batch, overrides)).flops_per_image
            row: dict[str, Any] = {
                "preset": preset, "routing": routing, "batch": batch, "flops_per_image": acc.flops_per_image,
                "dense_flops_per_image": dense_flops,
                **{f"{name} ms": 1e3 * summary(v)["median"] for name, v in per_step.items()},
                "full loop images/s": batch / summary(per_step["full loop"])["median"],
                "engine GFLOP/s": acc.train_flops(batch) / summary(per_step["engine step"])["median"] / 1e9,
                "sgemm GFLOP/s": models.sgemm_flops / summary(per_step["sgemm"])["median"] / 1e9,
                "in-process set-up s": summary(setups)["median"],
                "full loop / engine step": _ratios(per_step["full loop"], per_step["engine step"]),
                "engine step / plain loop": _ratios(per_step["engine step"], per_step["plain loop"]),
                "plain loop / plain DiT": _ratios(per_step["plain loop"], per_step["plain DiT"]),
            }
            if compile:
                row["compiled / engine step"] = _ratios(per_step[COMPILED], per_step["engine step"])
            # The plain DiT is dense: compare per FLOP (an MoE model does more work per image).
            row["plain loop / plain DiT (per FLOP)"] = {
                k: v / (acc.flops_per_image / dense_flops) for k, v in row["plain loop / plain DiT"].items()}
            if whole:
                row["whole process"] = {k: summary(v)["median"] for k, v in processes.items()}
                # The plain script trains a dense DiT: an MoE row's ratio includes its extra FLOPs.
                row["ecdit train process / plain script"] = _ratios(processes["ecdit_train_process_s"],
                                                                     processes["plain_script_process_s"])
            if startup:
                on_progress(f"{preset} {routing}: start-up (a one-step `ecdit train` process)")
                s = _startup(preset, routing, batch, overrides)
                s["beyond_import_deepspeed_s"] = s["one_step_process_s"] - s["import_deepspeed_s"] - row["full loop ms"] / 1e3
                row["startup"] = s
            rows.append(row)
            del models
    by = {r["routing"]: r for r in rows}
    if "dense" in by and "expert_choice" in by:
        ec, de = by["expert_choice"], by["dense"]
        by["expert_choice"]["EC / dense engine step per activated FLOP"] = (
            (ec["engine step ms"] / ec["flops_per_image"]) / (de["engine step ms"] / de["flops_per_image"]))
    return {"kind": "train", "machine": machine, "load_avg_end": load_average(),
            "settings": {"preset": preset, "routings": list(routings), "steps": steps, "rounds": rounds,
                         "reps": reps, "batch": batch, "overrides": overrides, "demo_train": DEMO_TRAIN,
                         "compile": compile},
            "targets": TARGETS, "rows": rows}


def target_status(row: dict[str, Any]) -> dict[str, tuple[float | None, bool | None]]:
    """Each target's value for one row and whether it is met (None: not measured for this row)."""
    out = {}
    for name, limit in TARGETS.items():
        if name.startswith("start-up"):
            v = row.get("startup", {}).get("beyond_import_deepspeed_s")
        else:
            v = row.get(name)
            v = v["median"] if isinstance(v, dict) else v
        out[name] = (v, None if v is None else v <= limit)
    return out
