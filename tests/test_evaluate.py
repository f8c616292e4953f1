"""`ecdit eval`: the prompt file, eval.json's schema and scores by the exact detector, files, CLI."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ecdit_cli import rundir
from ecdit_cli.config import resolve_config, save_config
from ecdit_cli.data import detector
from ecdit_cli.data.scenes import TAGS, SceneSpec, scene_for_metadata
from ecdit_cli.errors import EcditError
from ecdit_cli.evaluate import geneval
from ecdit_cli.evaluate import sample as sampling
from ecdit_cli.evaluate.eval_run import evaluate_run
from ecdit_cli.study.collect import _read_eval

PER_TAG = 2
SCHEMA = {"overall", "tasks", "prompts_with_any_correct", "heldout", "num_images", "settings", "ecdit_version"}


def fake_sampler(kind: str, calls: list | None = None):
    """A stand-in for sample_images: the renderer's own scene for each prompt, or blank images."""
    def sample_images(model, cfg, prompts, n, cfg_scale, steps, seed, shift, **kwargs):
        if calls is not None:
            calls.append({"prompts": list(prompts), "n": n, "cfg_scale": cfg_scale, "steps": steps, "seed": seed,
                          "shift": shift})
        records = {r["prompt"]: r for r in geneval.make_prompt_set(0, PER_TAG)}
        spec = SceneSpec(cfg.model.input_size)
        images = np.zeros((len(prompts), n, spec.size, spec.size, 3), dtype=np.float32)
        if kind == "rendered":
            for i, p in enumerate(prompts):
                for j in range(n):
                    images[i, j] = scene_for_metadata(spec, records[p], seed, 100 * i + j).image
        if kwargs.get("on_progress"):
            kwargs["on_progress"](len(prompts) * n, len(prompts) * n)
        return sampling.SampleResult(list(prompts), images)
    return sample_images


