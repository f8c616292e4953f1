"""GPU readiness without a GPU: the training step reads nothing back from the device between log
steps, deferred finiteness checks log what per-step checks log, and bf16 (the CUDA default) runs.

The accelerator's code path is run on the CPU by patching `devices.syncs_are_free` (the one
switch between the two), and host reads are counted by patching the tensor methods and torch
functions that wait for a CUDA device when ecdit's own code calls them."""

import math
import sys
from pathlib import Path

import pytest
import torch

from ecdit_cli import devices, rundir
from ecdit_cli.config import resolve_config
from ecdit_cli.files import read_jsonl
from ecdit_cli.model.routing import count_indices, expert_choice, token_choice
from ecdit_cli.train.loop import TrainingFailed, train
from ecdit_cli.train.records import Callbacks

TIMING = {"images_per_s", "wall_time_s"}
BASE = ["train.batch_size=8", "data.val_size=8", "train.warmup_steps=2", "train.val_timesteps=2",
        "train.threads=1", "data.prefetch=off"]

# Tensor methods that copy a value to the host (on CUDA: wait for every queued kernel first), and
# torch functions whose output size depends on the data (CUDA reads it back to allocate it).
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")
SIZING_OPS = ("bincount", "nonzero", "unique", "masked_select", "repeat_interleave")


def cfg_for(routing, *extra):
    return resolve_config(preset="debug", overrides=[f"moe.routing={routing}", *BASE, *extra])


def count_host_reads(monkeypatch) -> list[str]:
    """Patch the host reads; returns the list each call from ecdit_cli code appends 'name at file:line' to."""
    seen: list[str] = []

    def wrap(owner, name):
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            caller = sys._getframe(1)
            if "ecdit_cli" in caller.f_code.co_filename:
                seen.append(f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    for name in HOST_READS:
        wrap(torch.Tensor, name)
    for name in SIZING_OPS:
        wrap(torch, name)
        if hasattr(torch.Tensor, name):
            wrap(torch.Tensor, name)
    real_getitem = torch.Tensor.__getitem__

    def getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts):
            caller = sys._getframe(1)
            if "ecdit_cli" in caller.f_code.co_filename:
                seen.append(f"boolean index at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
        return real_getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)
    return seen


def metrics(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(Path(run_dir) / rundir.METRICS)]


def final_weights(run_dir):
    return torch.load(Path(run_dir) / rundir.FINAL_WEIGHTS, map_location="cpu", weights_only=False)["model"]


@pytest.mark.parametrize("routing", ["dense", "token_choice", "expert_choice"])
def test_steps_between_log_steps_read_nothing_back_from_the_device(tmp_path, monkeypatch, routing):
    monkeypatch.setattr(devices, "syncs_are_free", lambda device: False)  # the accelerator's code path
    cfg = cfg_for(routing, "train.steps=8", "train.log_every=4", "train.val_every=8", "train.ckpt_every=8",
                  "train.micro_batch_size=4")
    seen = count_host_reads(monkeypatch)
    per_step, mark = {}, [0]

    def on_step(step, info):
        per_step[step], mark[0] = seen[mark[0]:], len(seen)

    summary = train(cfg, tmp_path / "run", Callbacks(on_step=on_step))
    assert summary["status"] == "done"
    # Step 1 also holds the step-0 validation; step 8 validates and checkpoints after its on_step.
    assert {s: per_step[s] for s in (2, 3, 5, 6, 7)} == {s: [] for s in (2, 3, 5, 6, 7)}
    assert [r.split(" at ")[0] for r in per_step[4]] == ["tolist"]  # the log step: one transfer
    assert len(metrics(tmp_path / "run")) == 2 + 2  # two train records, two val records


def test_the_host_read_counter_sees_a_read_in_ecdit_code(monkeypatch):
    seen = count_host_reads(monkeypatch)
    logits = torch.randn(16, 4)
    r = expert_choice(logits, 8, 2.0)
    assert seen == []  # the router itself reads nothing back
    assert r.stats["ec_experts_per_token_mean"] == 2.0  # .stats reads (one transfer)
    assert any(s.startswith("tolist at routing.py") for s in seen)


@pytest.mark.parametrize("routing,extra", [("dense", []), ("token_choice", ["train.micro_batch_size=4"]),
                                           ("expert_choice", ["train.micro_batch_size=4"]),
                                           ("expert_choice", ["train.zero_stage=1"])])  # DeepSpeed's norm
