"""`ecdit analyze`: files, numbers that agree with a direct forward pass, TC loads, dense runs, CLI."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ecdit_cli import rundir
from ecdit_cli.config import resolve_config, save_config
from ecdit_cli.data.scenes import SceneSpec, scene_for_metadata
from ecdit_cli.errors import EcditError
from ecdit_cli.evaluate.allocation import (
    OBJECT_SHARE_THRESHOLD,
    analyze_model,
    analyze_run,
    ground_truth_inputs,
    ground_truth_records,
    object_coverage,
    patch_shares,
)
from ecdit_cli.evaluate.allocation_figures import token_choice_figure
from ecdit_cli.figures import save_figure
from ecdit_cli.model.accounting import count
from ecdit_cli.model.load import load_run

SETTINGS = {"prompts": ["a red circle", "two squares"], "n": 2, "steps": 4, "scenes_per_tag": 2}
FIGURES = ("heatmaps", "experts_histogram", "object_vs_background", "complexity", "specialisation")


@pytest.fixture(scope="module")
def ec_analysis(ec_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze-ec")
    doc, files = analyze_run(ec_run, out_dir=out, **SETTINGS)
    return doc, files, out


def test_analyze_writes_its_json_raw_routing_and_every_figure_as_png_and_svg(ec_analysis):
    doc, files, out = ec_analysis
    assert json.loads((out / "analyze.json").read_text())["routing"] == "expert_choice"
    for name in FIGURES:
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / f"{name}.svg").stat().st_size > 1000
    assert not (out / "token_choice_load.png").exists() and doc["token_choice"] is None
    raw = np.load(out / "routing.npz")
    assert raw["experts_per_token"].shape == (4, len(doc["moe_blocks"]), 2, 2, 8, 8)


def test_mean_experts_per_token_over_all_tokens_equals_the_capacity_factor_for_expert_choice(ec_analysis):
    doc = ec_analysis[0]
    f = doc["capacity_factor"]
    assert doc["slots_per_token"] == f
    for layer in doc["ground_truth"]["layers"]:
        assert layer["all_mean"] == pytest.approx([f] * len(doc["ground_truth"]["t"]))
    for layer in doc["sampling"]["layers"]:
        assert layer["mean"] == pytest.approx([f] * SETTINGS["steps"])
    hist = np.asarray(doc["sampling"]["histogram"]["counts"])  # (L, bins, E + 1)
    experts = np.arange(hist.shape[-1])
    assert (hist * experts).sum(axis=(1, 2)) / hist.sum(axis=(1, 2)) == pytest.approx(f)
    for layer in doc["complexity"]["layers"]:
        for stats in layer["by_tag"].values():
            assert stats["slots_per_image"]["mean"] == pytest.approx(f * doc["tokens_per_image"])
            assert stats["slots_per_image"]["std"] == pytest.approx(0.0)


def test_object_and_background_token_counts_add_up_to_all_tokens(ec_analysis):
    gt = ec_analysis[0]["ground_truth"]
    assert gt["object_tokens"] + gt["background_tokens"] == gt["tokens"] == gt["num_scenes"] * 64
    assert gt["num_scenes"] == 6 * SETTINGS["scenes_per_tag"]
    assert 0 < gt["object_tokens"] < gt["background_tokens"]
    gen = ec_analysis[0]["sampling"]["generated_objects"]
    assert gen["object_tokens"] + gen["background_tokens"] == 4 * 64


def test_ground_truth_numbers_agree_with_a_direct_forward_pass(ec_run, ec_analysis):
    doc, _, out = ec_analysis
    model, cfg = load_run(ec_run)
    records = ground_truth_records(SETTINGS["scenes_per_tag"], seed=0)
    raw = np.load(out / "routing.npz")["gt_experts_per_token"]  # (L, t, B, T)
    for ti, t in enumerate(doc["ground_truth"]["t"]):
        x, share, _ = ground_truth_inputs(cfg, records, t, ti, seed=0)
        ids, mask = model.tokenize([r["prompt"] for r in records])
        with torch.no_grad():
            routing = model(torch.from_numpy(x), torch.full((len(x),), t), ids, mask).routing
        obj = share.reshape(len(x), -1) >= OBJECT_SHARE_THRESHOLD
        for li, r in enumerate(routing):
            ept = r.experts_per_token_S.view(len(x), -1).numpy()
            np.testing.assert_array_equal(ept, raw[li, ti])
            layer = doc["ground_truth"]["layers"][li]
            assert layer["object_mean"][ti] == pytest.approx(ept[obj].mean())
            assert layer["background_mean"][ti] == pytest.approx(ept[~obj].mean())
            assert layer["all_mean"][ti] == pytest.approx(r.stats["ec_experts_per_token_mean"])
            assert layer["all_std"][ti] == pytest.approx(r.stats["ec_experts_per_token_std"])
            assert layer["max"][ti] == r.stats["ec_experts_per_token_max"]


def test_object_masks_drawn_from_the_metadata_match_the_renderers_masks():
    spec = SceneSpec(32)
    for i, rec in enumerate(ground_truth_records(2, seed=0)):
        scene = scene_for_metadata(spec, rec, 0, i)
        cov = object_coverage(scene.metadata, 32)
        assert cov.shape[0] == len(scene.metadata["objects"])
        np.testing.assert_array_equal(cov.sum(0) > 0, scene.mask)
    shares = patch_shares(np.ones((2, 32, 32)), 4)
    assert shares.shape == (2, 8, 8) and (shares == 1).all()


def test_heatmaps_and_specialisation_agree_with_the_recorded_routing(ec_analysis):
    doc, _, out = ec_analysis
    raw = np.load(out / "routing.npz")
    h = doc["sampling"]["heatmaps"]
    maps = np.asarray(h["maps"])  # (L, K, P, g, g)
    for k, step in enumerate(h["step"]):
        np.testing.assert_array_equal(maps[:, k], raw["experts_per_token"][step, :, :, 0])
        assert h["t"][k] == pytest.approx(raw["t"][step])
    # Summed over experts, the background shares give the background's experts per token (t-averaged).
    for sp, gt in zip(doc["specialisation"]["layers"], doc["ground_truth"]["layers"], strict=True):
        assert sum(sp["background_share"]) == pytest.approx(np.mean(gt["background_weighted_mean"]))
        assert np.asarray(sp["colour_share"]).shape == (doc["num_experts"], 6)


def test_pooled_routing_groups_give_images_different_compute_averaging_to_the_capacity(ec_run):
    model, cfg = load_run(ec_run)
    T = cfg.model.tokens_per_image
    cfg.moe.group_size = 4 * T
    for block in model.dit.blocks:
        if block.is_moe:
            block.mlp.router.group_size = 4 * T
    doc, _, _ = analyze_model(model, cfg, prompts=["a red circle"], n=1, steps=2, scenes_per_tag=2)
    comp = doc["complexity"]
    assert comp["pooled_groups"] and comp["images_per_routing_group"] == 4
    assert comp["slots_per_image_mean"] == pytest.approx(cfg.moe.capacity_factor * T)
    stds = [s["slots_per_image"]["std"] for layer in comp["layers"] for s in layer["by_tag"].values()]
    assert max(stds) > 0


def test_token_choice_run_reports_expert_load_and_dropped_share_per_step(tc_run, tmp_path):
    model, cfg = load_run(tc_run)
    doc, result, _ = analyze_model(model, cfg, **SETTINGS)
    tc = doc["token_choice"]
    assert doc["slots_per_token"] == count(cfg).slots_per_token == 2.0  # one definition, model/accounting.py
    routes = 2 * 2 * 64 * 2  # prompts x images x tokens x top_k
    assert tc["routes_per_step"] == routes and len(tc["t"]) == SETTINGS["steps"]
    for layer in tc["layers"]:
        requested, kept = np.asarray(layer["tokens_per_expert"]), np.asarray(layer["kept_per_expert"])
        assert (requested.sum(1) == routes).all()
        assert (kept <= requested).all()
        assert layer["dropped_share"] == pytest.approx(list(1 - kept.sum(1) / routes))
    assert all(0 <= layer["all_mean"][0] <= 2 for layer in doc["ground_truth"]["layers"])
    files = save_figure(token_choice_figure(doc), tmp_path, "token_choice_load")
    assert files["png"].read_bytes()[:4] == b"\x89PNG" and files["svg"].exists()


def test_a_dense_run_has_no_routing_to_analyse(tmp_path):
    save_config(resolve_config(preset="debug"), tmp_path / rundir.CONFIG)
    with pytest.raises(EcditError, match="dense.*no routing to analyse"):
        analyze_run(tmp_path)


@pytest.fixture(scope="module")
def cli():
    from ecdit_cli.cli import _register, app

    _register()
    return app


def test_analyze_command_prints_objects_vs_background_and_writes_the_files(cli, ec_run, tmp_path, monkeypatch):
    import ecdit_cli.evaluate.allocation

    monkeypatch.setattr(ecdit_cli.evaluate.allocation, "write_figures", lambda doc, result, out: {})  # tested above; slow
    res = CliRunner().invoke(cli, ["analyze", str(ec_run), "-p", "a blue square", "-n", "1", "--steps", "3",
                                   "--scenes-per-tag", "1", "--device", "cpu", "-o", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "object" in res.output and "background" in res.output
    assert (tmp_path / "a" / "analyze.json").exists() and (tmp_path / "a" / "routing.npz").exists()


def test_analyze_command_on_a_dense_run_exits_2_with_one_line(cli, tmp_path, capsys):
    from ecdit_cli.cli import main

    save_config(resolve_config(preset="debug"), tmp_path / rundir.CONFIG)
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no routing to analyse" in err


@pytest.mark.parametrize("routing,f,k,slots", [
    ("token_choice", 2.0, 2, 2.0),  # top-2 routes fit the buffers
    ("token_choice", 1.0, 2, 1.0),  # buffers for 1 slot per token cap top-2 at 1 (the rest is dropped)
    ("token_choice", 4.0, 1, 1.0),  # top-1: spare buffer slots do not add experts
    ("expert_choice", 1.0, 2, 1.0),  # EC: E * C / G, top_k plays no part
    ("expert_choice", 4.0, 2, 4.0),
])
def test_slots_per_token_is_top_k_capped_by_the_buffers_for_token_choice_and_e_c_over_g_for_expert_choice(
        routing, f, k, slots):
    from ecdit_cli.config import resolve_config

    cfg = resolve_config(preset="debug", overrides=[f"moe.routing={routing}", f"moe.capacity_factor={f}",
                                                    f"moe.top_k={k}"])
    assert count(cfg).slots_per_token == slots