@pytest.fixture
def run(ec_run, tmp_path):
    """A copy of the trained run's config and weights (eval writes into the run directory)."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(ec_run, dst, ignore=shutil.ignore_patterns("checkpoints", "eval*", "analyze", "samples"))
    return dst


def test_eval_of_the_renderers_own_images_scores_one_and_writes_every_file(run, monkeypatch):
    calls = []
    monkeypatch.setattr(sampling, "sample_images", fake_sampler("rendered", calls))
    doc = evaluate_run(run, n=2, per_tag=PER_TAG, seed=4, steps=7, cfg_scale=2.5)
    on_disk = json.loads((run / rundir.EVAL).read_text())
    assert SCHEMA <= set(on_disk)
    assert on_disk["overall"] == 1.0 and doc["overall"] == 1.0
    assert on_disk["tasks"] == dict.fromkeys(TAGS, 1.0)
    assert on_disk["prompts_with_any_correct"] == 1.0 and on_disk["heldout"] == 1.0
    assert on_disk["num_images"] == 2 * PER_TAG * len(TAGS)
    # FD-scenes: the renderer's own scenes sit near the rendered-vs-rendered floor.
    assert 0 <= on_disk["fd_scenes"] < 2 * on_disk["fd_scenes_floor"]
    assert on_disk["fd_net"]["image_size"] == 32 and on_disk["fd_net"]["val_color_acc"] > 0.9
    assert on_disk["settings"] == {"cfg": 2.5, "steps": 7, "seed": 4, "n": 2, "per_tag": PER_TAG, "ema": True,
                                   "shift": 1.0, "guidance_max_t": 1.0, "prompt_set_seed": 0, "capacity_factor": 2.0}
    records = geneval.read_prompts(run / "eval" / "prompts.jsonl")
    assert records == geneval.make_prompt_set(0, PER_TAG)
    assert calls == [{"prompts": [r["prompt"] for r in records], "n": 2, "cfg_scale": 2.5, "steps": 7, "seed": 4,
                      "shift": 1.0}]
    results = [json.loads(line) for line in (run / "eval" / "results.jsonl").read_text().splitlines()]
    assert len(results) == on_disk["num_images"] and all(r["correct"] for r in results)
    assert np.load(run / "eval" / "images.npz")["images"].shape == (len(records), 2, 32, 32, 3)
    assert (run / "eval" / "examples.png").read_bytes()[:4] == b"\x89PNG"
    # `ecdit collect` reads it.
    assert _read_eval(run, []) == {"eval_overall": 1.0, **{f"eval_{t}": 1.0 for t in TAGS},
                                   "eval_prompts_with_any_correct": 1.0, "eval_fd_scenes": on_disk["fd_scenes"],
                                   "eval_fd_scenes_floor": on_disk["fd_scenes_floor"]}


def test_blank_images_score_zero_on_every_task(run, monkeypatch):
    monkeypatch.setattr(sampling, "sample_images", fake_sampler("blank"))
    doc = evaluate_run(run, n=1, per_tag=PER_TAG)
    assert doc["overall"] == 0.0 and doc["tasks"] == dict.fromkeys(TAGS, 0.0)
    assert doc["prompts_with_any_correct"] == 0.0
    assert doc["fd_scenes"] > 2 * doc["fd_scenes_floor"]  # 12 images: the floor itself is high
    assert "fd_scenes" not in evaluate_run(run, n=1, per_tag=PER_TAG, fd=False)
    reasons = [json.loads(line)["reason"] for line in (run / "eval" / "results.jsonl").read_text().splitlines()]
    assert all(r.startswith("expected") for r in reasons)


def test_saved_verdicts_agree_with_the_detector_on_the_saved_images(run, monkeypatch):
    monkeypatch.setattr(sampling, "sample_images", fake_sampler("rendered"))
    evaluate_run(run, n=1, per_tag=PER_TAG)
    records = geneval.read_prompts(run / "eval" / "prompts.jsonl")
    images = np.load(run / "eval" / "images.npz")["images"]
    for line in (run / "eval" / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        ok, reason = detector.check(images[r["prompt_index"], r["image_index"]], records[r["prompt_index"]])
        assert (ok, reason) == (r["correct"], r["reason"])


def test_an_interrupted_eval_leaves_the_previous_eval_json_untouched(run, monkeypatch):
    monkeypatch.setattr(sampling, "sample_images", fake_sampler("rendered"))
    evaluate_run(run, n=1, per_tag=PER_TAG)
    before = (run / rundir.EVAL).read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling, "sample_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(run, n=1, per_tag=PER_TAG)
    assert (run / rundir.EVAL).read_bytes() == before
    assert not [p for p in run.rglob("*.tmp")]


def test_eval_with_the_real_sampler_scores_every_prompt_in_the_unit_range(run):
    progress = []
    doc = evaluate_run(run, n=1, per_tag=1, steps=2, on_progress=lambda done, total: progress.append((done, total)))
    assert doc["num_images"] == len(TAGS) and set(doc["tasks"]) == set(TAGS)
    assert all(0.0 <= v <= 1.0 for v in doc["tasks"].values())
    assert doc["overall"] == pytest.approx(np.mean(list(doc["tasks"].values())))
    assert progress[-1] == (len(TAGS), len(TAGS))


def test_eval_refuses_a_run_not_trained_on_the_scenes(tmp_path):
    cfg = resolve_config(preset="debug", overrides=["data.source=fashion_mnist", "model.in_channels=1"])
    save_config(cfg, tmp_path / rundir.CONFIG)
    with pytest.raises(EcditError, match="data.source=fashion_mnist"):
        evaluate_run(tmp_path)


def test_eval_command_prints_the_task_table_and_writes_eval_json(run, monkeypatch):
    from ecdit_cli.cli import _register, app

    _register()
    monkeypatch.setattr(sampling, "sample_images", fake_sampler("rendered"))
    res = CliRunner().invoke(app, ["eval", str(run), "--per-tag", str(PER_TAG), "-n", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for word in ("single_object", "color_attr", "overall", "100.0"):
        assert word in res.output
    assert json.loads((run / rundir.EVAL).read_text())["overall"] == 1.0
    res = CliRunner().invoke(app, ["eval", str(run), "--per-tag", str(PER_TAG), "-n", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tasks"] == dict.fromkeys(TAGS, 1.0)


def test_eval_command_with_a_missing_run_exits_2_with_one_line(tmp_path, capsys):
    from ecdit_cli.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path / "nope")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err


def test_eval_at_another_capacity_keeps_the_runs_own_eval_json(run, monkeypatch):
    monkeypatch.setattr(sampling, "sample_images", fake_sampler("rendered"))
    own = evaluate_run(run, n=1, per_tag=PER_TAG, fd=False)
    before = (run / rundir.EVAL).read_bytes()
    other = evaluate_run(run, n=1, per_tag=PER_TAG, fd=False, capacity_factor=4.0)
    assert (run / rundir.EVAL).read_bytes() == before  # what a study collects is untouched
    assert json.loads((run / "eval_f4.json").read_text()) == json.loads(json.dumps(other))
    assert (run / "eval_f4" / "prompts.jsonl").exists()
    assert other["settings"]["capacity_factor"] == 4.0 and own["settings"]["capacity_factor"] == 2.0
    assert other["flops_per_image"] > own["flops_per_image"] > 0
