"""`train.init_from`: sparse upcycling of a dense run into an MoE run, and warm starts."""

import json

import pytest
import torch
from conftest import TRAIN_OVERRIDES, train_debug_run

from ecdit_cli import rundir
from ecdit_cli.config import resolve_config
from ecdit_cli.errors import EcditError
from ecdit_cli.files import read_jsonl
from ecdit_cli.model.load import load_run
from ecdit_cli.model.t2i import TextToImage
from ecdit_cli.model.upcycle import initialise
from ecdit_cli.study.collect import collect
from ecdit_cli.train.loop import train


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    return train_debug_run(tmp_path_factory.mktemp("runs") / "dense", "dense")


def upcycled(source, *overrides):
    cfg = resolve_config(preset="debug", overrides=[*overrides, f"train.init_from={source}"])
    vocab = load_run(source)[0].tokenizer.vocab[2:]
    model = TextToImage(cfg, vocab)
    info = initialise(model, source, cfg, vocab)
    return model.eval(), info


def outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(3, 3, 32, 32, generator=g), torch.rand(3, generator=g)
    text, mask = model.tokenize(["a red circle", "two blue squares", "a green triangle left of a circle"])
    return model(x, t, text, mask)


@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_token_choice_with_a_zero_router_and_capacity_for_every_token_is_the_dense_model_bit_for_bit(
        dense_run, top_k):
    dense, _ = load_run(dense_run, use_ema=False)
    moe, info = upcycled(dense_run, "moe.routing=token_choice", f"moe.top_k={top_k}", "moe.capacity_factor=8")
    assert info["init_kind"] == "upcycle"
    assert torch.equal(outputs(moe).velocity, outputs(dense).velocity)


def test_upcycled_expert_choice_at_f_equal_to_e_is_the_dense_model_to_rounding(dense_run):
    dense, _ = load_run(dense_run, use_ema=False)
    moe, _ = upcycled(dense_run, "moe.routing=expert_choice", "moe.capacity_factor=8")
    torch.testing.assert_close(outputs(moe).velocity, outputs(dense).velocity, atol=2e-6, rtol=0)


def test_upcycled_race_with_a_decoupled_router_and_a_schedule_at_f_equal_to_e_is_the_dense_model_to_rounding(
        dense_run):
    dense, _ = load_run(dense_run, use_ema=False)
    moe, info = upcycled(dense_run, "moe.routing=race", "moe.router_input=decoupled", "moe.capacity_schedule=[8,8]")
    assert info["init_kind"] == "upcycle" and not moe.dit.blocks[1].mlp.router.wg.weight.any()
    assert moe.dit.blocks[1].mlp.router.wg.weight.shape[1] == 2 * moe.cfg.model.hidden_size
    torch.testing.assert_close(outputs(moe).velocity, outputs(dense).velocity, atol=2e-6, rtol=0)


def test_copied_experts_under_expert_choice_give_the_router_no_gradient_until_noise_breaks_the_symmetry(dense_run):
    def router_grad(noise):
        moe, _ = upcycled(dense_run, "moe.routing=expert_choice", f"train.init_noise={noise}")
        outputs(moe).velocity.square().mean().backward()
        router = moe.dit.blocks[1].mlp.router.wg.weight
        assert not router.detach().any()  # the router starts at zero either way
        return router.grad.abs().max().item()

    copies, noisy = router_grad(0.0), router_grad(0.01)
    assert noisy > 1e-6 and copies < 1e-5 * noisy  # zero up to rounding


def test_init_noise_perturbs_each_expert_differently_and_copies_the_biases(dense_run):
    moe, _ = upcycled(dense_run, "moe.routing=expert_choice", "train.init_noise=0.01")
    dense, _ = load_run(dense_run, use_ema=False)
    experts, fc1 = moe.dit.blocks[1].mlp.experts, dense.dit.blocks[1].mlp.fc1
    rel = (experts.w1 - fc1.weight.t()).square().mean((1, 2)).sqrt() / fc1.weight.square().mean().sqrt()
    assert torch.allclose(rel, torch.full_like(rel, 0.01), rtol=0.1)
    assert not torch.equal(experts.w1[0], experts.w1[1])
    assert torch.equal(experts.b1, fc1.bias.expand_as(experts.b1))


