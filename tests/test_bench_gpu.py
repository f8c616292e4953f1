"""`make bench-gpu` without a GPU: the peak table, MFU, the bf16 step models and the section writer."""

import pytest
import torch

from ecdit_cli.bench.gpu_section import gpu_section, main
from ecdit_cli.bench.peaks import mfu, peak_bf16_tflops, resolve_peak
from ecdit_cli.bench.report import GPU_BEGIN, GPU_END, fill_section, step_markdown


@pytest.mark.parametrize("name,label,tflops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0), ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", "H100 NVL", 835.0), ("NVIDIA H200", "H200 SXM", 989.0), ("NVIDIA H200 NVL", "H200 NVL", 835.0),
    ("NVIDIA GH200 480GB", "GH200", 989.0), ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100", 312.0),
])
def test_known_gpus_get_their_dense_bf16_peak(name, label, tflops):
    assert peak_bf16_tflops(name) == (label, tflops)


def test_an_unknown_gpu_gets_no_mfu_and_a_line_saying_so():
    assert peak_bf16_tflops("NVIDIA GeForce RTX 4090") is None
    peak = resolve_peak("NVIDIA GeForce RTX 4090", None)
    assert peak["peak_tflops"] is None and "RTX 4090 is not in the peak table" in peak["peak_note"]
    assert "--peak-tflops" in peak["peak_note"]
    assert resolve_peak(None, None) == {"peak_tflops": None, "peak_note": ""}  # a CPU run: nothing to say
    assert resolve_peak("NVIDIA GeForce RTX 4090", 165.0)["peak_tflops"] == 165.0  # a given peak wins
    assert resolve_peak("NVIDIA H100 80GB HBM3", 500.0)["peak_tflops"] == 500.0


def test_mfu_is_model_flops_per_second_over_the_peak():
    # 3 x 1e12 FLOPs in 0.01 s = 300 TFLOP/s: 30% of a 1000 TFLOP/s peak.
    assert mfu(3e12, 0.01, 1000.0) == pytest.approx(0.3)
    assert mfu(989e12, 1.0, 989.0) == pytest.approx(1.0)


def _step_result(peak_tflops, note):
    row = {"model": "expert_choice", "label": "expert choice f=2", "routing": "expert_choice",
           "dense_width_mult": 1.0, "flops_per_image": 2e9, "step_ms": 10.0, "step_iqr_ms": 1.0,
           "images_per_s": 3200.0, "step_ratio": 1.05, "sample_ms": 3.0, "sample_iqr_ms": 0.1,
           "sample_ratio": 1.1, "sample_overhead": 0.2, "theory_overhead": 0.1, "train_tflops": 19.2}
    if peak_tflops:
        row.update(train_mfu=mfu(3 * 2e9 * 32, 0.010, peak_tflops), sample_mfu=mfu(2e9 * 32, 0.003, peak_tflops))
    return {"machine": {"cpu": "x", "cores": 16, "threads": 16, "torch": "2.13", "device": "cuda",
                        "dtype": "bfloat16", "gpu": "NVIDIA H100 80GB HBM3"},
            "settings": {"preset": "medium", "overrides": [], "hidden_size": 512, "depth": 12, "tokens_per_image": 256,
                         "num_experts": 8, "capacity_factor": 2.0, "batch": 32, "optimizer": "adamw", "reps": 10,
                         "peak_tflops": peak_tflops, "peak_note": note},
            "rows": [row]}


def test_the_step_report_shows_mfu_against_the_table_peak_and_says_which():
    peak = resolve_peak("NVIDIA H100 80GB HBM3", None)
    md = step_markdown(_step_result(peak["peak_tflops"], peak["peak_note"]))
    assert "| train MFU | sample MFU |" in md
    assert f"{100 * 3 * 2e9 * 32 / 0.010 / 989e12:.1f}%" in md  # 1.9%
    assert "H100 SXM's 989 TFLOP/s bf16 dense peak" in md and "NVIDIA H100 80GB HBM3" in md


