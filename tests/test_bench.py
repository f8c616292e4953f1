"""`ecdit bench`: the commands run on tiny shapes and produce well-formed JSON and markdown.

These are not timed tests: no assertion is made on speed.
"""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from ecdit_cli import cli
from ecdit_cli.bench import bench_ep, interleaved, peak_memory, shapes_from_lists, summary
from ecdit_cli.bench.ep import WORKER_MODULE
from ecdit_cli.errors import EcditError


@pytest.fixture(scope="module")
def runner():
    cli._register()
    return CliRunner()


def test_interleaved_timing_rotates_the_order_every_round():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "ABC"}
    times = interleaved(fns, reps=3, warmup=1)
    assert calls == list("ABC") + list("ABC") + list("BCA") + list("CAB")
    assert all(len(t) == 3 for t in times.values())
    s = summary([3.0, 1.0, 2.0])
    assert s["median"] == 2.0 and s["n"] == 3


def test_cpu_peak_memory_counts_live_tensors_and_not_what_before_frees():
    keep = {"t": torch.ones(2**18)}  # 1 MiB, freed by `before`

    def fn():
        a = torch.ones(2**18)  # 1 MiB
        b = torch.ones(2**19)  # 2 MiB, while a is alive
        del a, b
        c = torch.ones(2**18)
        del c

    peak = peak_memory(fn, torch.device("cpu"), before=lambda: keep.pop("t"))
    assert 3 * 2**20 <= peak < 3.5 * 2**20


def test_shapes_are_every_combination_and_bad_lists_are_errors():
    shapes = shapes_from_lists([2], [8, 16], [32], [4, 8])
    assert [(s.tokens_per_image, s.experts) for s in shapes] == [(8, 4), (8, 8), (16, 4), (16, 8)]
    with pytest.raises(EcditError, match="--width"):
        shapes_from_lists([2], [8], [0], [4])


