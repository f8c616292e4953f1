"""`ecdit export`: safetensors + config.json + vocab.json that load to the same samples, without pickle."""

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ecdit_cli.cli import main
from ecdit_cli.evaluate.sample import sample_run
from ecdit_cli.model.export import export_run
from ecdit_cli.model.load import load_run

pytest.importorskip("safetensors")
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def exported(ec_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "ec"
    main_ok(["export", str(ec_run), "-o", str(out)])
    return out


def main_ok(args):
    try:
        main(args)
    except SystemExit as e:
        assert not e.code, f"{args} failed"


def test_export_writes_safetensors_the_run_config_and_the_vocabulary(ec_run, exported):
    from safetensors import safe_open

    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    payload = torch.load(ec_run / "final" / "model.pt", weights_only=True)
    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["ecdit_weights"] == "ema"
        assert sorted(f.keys()) == sorted(payload["ema"])
        assert all(torch.equal(f.get_tensor(k), payload["ema"][k]) for k in f.keys())
    config = json.loads((exported / "config.json").read_text())
    assert config["moe"]["routing"] == "expert_choice" and config["train"] == payload["config"]["train"]
    assert json.loads((exported / "vocab.json").read_text()) == payload["vocabulary"]


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_export_then_load_gives_bit_identical_samples(ec_run, exported, capacity_factor):
    a = sample_run(ec_run, PROMPTS, n=2, steps=4, seed=3, capacity_factor=capacity_factor)
    b = sample_run(exported, PROMPTS, n=2, steps=4, seed=3, capacity_factor=capacity_factor)
    assert np.array_equal(a.images, b.images) and a.settings["flops_per_image"] == b.settings["flops_per_image"]


def test_ecdit_sample_accepts_an_export_directory(ec_run, exported, tmp_path):
    main_ok(["sample", str(exported), "--prompt", "a red circle", "-n", "2", "--steps", "3", "-o", str(tmp_path / "x.png")])
    main_ok(["sample", str(ec_run), "--prompt", "a red circle", "-n", "2", "--steps", "3", "-o", str(tmp_path / "r.png")])
    assert np.array_equal(np.load(tmp_path / "x.npz")["images"], np.load(tmp_path / "r.npz")["images"])


def test_loading_an_export_never_unpickles(exported, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    model, cfg = load_run(exported)
    assert cfg.moe.routing == "expert_choice"


def test_every_torch_load_in_the_package_passes_weights_only_true():
    calls = []
    for path in (ROOT / "ecdit_cli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)
                calls.append((str(path.relative_to(ROOT)), node.lineno, ok))
    assert calls and all(ok for *_, ok in calls), calls


def test_the_readme_plain_torch_script_loads_an_export_to_the_same_model(ec_run, exported):
    readme = (ROOT / "README.md").read_text()
    script = re.search(r"<!-- export-script -->\n```python\n(.*?)```", readme, re.S).group(1)
    assert 'export = "results/demo/runs/small-ec-e8-f2-s0/export"' in script
    scope = {}
    exec(script.replace("results/demo/runs/small-ec-e8-f2-s0/export", str(exported)), scope)
    model, _ = load_run(ec_run)
    with torch.no_grad():
        ref = model(scope["x"], scope["t"], *model.tokenize(["a red circle"])).velocity
    assert torch.equal(scope["velocity"], ref)


def test_an_export_of_a_run_without_ema_holds_its_raw_weights(tmp_path):
    from conftest import train_debug_run

    run = train_debug_run(tmp_path / "run", "dense", "train.ema_decay=0", "train.steps=2")
    res = export_run(run)
    assert res.weights == "model" and res.out_dir == run / "export"
    a = sample_run(run, PROMPTS[:1], n=1, steps=2)
    b = sample_run(res.out_dir, PROMPTS[:1], n=1, steps=2)
    assert np.array_equal(a.images, b.images)


def test_without_safetensors_export_is_one_line_naming_the_extra(ec_run, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(ec_run), "-o", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: exports need the safetensors package: pip install -e '.[export]'"
    assert not (tmp_path / "x").exists()