def test_the_step_report_of_an_unknown_gpu_has_no_mfu_column_and_says_why():
    peak = resolve_peak("NVIDIA L4", None)
    md = step_markdown(_step_result(None, peak["peak_note"]))
    assert "MFU |" not in md and "No MFU: NVIDIA L4 is not in the peak table" in md


def test_the_gpu_section_replaces_what_lies_between_its_markers_and_nothing_else(tmp_path):
    doc = f"# B\n\n## CPU\n\nkept\n\n## GPU\n\n{GPU_BEGIN}\nNot measured.\n{GPU_END}\n\n## Reproducing\n\nalso kept\n"
    out = fill_section(doc, "## MoE\n\nnew table")
    assert out.startswith("# B\n\n## CPU\n\nkept\n\n## GPU\n\n") and out.endswith("## Reproducing\n\nalso kept\n")
    assert "Not measured." not in out and f"{GPU_BEGIN}\n## MoE\n\nnew table\n{GPU_END}" in out
    assert fill_section(out, "## MoE\n\nnew table") == out  # rerunning replaces, never appends
    assert fill_section("# B\n", "x").endswith(f"\n\n{GPU_BEGIN}\nx\n{GPU_END}\n")  # no markers: appended

    path = tmp_path / "BENCHMARKS.md"
    path.write_text(doc)
    reports = [tmp_path / "moe.md", tmp_path / "step.md"]
    reports[0].write_text("## MoE layer\n\n| a |\n")
    reports[1].write_text("## Whole model\n\n### sub\n")
    assert main([str(path), *map(str, reports)]) == 0
    text = path.read_text()
    assert "### MoE layer" in text and "#### sub" in text and "make bench-gpu" in text and "also kept" in text
    assert gpu_section(["## a"]).endswith("### a")


def test_bench_step_models_train_and_sample_in_bf16_on_the_cpu():
    from ecdit_cli.bench.step import _Bench, step_configs
    from ecdit_cli.train.engine import setup_distributed

    cfgs = step_configs("debug", ["train.device=cpu"], 4, torch.device("cpu"))
    setup_distributed(cfgs["dense"])
    for name in ("dense", "expert_choice"):
        cfg = cfgs[name]
        cfg.train.precision = "bf16"
        bench = _Bench(cfg, torch.device("cpu"), torch.bfloat16)
        before = [p.detach().float().clone() for p in bench.engine.module.parameters()]
        bench.train_step()
        assert {p.dtype for p in bench.engine.module.parameters()} == {torch.bfloat16}
        assert any(not torch.equal(b, p.float()) for b, p in zip(before, bench.engine.module.parameters()))
        bench.engine.module.eval()
        bench.sample_step()


def test_bench_train_with_compile_times_a_compiled_engine_next_to_the_plain_one(monkeypatch):
    # The compile itself takes minutes on 2 cores: the engine's compile is recorded, not run;
    # this checks that --compile builds a compiled engine, times it and reports the ratio.
    from deepspeed.runtime.engine import DeepSpeedEngine

    from ecdit_cli.bench.report import train_markdown
    from ecdit_cli.bench.train import bench_train

    compiled = []
    monkeypatch.setattr(DeepSpeedEngine, "compile", lambda self, *a, **k: compiled.append(self))
    res = bench_train("debug", ("expert_choice",), steps=2, rounds=1, reps=1, batch=4, startup=False, whole=False,
                      compile=True)
    (row,) = res["rows"]
    assert len(compiled) == 1 and res["settings"]["compile"] is True
    assert row["compiled engine step ms"] > 0 and row["compiled / engine step"]["median"] > 0
    assert "| debug expert_choice |" in train_markdown(res).split("torch.compile")[1]
    plain = bench_train("debug", ("dense",), steps=2, rounds=1, reps=1, batch=4, startup=False, whole=False)
    assert "compiled / engine step" not in plain["rows"][0] and "torch.compile" not in train_markdown(plain)