def test_bench_moe_writes_json_and_a_markdown_table_for_every_variant(runner, tmp_path):
    md = tmp_path / "moe.md"
    res = runner.invoke(cli.app, ["bench", "moe", "--images", "2", "--tokens", "8", "--width", "16",
                                  "--experts", "4", "--reps", "2", "--warmup", "0", "--sweep", "1", "--sweep", "2",
                                  "--threads", "1", "--quiet", "--json", "--markdown", str(md)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["kind"] == "moe" and {"cpu", "cores", "threads", "torch"} <= out["machine"].keys()
    variants = [r["variant"] for r in out["rows"]]
    assert variants == ["dense", "tc_top2", "ec_image", "ec_pooled", "ds_top2", "ec_dslayer", "tc_dslayer", "ec_batch",
                        "race_image", "race_batch", "ec_shared", "ec_fine", "ec_decoupled", "ec_balanced",
                        "ec_random", "dense_pair", "ec_schedule"]
    for r in out["rows"]:
        assert {"fwd_ms", "fwd_bwd_ms", "fwd_ratio", "fwd_bwd_ratio", "peak_mem_bytes", "mem_ratio"} <= r.keys()
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["peak_mem_bytes"] > 0
    assert out["rows"][0]["fwd_bwd_ratio"] == 1.0
    assert [r["reference"] for r in out["rows"]] == ["dense"] * 16 + ["dense_pair"]
    assert [r["tokens"] for r in out["memory_sweep"]] == [8, 16, 8, 16]
    text = md.read_text()
    assert "| variant | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio | peak MiB | peak ratio |" in text
    assert text.count("\n| ") >= 17 + 2 + 4 + 2  # 17 variants + headers, 4 sweep rows + headers
    assert "Machine:" in text


def test_bench_moe_variant_subset_always_keeps_the_dense_reference(runner):
    res = runner.invoke(cli.app, ["bench", "moe", "--images", "1", "--tokens", "8", "--width", "8", "--experts",
                                  "2", "--reps", "1", "--warmup", "0", "--variant", "ec_image", "--no-memory",
                                  "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert [r["variant"] for r in rows] == ["dense", "ec_image"] and rows[1]["peak_mem_bytes"] is None


def test_bench_moe_adds_the_reference_a_variant_is_compared_with(runner):
    res = runner.invoke(cli.app, ["bench", "moe", "--images", "1", "--tokens", "8", "--width", "8", "--experts",
                                  "2", "--reps", "1", "--warmup", "0", "--variant", "ec_schedule", "--no-memory",
                                  "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert [(r["variant"], r["reference"]) for r in rows] == [("dense", "dense"), ("dense_pair", "dense"),
                                                              ("ec_schedule", "dense_pair")]


def test_bench_step_reports_every_model_with_ratios_and_inference_overheads(runner, tmp_path):
    md = tmp_path / "step.md"
    res = runner.invoke(cli.app, ["bench", "step", "--preset", "debug", "--batch", "2", "--reps", "1",
                                  "--warmup", "0", "--threads", "1", "--peak-tflops", "1", "--quiet", "--json",
                                  "--markdown", str(md)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    rows = {r["model"]: r for r in out["rows"]}
    assert list(rows) == ["dense_flops", "token_choice", "expert_choice", "dense"]
    assert rows["dense_flops"]["step_ratio"] == 1.0 and rows["dense"]["sample_overhead"] == 0.0
    # The FLOP-matched dense model has EC's activated FLOPs (to < 1%: its width is a multiple of 64).
    assert rows["dense_flops"]["flops_per_image"] == pytest.approx(rows["expert_choice"]["flops_per_image"], rel=1e-2)
    assert rows["expert_choice"]["theory_overhead"] > 0
    for r in rows.values():
        assert r["images_per_s"] > 0 and 0 < r["train_mfu"] < 1
    text = md.read_text()
    assert "| model | dense width | GFLOP/image | step ms |" in text and "train MFU" in text


def test_cuda_device_without_cuda_is_one_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "moe", "--device", "cuda", "--images", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no CUDA device is visible" in err and "--device cpu" in err


def test_bench_ep_launches_one_process_runs_and_torchrun_with_ep_processes(tmp_path):
    seen = []

    def fake_runner(cmd, timeout):
        seen.append(cmd)
        out = cmd[cmd.index(WORKER_MODULE) + 1]
        ep = int(cmd[cmd.index("--ep") + 1])
        with open(out, "w") as f:
            json.dump({"processes": ep, "ep_size": ep, "deepspeed_layer": ep > 1, "threads_per_process": 1,
                       "step_ms": 100.0 * ep, "images_per_s": 1.0, "a2a_ms": 10.0 * (ep > 1),
                       "a2a_share": 0.1 * (ep > 1), "a2a_calls_per_step": 4 * (ep > 1), "steps_ms": []}, f)

    res = bench_ep("debug", ["model.depth=2"], batch=4, reps=2, warmup=0, ep=2, runner=fake_runner)
    assert len(seen) == 3
    assert seen[0][1:3] == ["-m", WORKER_MODULE] and "--deepspeed-layer" in seen[1]
    launched = seen[2]
    assert launched[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert launched[launched.index("--ep") + 1] == "2" and "model.depth=2" in launched
    assert [r["step_ratio"] for r in res["rows"]] == [1.0, 1.0, 2.0]
    with pytest.raises(EcditError, match="--batch"):
        bench_ep("debug", [], batch=3, ep=2, runner=fake_runner)


def test_the_ep_worker_alone_times_steps_and_writes_its_result(tmp_path):
    from ecdit_cli.bench.ep_worker import main

    out = tmp_path / "p1.json"
    torch.set_num_threads(1)
    main([str(out), "--preset", "debug", "--batch", "2", "--reps", "2", "--warmup", "0", "--ep", "1"])
    res = json.loads(out.read_text())
    assert res["processes"] == 1 and res["step_ms"] > 0 and res["a2a_ms"] == 0.0 and len(res["steps_ms"]) == 2


@pytest.mark.slow
def test_two_expert_parallel_processes_report_an_all_to_all_share():
    res = bench_ep("debug", [], batch=4, reps=2, warmup=1, ep=2)
    two = res["rows"][2]
    assert two["processes"] == 2 and two["a2a_calls_per_step"] >= 4 and 0 < two["a2a_share"] < 1


@pytest.mark.gpu
def test_bench_moe_runs_in_bf16_on_a_gpu(runner):
    res = runner.invoke(cli.app, ["bench", "moe", "--device", "cuda", "--images", "2", "--tokens", "16",
                                  "--width", "32", "--experts", "4", "--reps", "2", "--sweep", "1", "--sweep", "2",
                                  "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["machine"]["dtype"] == "bfloat16" and all(r["peak_mem_bytes"] > 0 for r in out["rows"])


@pytest.mark.gpu
def test_bench_step_reports_model_flop_utilisation_on_a_gpu(runner):
    res = runner.invoke(cli.app, ["bench", "step", "--device", "cuda", "--preset", "debug", "--batch", "2",
                                  "--reps", "2", "--peak-tflops", "989", "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["machine"]["gpu"] and all(0 < r["train_mfu"] < 1 for r in out["rows"])


def test_bench_data_times_every_piece_of_the_data_path_and_reports_its_machine(runner):
    result = runner.invoke(cli.app, ["bench", "data", "--batch", "4", "--reps", "2", "--json", "-q"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert [r["name"] for r in res["rows"]] == ["render", "source batch", "detector (scenes)", "detector (noise)"]
    for r in res["rows"]:
        assert r["batch_ms"] > 0 and math.isclose(r["per_image_ms"], r["batch_ms"] / 4)
        assert math.isclose(r["images_per_s"], 1e3 / r["per_image_ms"])
    assert res["machine"]["cores"] >= 1 and res["settings"] == {"batch": 4, "image_size": 32, "reps": 2}


def test_bench_data_refuses_an_out_of_range_image_size_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "data", "--image-size", "8"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "16..64" in err and len(err.strip().splitlines()) == 1


def test_bench_train_reports_every_column_and_marks_each_target(runner):
    res = runner.invoke(cli.app, ["bench", "train", "--preset", "debug", "--steps", "3", "--rounds", "1",
                                  "--reps", "1", "--batch", "4", "--json", "-q"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [r["routing"] for r in out["rows"]] == ["dense", "expert_choice"]
    for r in out["rows"]:
        for col in ("full loop ms", "engine step ms", "plain loop ms", "plain DiT ms", "sgemm ms"):
            assert r[col] > 0
        for ratio in ("full loop / engine step", "engine step / plain loop", "plain loop / plain DiT"):
            assert r[ratio]["median"] > 0
        s = r["startup"]
        assert s["one_step_process_s"] > s["import_deepspeed_s"] > 0
        w = r["whole process"]
        assert w["ecdit_train_process_s"] > 0 and w["plain_script_process_s"] > 0
        assert r["ecdit train process / plain script"]["median"] > 0
    assert "EC / dense engine step per activated FLOP" in out["rows"][1]
    from ecdit_cli.bench.report import train_markdown

    md = train_markdown(out)
    assert md.count("| debug expert_choice |") == 1 + 6 and ("met" in md)
