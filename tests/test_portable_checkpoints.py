"""Portable expert checkpoints: resuming on another expert-parallel size (train/portable.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ecdit_cli import rundir
from ecdit_cli.config import resolve_config
from ecdit_cli.errors import EcditError
from ecdit_cli.files import read_jsonl
from ecdit_cli.train.loop import train

# Micro-batches of 4 on one process and on two: the same inputs whatever the layout (step.py).
# Gradient clipping (train.grad_clip=1) is active at most of these steps (norms 1-2).
EP_RUN = ["moe.routing=expert_choice", "moe.num_experts=4", "train.batch_size=8", "train.micro_batch_size=4",
          "data.val_size=8", "train.log_every=1", "train.val_every=100", "train.ckpt_every=2",
          "train.val_timesteps=2", "train.warmup_steps=2", "train.lr=3e-3"]


def ep_config(steps, *extra):
    return resolve_config(preset="debug", overrides=[*EP_RUN, f"train.steps={steps}", *extra])


def train_records(run_dir):
    return {r["step"]: r for r in read_jsonl(run_dir / rundir.METRICS) if r["kind"] == "train"}


def test_a_run_resumed_on_one_then_two_then_one_process_equals_an_uninterrupted_run(tmp_path):
    train(ep_config(6), tmp_path / "ref")
    cut = tmp_path / "cut"
    train(ep_config(2), cut)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "ecdit_cli", "train", str(cut / rundir.CONFIG), "-o", str(cut),
                           "--nproc", "2", "--ep", "2", "--launcher", "torchrun", "--set", "train.steps=4", "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads((cut / rundir.CHECKPOINTS / "step00000004" / "ecdit_complete.json").read_text())
    assert record["ep_size"] == 2 and record["portable"]
    train(ep_config(6), cut)  # back to one process, moe.ep_size=1

    ref, got = train_records(tmp_path / "ref"), train_records(cut)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5, 6]
    for step in ref:  # steps 3 and 5 are the first after each change of layout
        assert got[step]["train_loss"] == pytest.approx(ref[step]["train_loss"], abs=1e-5), step
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], abs=1e-5), step
    a = torch.load(tmp_path / "ref" / rundir.FINAL_WEIGHTS, weights_only=True)
    b = torch.load(cut / rundir.FINAL_WEIGHTS, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    # Two processes sum in another order (differences ~1e-7); Adam divides by the root of the
    # second moment, so where the true gradient is zero (attention key biases: softmax ignores
    # them) such differences become steps of up to 1e-5. Everything else agrees to ~1e-6.
    for part in ("model", "ema"):
        for name, w in a[part].items():
            key_bias = name.endswith(("in_proj_bias", "kv.bias"))
            torch.testing.assert_close(b[part][name], w, atol=5e-5 if key_bias else 1e-5, rtol=0,
                                       msg=f"{part}: {name}")


def test_a_resume_on_another_expert_parallel_size_without_portable_state_is_one_clear_line(tmp_path):
    train(ep_config(2), tmp_path)
    record_path = tmp_path / rundir.CHECKPOINTS / "step00000002" / "ecdit_complete.json"
    record = json.loads(record_path.read_text())
    assert record["portable"] and (record_path.parent / "portable" / "experts_ep000.pt").is_file()
    record_path.write_text(json.dumps({**record, "ep_size": 2, "portable": False}))
    with pytest.raises(EcditError, match=r"saved with moe.ep_size=2 and holds no portable expert state.*--ep 2"):
        train(ep_config(4), tmp_path)


def test_only_the_expert_parallel_size_may_change_when_a_run_resumes(tmp_path):
    from ecdit_cli.train.loop import check_resume_compatible

    train(ep_config(2), tmp_path)
    check_resume_compatible(ep_config(4, "moe.ep_size=2"), tmp_path)
    with pytest.raises(EcditError, match=r"different config \(moe.capacity_factor: 2.0 there, 4.0 now"):
        check_resume_compatible(ep_config(4, "moe.ep_size=2", "moe.capacity_factor=4"), tmp_path)


def test_gradient_accumulation_steps_the_optimizer_once_per_training_step(tmp_path):
    # Two micro-batches per step: DeepSpeed must apply the update at the end of every step, not
    # on every second call of engine.step() (its own micro-step counter).
    train(ep_config(3, "train.ckpt_every=3"), tmp_path)
    shared = torch.load(tmp_path / rundir.CHECKPOINTS / "step00000003" / "portable" / "shared.pt", weights_only=True)
    assert shared["engine"]["global_steps"] == 3
    assert {float(s["step"]) for s in shared["optim"].values() if "step" in s} == {3.0}
