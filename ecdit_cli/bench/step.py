"""Whole-model benchmarks: a training step on the DeepSpeed engine, and one sampling step.

Four models of one preset, built exactly as training builds them (TextToImage on a DeepSpeed
engine, the optimizer and gradient clipping of the run config):

- `dense_flops`: dense, every FFN widened (`moe.dense_width_mult` from
  `accounting.dense_width_for_flops`) to the activated FLOPs per image of the MoE models: the
  reference (ratio 1.0) for training throughput;
- `token_choice`, `expert_choice`: the MoE models (every other block MoE, f = 2 / top-2);
- `dense`: the backbone-matched dense model (width 1.0), the baseline of the paper's inference
  overhead: it measured 20-28% for EC-DiT against a theoretical 3-15% from activated FLOPs.

A training step is forward, loss (MSE + the weighted auxiliary losses, as train/loop.py),
`engine.backward`, `engine.step`; a sampling step is one forward at batch B without autograd
(classifier-free guidance would double both models' batches alike). Models are timed
interleaved. On a GPU, model FLOP utilisation = accounting FLOPs per second / the device's peak
(peaks.py: a table of known GPUs, or `peak_tflops`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ecdit_cli.bench.peaks import mfu, resolve_peak
from ecdit_cli.bench.timing import (
    default_dtype,
    interleaved,
    load_average,
    machine_info,
    paired_ratio,
    summary,
)
from ecdit_cli.config import RunConfig, resolve_config
from ecdit_cli.errors import EcditError
from ecdit_cli.model.accounting import count, dense_width_for_flops

MODELS = ("dense_flops", "token_choice", "expert_choice", "dense")
MODEL_LABELS = {
    "dense_flops": "dense, FLOP-matched width (reference)",
    "token_choice": "token choice top-2",
    "expert_choice": "expert choice f=2",
    "dense": "dense, backbone width (1.0)",
}


def step_configs(preset: str, overrides: list[str], batch: int, device: torch.device,
                 width_multiple: int = 64) -> dict[str, RunConfig]:
    """The four configs, equal but for their FFNs; `dense_flops` matched to EC's activated FLOPs.

    The matched FFN hidden width is rounded to a multiple of `width_multiple` (1 = exact match):
    an odd width such as 770 runs ~20% slower per FLOP than 768 in the CPU's GEMMs (measured),
    which would flatter every MoE ratio; the rounding moves the FLOPs by well under 1%, and each
    row reports its own FLOPs.
    """
    precision = "bf16" if default_dtype(device) == torch.bfloat16 else "fp32"
    common = [*overrides, f"train.batch_size={batch}", "train.micro_batch_size=0", "train.zero_stage=0",
              f"train.device={device.type}", f"train.precision={precision}"]
    moe_overrides = [o for o in overrides if o.startswith("moe.routing=")]
    if moe_overrides:
        raise EcditError("moe.routing is set by the benchmark (it builds dense, token-choice and expert-choice models)")
    cfgs = {
        "token_choice": resolve_config(preset=preset, overrides=[*common, "moe.routing=token_choice"]),
        "expert_choice": resolve_config(preset=preset, overrides=[*common, "moe.routing=expert_choice"]),
        "dense": resolve_config(preset=preset, overrides=[*common, "moe.routing=dense"]),
    }
    target = count(cfgs["expert_choice"]).flops_per_image
    mult = dense_width_for_flops(cfgs["dense"], target)
    if width_multiple > 1:
        hidden = cfgs["dense"].model.mlp_hidden
        mult = max(width_multiple, round(hidden * mult / width_multiple) * width_multiple) / hidden
    cfgs["dense_flops"] = resolve_config(preset=preset, overrides=[*common, "moe.routing=dense",
                                                                   f"moe.dense_width_mult={mult!r}"])
    return {name: cfgs[name] for name in MODELS}


class _Bench:
    """One model on its engine, with a fixed synthetic batch (this process's share of it)."""

    def __init__(self, cfg: RunConfig, device: torch.device, dtype: torch.dtype, ep_rank: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        from ecdit_cli.data.scenes import vocabulary
        from ecdit_cli.model.rectified_flow import interpolate
        from ecdit_cli.model.t2i import TextToImage
        from ecdit_cli.train.engine import build_engine

        self.cfg = cfg
        torch.manual_seed(cfg.train.seed)
        self.model = TextToImage(cfg, vocabulary(), ep_rank=ep_rank)
        self.engine = build_engine(cfg, self.model, "bf16" if dtype == torch.bfloat16 else "fp32", world)
        m, B = cfg.model, cfg.train.batch_size
        g = torch.Generator().manual_seed(0)
        x0 = torch.rand(B, m.in_channels, m.input_size, m.input_size, generator=g) * 2 - 1
        noise = torch.randn(x0.shape, generator=g)
        t = torch.rand(B, generator=g)
        x_t, v = interpolate(x0, noise, t)
        part = slice(rank * B // world, (rank + 1) * B // world)
        x_t, v, t = x_t[part], v[part], t[part]
        words = ["a red circle", "two blue squares", "a green triangle left of a white circle"]
        text, mask = self.model.tokenize([words[i % len(words)] for i in range(x_t.shape[0])])
        self.inputs = (x_t.to(device, dtype), t.to(device), text.to(device), mask.to(device))
        self.target = v.to(device)

    def train_step(self) -> None:
        out = self.engine(*self.inputs)
        loss = (out.velocity.float() - self.target).square().mean()
        aux = [r.aux_loss for r in out.routing if r.aux_loss is not None]
        if aux:
            moe = self.cfg.moe
            loss = loss + moe.aux_loss_weight * torch.stack(aux).mean()
            if moe.z_loss_weight:
                loss = loss + moe.z_loss_weight * torch.stack([r.z_loss for r in out.routing]).mean()
        self.engine.backward(loss)
        self.engine.step()

    @torch.no_grad()
    def sample_step(self) -> None:
        self.engine.module(*self.inputs)


def bench_step(preset: str = "medium", overrides: list[str] | None = None, batch: int = 32, reps: int = 10,
               warmup: int = 1, device: torch.device | None = None, peak_tflops: float | None = None,
               width_multiple: int = 64, sample_reps: int | None = None,
               on_progress: Callable[[str], None] = lambda msg: None) -> dict:
    """Training-step and sampling-step times of the four models, interleaved; see the module doc.

    `sample_reps` (default 3 x reps): sampling steps are cheap and noisier, so they get more rounds.
    """
    from ecdit_cli.train.engine import setup_distributed

    device = device or torch.device("cpu")
    dtype = default_dtype(device)
    sample_reps = sample_reps or 3 * reps
    if reps < 1 or batch < 1 or sample_reps < 1:
        raise EcditError(f"reps={reps}, batch={batch}, sample_reps={sample_reps} are invalid: all must be >= 1")
    if peak_tflops is not None and peak_tflops <= 0:
        raise EcditError(f"--peak-tflops {peak_tflops} is invalid: must be > 0")
    machine = machine_info(device, dtype)  # before the runs: the load average is other processes' load
    peak = resolve_peak(machine.get("gpu"), peak_tflops)  # a known GPU's own peak unless one is given
    peak_tflops = peak["peak_tflops"]
    cfgs = step_configs(preset, list(overrides or []), batch, device, width_multiple)
    setup_distributed(cfgs["dense"])
    benches = {}
    for name, cfg in cfgs.items():
        on_progress(f"building {name} ({cfg.model.hidden_size} wide, depth {cfg.model.depth}, batch {batch})")
        benches[name] = _Bench(cfg, device, dtype)
    on_progress(f"training steps: {len(benches)} models x {reps} interleaved reps")
    train_t = interleaved({n: b.train_step for n, b in benches.items()}, reps, warmup, device)
    for b in benches.values():
        b.engine.module.eval()
    on_progress(f"sampling steps: {len(benches)} models x {sample_reps} interleaved reps")
    infer_t = interleaved({n: b.sample_step for n, b in benches.items()}, sample_reps, warmup, device)

    rows = []
    for name, b in benches.items():
        acc = count(b.cfg, vocab_size=len(b.model.tokenizer.vocab))
        tr, inf = summary(train_t[name]), summary(infer_t[name])
        step_flops = acc.train_flops(batch)
        row = {
            "model": name, "label": MODEL_LABELS[name], "routing": b.cfg.moe.routing,
            "dense_width_mult": b.cfg.moe.dense_width_mult, "params_total": acc.params_total,
            "params_active": acc.params_active, "flops_per_image": acc.flops_per_image,
            "step_ms": 1e3 * tr["median"], "step_iqr_ms": 1e3 * tr["iqr"], "images_per_s": batch / tr["median"],
            "sample_ms": 1e3 * inf["median"], "sample_iqr_ms": 1e3 * inf["iqr"],
            "train_tflops": step_flops / tr["median"] / 1e12,
            "sample_tflops": acc.flops_per_image * batch / inf["median"] / 1e12,
        }
        if peak_tflops:
            row["train_mfu"] = mfu(step_flops, tr["median"], peak_tflops)
            row["sample_mfu"] = mfu(acc.flops_per_image * batch, inf["median"], peak_tflops)
        rows.append(row)
    base = next(r for r in rows if r["model"] == "dense")
    for r in rows:
        r["step_ratio"] = paired_ratio(train_t, r["model"], "dense_flops")
        r["sample_ratio"] = paired_ratio(infer_t, r["model"], "dense_flops")
        # Inference overhead against the backbone-matched dense model, measured and from FLOPs.
        r["sample_overhead"] = paired_ratio(infer_t, r["model"], "dense") - 1
        r["theory_overhead"] = r["flops_per_image"] / base["flops_per_image"] - 1
    first = cfgs["expert_choice"]
    return {
        "kind": "step",
        "machine": machine,
        "settings": {
            "preset": preset, "overrides": list(overrides or []), "batch": batch, "reps": reps,
            "sample_reps": sample_reps, "warmup": warmup,
            "hidden_size": first.model.hidden_size, "depth": first.model.depth,
            "tokens_per_image": first.model.tokens_per_image, "num_experts": first.moe.num_experts,
            "capacity_factor": first.moe.capacity_factor, "optimizer": first.train.optimizer,
            "peak_tflops": peak_tflops, "peak_note": peak["peak_note"], "width_multiple": width_multiple,
        },
        "rows": rows,
        "load_avg_1m_end": load_average(),
    }