def test_an_upcycled_run_starts_at_the_dense_runs_validation_loss_and_records_the_dense_compute(dense_run, tmp_path):
    train_debug_run(tmp_path / "up", "token_choice", "moe.top_k=1", "moe.capacity_factor=8",
                              "train.steps=2", f"train.init_from={dense_run}")
    summary = json.loads((tmp_path / "up" / rundir.SUMMARY).read_text())
    dense = json.loads((dense_run / rundir.SUMMARY).read_text())
    first_val = next(r for r in read_jsonl(tmp_path / "up" / rundir.METRICS) if r["kind"] == "val")
    assert first_val["step"] == 0 and first_val["val_loss"] == pytest.approx(dense["final_val_loss"], abs=1e-6)
    assert summary["init_kind"] == "upcycle" and summary["init_from"] == str(dense_run.resolve())
    assert summary["init_flops"] == dense["train_flops"] > 0
    assert summary["total_train_flops"] == pytest.approx(summary["train_flops"] + dense["train_flops"])
    assert "upcycled experts start as exact copies" in (tmp_path / "up" / rundir.LOG).read_text()
    row = collect(tmp_path / "up", write=False).runs.iloc[0]
    assert row["init_flops"] == dense["train_flops"] and row["total_train_flops"] == summary["total_train_flops"]


def test_a_warm_start_from_an_moe_run_of_the_same_shape_copies_every_weight(ec_run):
    source, _ = load_run(ec_run, use_ema=False)
    moe, info = upcycled(ec_run, "moe.routing=expert_choice", "moe.capacity_factor=4")
    assert info["init_kind"] == "warm_start"
    for (name, a), (_, b) in zip(source.named_parameters(), moe.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("overrides,message", [
    (["moe.routing=expert_choice", "model.hidden_size=48"], "train.init_from: model.hidden_size 32 in {src}/config.yaml vs 48 here"),
    (["moe.routing=expert_choice", "model.depth=3"], "train.init_from: model.depth 2 in {src}/config.yaml vs 3 here"),
    (["moe.routing=dense", "moe.dense_width_mult=2"], "train.init_from: moe.dense_width_mult 1.0 in {src}/config.yaml vs 2.0 here"),
    (["moe.routing=expert_choice", "moe.num_experts=16", "moe.expert_width_mult=0.5"],
     "train.init_from: moe.expert_width_mult=0.5 cannot be upcycled from the dense run {src} (each expert copies "
     "its FFN: keep 1.0)"),
    (["moe.routing=race", "moe.shared_experts=1"],
     "train.init_from: moe.shared_experts=1 cannot be upcycled from the dense run {src} (shared FFN + copied "
     "experts would not start as the dense model: keep 0)"),
])
def test_init_from_a_mismatched_run_is_one_line_naming_the_key(dense_run, tmp_path, overrides, message):
    cfg = resolve_config(preset="debug", overrides=[*TRAIN_OVERRIDES, *overrides, f"train.init_from={dense_run}"])
    with pytest.raises(EcditError) as err:
        train(cfg, tmp_path / "run")
    assert str(err.value) == message.format(src=dense_run)
    assert not (tmp_path / "run" / rundir.CONFIG).exists()  # refused before the run directory is written


def test_a_warm_start_needs_the_same_shared_and_expert_widths_and_router_input(ec_run):
    for extra, message in ((["moe.shared_experts=1"], "moe.shared_experts 0 in"),
                           (["moe.expert_width_mult=0.5"], "moe.expert_width_mult 1.0 in"),
                           (["moe.router_input=decoupled"], "moe.router_input 'hidden' in")):
        with pytest.raises(EcditError, match=message):
            upcycled(ec_run, "moe.routing=expert_choice", *extra)


def test_a_dense_run_cannot_start_from_an_moe_run(ec_run, tmp_path):
    cfg = resolve_config(preset="debug", overrides=[f"train.init_from={ec_run}"])
    with pytest.raises(EcditError, match="is an MoE run .moe.routing=expert_choice.; a dense run cannot start from it"):
        train(cfg, tmp_path / "run")


def test_an_upcycled_run_on_two_expert_parallel_processes_starts_from_the_experts_of_one_process(dense_run, tmp_path):
    import os
    import subprocess
    import sys

    extra = ["train.init_noise=0.05", "train.steps=2", "train.micro_batch_size=4", "train.log_every=1",
             f"train.init_from={dense_run}"]
    train_debug_run(tmp_path / "one", "expert_choice", *extra)
    sets = ["moe.routing=expert_choice", *TRAIN_OVERRIDES, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ecdit_cli", "train", "debug", "-o", str(tmp_path / "two"), "--nproc",
                           "2", "--ep", "2", "--launcher", "torchrun", "--quiet", *[x for s in sets for x in ("--set", s)]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    one, two = (list(read_jsonl(tmp_path / d / rundir.METRICS)) for d in ("one", "two"))
    for a, b in zip(one, two):
        assert (a["kind"], a["step"]) == (b["kind"], b["step"])
        key = "val_loss" if a["kind"] == "val" else "train_loss"
        assert b[key] == pytest.approx(a[key], abs=1e-5), (a["kind"], a["step"])