def test_deferred_finiteness_checks_log_the_same_numbers_and_train_the_same_weights(tmp_path, monkeypatch,
                                                                                     routing, extra):
    from ecdit_cli.train import loop

    cfg = cfg_for(routing, "train.steps=7", "train.log_every=3", "train.val_every=4", "train.ckpt_every=5", *extra)
    train(cfg, tmp_path / "each_step")
    monkeypatch.setattr(loop, "checks_each_step", lambda *args: False)
    train(cfg, tmp_path / "deferred")
    assert metrics(tmp_path / "deferred") == metrics(tmp_path / "each_step")
    a, b = final_weights(tmp_path / "deferred"), final_weights(tmp_path / "each_step")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_deferred_non_finite_loss_fails_the_run_at_the_next_log_step_naming_the_bad_step(tmp_path, monkeypatch):
    from ecdit_cli.train import loop
    from ecdit_cli.train import step as step_module

    monkeypatch.setattr(loop, "checks_each_step", lambda *args: False)
    real = step_module.interpolate
    calls = {"n": 0}

    def poisoned(x0, noise, t):
        calls["n"] += 1
        x_t, v = real(x0, noise, t)
        return x_t, v * float("nan") if calls["n"] == 5 else v  # step 5's target

    monkeypatch.setattr(step_module, "interpolate", poisoned)
    finite_after = []
    real_step = loop.optimizer_step

    def watched(engine, lr):
        real_step(engine, lr)
        finite_after.append(all(bool(torch.isfinite(p).all()) for p in engine.module.parameters()))

    monkeypatch.setattr(loop, "optimizer_step", watched)
    cfg = cfg_for("expert_choice", "train.steps=12", "train.log_every=3", "train.val_every=6", "train.ckpt_every=4")
    with pytest.raises(TrainingFailed, match=r"non-finite loss \(nan\) at step 5 \(found at step 6"):
        train(cfg, tmp_path / "run")
    assert finite_after == [True] * 6  # the bad step's update was finite, and nothing ran past step 6
    summary = rundir.read_summary(tmp_path / "run")
    assert summary["status"] == "failed" and "step 5" in summary["error"]
    assert summary["last_metrics"]["step"] == 3  # nothing of the window holding step 5 was logged
    tags = sorted(p.name for p in (tmp_path / "run" / rundir.CHECKPOINTS).glob("step*"))
    assert tags == ["step00000004"]
    assert not (tmp_path / "run" / rundir.FINAL_WEIGHTS).exists()


def test_routers_count_tokens_as_bincount_does_without_reading_the_largest_index_back():
    idx = torch.randint(0, 9, (5, 7))
    assert torch.equal(count_indices(idx, 12), torch.bincount(idx.reshape(-1), minlength=12))


def test_router_statistics_are_device_tensors_read_back_as_the_floats_they_hold():
    r = token_choice(torch.randn(32, 4), 16, 1.0, 2)
    assert all(isinstance(v, torch.Tensor) for v in r.stat_values.values())
    kept = (r.token_idx_EC < 32).sum().item()
    assert r.stats["tc_dropped_frac"] == 1.0 - kept / (32 * 2)  # the fp64 arithmetic the host did
    assert isinstance(r.stats["tc_load_imbalance"], float)


@pytest.mark.parametrize("setting,device,expected", [
    ("auto", "cuda", "bf16"), ("auto", "cuda:1", "bf16"), ("auto", torch.device("cuda", 0), "bf16"),
    ("auto", "cpu", "fp32"), ("fp32", "cuda", "fp32"), ("bf16", "cpu", "bf16"),
])
def test_auto_precision_is_bf16_on_cuda_and_fp32_elsewhere(setting, device, expected):
    from ecdit_cli.train.engine import deepspeed_config, resolve_precision

    assert devices.resolve_precision(setting, device) == expected
    cfg = cfg_for("expert_choice", f"train.precision={setting}")
    assert resolve_precision(cfg, device) == expected
    assert ("bf16" in deepspeed_config(cfg, 1, expected)) == (expected == "bf16")


def test_a_bf16_run_trains_validates_evaluates_and_samples_in_bf16(tmp_path):
    from ecdit_cli.evaluate.sample import sample_run
    from ecdit_cli.model.load import load_run

    cfg = cfg_for("expert_choice", "train.precision=bf16", "train.steps=2", "train.log_every=1", "train.val_every=2",
                  "train.ckpt_every=2", "train.eval_every=2", "train.eval_per_tag=1", "train.eval_images=1")
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "done" and math.isfinite(summary["final_val_loss"])
    kinds = [r["kind"] for r in read_jsonl(tmp_path / "run" / rundir.METRICS)]
    assert kinds.count("eval") == 1 and kinds.count("train") == 2
    model, _ = load_run(tmp_path / "run")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the run's precision, also when sampling
    images = sample_run(tmp_path / "run", ["a red circle"], n=1, steps=2).images
    assert images.dtype == "float32" and images.shape[-1] == 3 and bool((images >= 0).all() and (images <= 1).all())
