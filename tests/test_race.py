"""Race routing and batch-level routing groups (Race-DiT, arXiv 2503.16057): equivalences,
the learned inference threshold, batch independence at inference, resume and refusals."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures_moe import copy_dense_into_expert, tensor_sizes

from ecdit_cli import rundir
from ecdit_cli.config import resolve_config
from ecdit_cli.errors import ConfigError
from ecdit_cli.model.moe import FeedForward, MoEFeedForward
from ecdit_cli.model.routing import expert_capacity, expert_choice, race, slots_to_routes


def _layer(routing="race", E=4, D=16, F_=32, f=2.0, group=8, routing_group="image", T=8, ds=False):
    torch.manual_seed(1)
    layer = MoEFeedForward(D, F_, E, routing, f, 2, 0 if routing_group == "batch" else group,
                           use_deepspeed_layer=ds, routing_group=routing_group, tokens_per_image=T)
    torch.nn.init.normal_(layer.router.wg.weight, std=0.5)  # decisive routing
    return layer


def _explicit_race(layer, x_BTD, group):
    """Race from its definition: per group, the E * C largest affinities over all (token, expert)."""
    B, T, D = x_BTD.shape
    x = x_BTD.reshape(-1, D)
    r, ex = layer.router, layer.experts
    probs = torch.softmax(x @ r.wg.weight.T, dim=-1)
    out = torch.zeros_like(x)
    for start in range(0, x.shape[0], group):
        ps = probs[start:start + group]
        k = r.num_experts * expert_capacity(ps.shape[0], r.capacity_factor, r.num_experts)
        for flat in ps.reshape(-1).topk(k).indices.tolist():
            s, e = start + flat // r.num_experts, flat % r.num_experts
            h = F.gelu(x[s] @ ex.w1[e] + ex.b1[e], approximate="tanh") @ ex.w2[e] + ex.b2[e]
            out[s] += probs[s, e] * h
    return out.view(B, T, D)


@pytest.mark.parametrize("group", [8, 16, 0])
def test_race_keeps_the_e_x_c_largest_affinities_of_each_group_and_matches_its_definition(group):
    layer = _layer(group=group or 32, routing_group="batch" if group == 0 else "image")
    x = torch.randn(4, 8, 16)
    y, r = layer(x)
    G = group or 32
    torch.testing.assert_close(y, _explicit_race(layer, x, G), rtol=1e-5, atol=1e-6)
    used = r.token_idx_EC < r.num_tokens
    assert int(used.sum()) == (32 // G) * 4 * expert_capacity(G, 2.0, 4)
    # An expert never holds a token twice: (token, expert) pairs are unique.
    pairs = {(int(t), e) for e in range(4) for t in r.token_idx_EC[e][used[e]]}
    assert len(pairs) == int(used.sum())
    assert r.stats["race_experts_per_token_mean"] == pytest.approx(2.0)


def test_global_race_with_a_threshold_that_keeps_exactly_e_x_c_slots_equals_its_top_k():
    torch.manual_seed(0)
    logits = torch.randn(64, 8, requires_grad=True)
    top = race(logits, 0, 2.0)
    k = 8 * expert_capacity(64, 2.0, 8)
    kth = torch.softmax(logits.detach(), -1).reshape(-1).topk(k).values[-1]
    by_threshold = race(logits, 0, 2.0, threshold=float(kth))
    assert int((by_threshold.token_idx_EC < 64).sum()) == k
    x = torch.randn(64, 16)
    layer = _layer(E=8)

    def combine(r):
        from ecdit_cli.model.moe import dispatch_combine
        return dispatch_combine(x, r, layer.experts)

    torch.testing.assert_close(combine(by_threshold), combine(top), rtol=1e-6, atol=1e-7)
    assert top.threshold_score == pytest.approx(float(kth))


def test_race_slot_table_converts_to_deepspeed_routes_with_unique_slots():
    r = race(torch.randn(48, 4), 16, 2.0)
    idx, loc, _ = slots_to_routes(r)
    used = idx >= 0
    assert torch.equal(used.sum(0), r.experts_per_token_S)
    assert len(set(zip(idx[used].tolist(), loc[used].tolist()))) == int(used.sum())


@pytest.mark.parametrize("routing", ["expert_choice", "race"])
def test_batch_routing_with_a_micro_batch_of_one_image_equals_per_image_routing(routing):
    per_image = _layer(routing, routing_group="image")
    batch = _layer(routing, routing_group="batch")
    batch.load_state_dict(per_image.state_dict())
    x = torch.randn(1, 8, 16)
    y1, r1 = per_image(x)
    y2, r2 = batch(x)
    torch.testing.assert_close(y2, y1)
    assert torch.equal(r2.experts_per_token_S, r1.experts_per_token_S)


def test_batch_expert_choice_pools_the_micro_batch_in_training_and_routes_per_image_in_eval_mode():
    layer = _layer("expert_choice", routing_group="batch")
    x = torch.randn(4, 8, 16)
    y_train, r = layer(x)
    pooled = expert_choice(x.reshape(-1, 16) @ layer.router.wg.weight.T, 32, 2.0)
    assert torch.equal(r.experts_per_token_S, pooled.experts_per_token_S)
    per_image = _layer("expert_choice", routing_group="image")
    per_image.load_state_dict(layer.state_dict())
    layer.eval()
    torch.testing.assert_close(layer(x)[0], per_image(x)[0])


@pytest.mark.parametrize("routing_group", ["image", "batch"])
def test_race_with_one_expert_and_capacity_covering_all_tokens_equals_a_dense_ffn(routing_group):
    D, F_ = 16, 32
    dense = FeedForward(D, F_)
    layer = MoEFeedForward(D, F_, 1, "race", 1.0, 1, 0 if routing_group == "batch" else 8,
                           routing_group=routing_group, tokens_per_image=8)
    copy_dense_into_expert(layer, dense)
    x1 = torch.randn(3, 8, D, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y_dense = dense(x1)
    y_moe, _ = layer(x2)
    torch.testing.assert_close(y_moe, y_dense, rtol=1e-6, atol=1e-6)
    y_dense.square().sum().backward()
    y_moe.square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.experts.w1.grad[0], dense.fc1.weight.grad.T, rtol=1e-5, atol=1e-6)
    layer.eval()  # the learned threshold is 1.0 (the only score), so inference keeps every token too
    torch.testing.assert_close(layer(x2)[0], y_dense, rtol=1e-6, atol=1e-6)


def test_the_race_threshold_ema_updates_only_in_training_mode_and_is_used_in_eval_mode():
    layer = _layer(E=4)
    router = layer.router
    router.race_momentum = 0.5
    assert float(router.race_threshold) == -1.0  # not learned yet
    x1, x2 = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    _, r1 = layer(x1)
    kth1 = float(r1.threshold_score)
    assert float(router.race_threshold) == pytest.approx(kth1)  # the first step takes the k-th score
    _, r2 = layer(x2)
    expected = 0.5 * kth1 + 0.5 * float(r2.threshold_score)
    assert float(router.race_threshold) == pytest.approx(expected)
    layer.eval()
    with torch.no_grad():
        _, r3 = layer(torch.randn(3, 8, 16) * 3)
    assert float(router.race_threshold) == pytest.approx(expected)  # eval mode leaves it alone
    # Eval mode keeps exactly the (token, expert) pairs whose affinity reaches the threshold.
    x3 = torch.randn(3, 8, 16)
    with torch.no_grad():
        _, r3 = layer(x3)
    probs = torch.softmax(x3.reshape(-1, 16) @ router.wg.weight.T, -1)
    assert torch.equal(r3.experts_per_token_S, (probs >= expected).sum(-1))
    assert r3.stats["race_threshold"] == pytest.approx(expected)
    # topk inference: the image's own top-k instead of the threshold.
    router.race_inference = "topk"
    with torch.no_grad():
        _, r4 = layer(x3)
    assert int((r4.token_idx_EC < 24).sum()) == 3 * 4 * expert_capacity(8, 2.0, 4)


@pytest.mark.parametrize("routing,routing_group", [("race", "image"), ("race", "batch"),
                                                   ("expert_choice", "batch")])
def test_a_sample_is_independent_of_its_batch_neighbours_in_eval_mode(routing, routing_group):
    layer = _layer(routing, routing_group=routing_group)
    layer(torch.randn(4, 8, 16))  # one training step: race learns a threshold
    layer.eval()
    x = torch.randn(4, 8, 16)
    with torch.no_grad():
        y_all, _ = layer(x)
        y_mixed, _ = layer(torch.cat([x[2:3], torch.randn(3, 8, 16) * 4]))
        y_alone, _ = layer(x[2:3])
    torch.testing.assert_close(y_mixed[0], y_all[2])
    torch.testing.assert_close(y_alone[0], y_all[2])
    if routing_group == "batch":  # in training the neighbours do matter: they share the pool
        layer.train()
        y_all, _ = layer(x)
        y_mixed, _ = layer(torch.cat([x[2:3], torch.randn(3, 8, 16) * 4]))
        assert not torch.allclose(y_mixed[0], y_all[2])


@pytest.mark.parametrize("group", [8, 0])
def test_race_through_deepspeeds_moe_layer_equals_the_fast_path(group):
    fast = _layer(group=group or 8, routing_group="batch" if group == 0 else "image")
    ds = copy.deepcopy(fast)
    ds.use_deepspeed_layer = True
    x1 = torch.randn(4, 8, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, _ = fast(x1)
    y2, _ = ds(x2)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-6)
    y1.square().mean().backward()
    y2.square().mean().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    for (n, p1), (_, p2) in zip(fast.named_parameters(), ds.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_race_builds_no_tokens_by_experts_by_capacity_tensor():
    S, E, G = 256, 8, 64
    layer = _layer(E=E, group=G, T=G)
    x = torch.randn(4, G, 16)
    with tensor_sizes() as seen:
        layer(x)
    C = expert_capacity(G, 2.0, E) * (S // G)
    assert seen and max(seen) < S * E * C // 4


def test_the_race_threshold_stays_fp32_when_the_model_is_cast_to_bf16():
    layer = _layer()
    layer(torch.randn(2, 8, 16))
    thr = layer.router.race_threshold.clone()
    layer.to(torch.bfloat16)
    assert layer.router.race_threshold.dtype == torch.float32 and torch.equal(layer.router.race_threshold, thr)


@pytest.mark.parametrize("overrides,message", [
    (["moe.routing=token_choice", "moe.routing_group=batch"],
     "moe.routing_group='batch' is invalid: batch groups apply to moe.routing=expert_choice or race, "
     "not moe.routing=token_choice"),
    (["moe.routing=dense", "moe.routing_group=batch"], "not moe.routing=dense"),
    (["moe.routing=expert_choice", "moe.routing_group=batch", "moe.group_size=128"],
     "moe.group_size=128 is invalid: must be 0 with moe.routing_group=batch"),
    (["moe.routing=race", "moe.race_threshold_momentum=1.0"], "moe.race_threshold_momentum=1.0 is invalid"),
    (["moe.routing=race", "moe.routing_group=pool"], "moe.routing_group"),
    (["moe.routing=race", "moe.race_expert_cap=-1"], "moe.race_expert_cap=-1.0 is invalid: must be >= 0"),
])
def test_bad_race_and_batch_group_combinations_give_one_line_naming_the_keys(overrides, message):
    with pytest.raises(ConfigError) as err:
        resolve_config(preset="debug", overrides=overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_race_and_batch_expert_choice_count_the_slot_budget_of_expert_choice():
    from ecdit_cli.model.accounting import count, flops_at_slots

    ec = count(resolve_config(preset="debug", overrides=["moe.routing=expert_choice"]))
    for ov in (["moe.routing=race"], ["moe.routing=race", "moe.routing_group=batch"],
               ["moe.routing=expert_choice", "moe.routing_group=batch"]):
        acc = count(resolve_config(preset="debug", overrides=ov))
        assert acc.flops_per_image == ec.flops_per_image and acc.params_active == ec.params_active
    cfg = resolve_config(preset="debug", overrides=["moe.routing=race"])
    assert flops_at_slots(cfg, ec.slots_per_token) == pytest.approx(ec.flops_per_image)
    per_slot = ec.breakdown_flops["experts"] / ec.slots_per_token
    assert flops_at_slots(cfg, 1.5) == pytest.approx(ec.flops_per_image - 0.5 * per_slot)


def test_a_race_run_resumes_exactly_with_its_threshold_checkpointed(tmp_path):
    from ecdit_cli.files import read_jsonl
    from ecdit_cli.model.load import load_run
    from ecdit_cli.train.loop import Callbacks, train

    cfg = resolve_config(preset="debug", overrides=[
        "moe.routing=race", "moe.routing_group=batch", "train.steps=12", "train.batch_size=4",
        "data.val_size=8", "train.warmup_steps=2", "train.log_every=3", "train.val_every=6", "train.ckpt_every=4",
        "train.val_timesteps=2"])
    train(cfg, tmp_path / "ref")

    class Crash(Exception):
        pass

    def crash(step, info):
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, tmp_path / "cut", Callbacks(on_step=crash))
    train(cfg, tmp_path / "cut")

    def metrics(d):
        return [{k: v for k, v in r.items() if k not in ("images_per_s", "wall_time_s")}
                for r in read_jsonl(d / rundir.METRICS)]

    ref = metrics(tmp_path / "ref")
    assert metrics(tmp_path / "cut") == ref
    trains = [r for r in ref if r["kind"] == "train"]
    assert trains[-1]["race_threshold"] > 0 and trains[-1]["race_experts_per_token_mean"] == pytest.approx(2.0)
    assert trains[-1]["race_experts_per_token_min"] <= 2.0 <= trains[-1]["race_experts_per_token_max"]
    a = torch.load(tmp_path / "ref" / rundir.FINAL_WEIGHTS)
    b = torch.load(tmp_path / "cut" / rundir.FINAL_WEIGHTS)
    keys = [k for k in a["model"] if k.endswith("race_threshold")]
    assert keys and keys == [k for k in a["ema"] if k.endswith("race_threshold")]
    for k in keys:
        assert torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["ema"][k], b["ema"][k])
    model, _ = load_run(tmp_path / "ref")
    gate = next(m for m in model.modules() if hasattr(m, "race_threshold"))
    assert float(gate.race_threshold) == float(a["ema"][keys[0]]) > 0
    assert json.loads((tmp_path / "cut" / rundir.SUMMARY).read_text())["status"] == "done"


@pytest.fixture(scope="module")
def race_run(tmp_path_factory):
    """A finished race run of the debug preset (batch-level groups in training)."""
    from conftest import train_debug_run

    return train_debug_run(tmp_path_factory.mktemp("runs") / "race", "race", "moe.routing_group=batch")


def test_race_sampling_reports_measured_experts_per_token_and_the_activated_flops_they_cost(race_run):
    from ecdit_cli.evaluate.sample import sample_run
    from ecdit_cli.model.accounting import count, flops_at_slots, vocab_size
    from ecdit_cli.model.load import load_run

    prompts = ["a red circle", "two blue squares"]
    # Without guidance every forward pass is a recorded conditional one: meter and record agree.
    unguided = sample_run(race_run, prompts, n=2, steps=2, cfg_scale=1.0, record_routing=True)
    assert unguided.settings["slots_per_token"] == pytest.approx(float(unguided.routing.experts_per_token.mean()))
    by_threshold = sample_run(race_run, prompts, n=2, steps=2)
    _, cfg = load_run(race_run)
    s = by_threshold.settings
    assert s["race_mode"] == "threshold"
    assert s["flops_per_image"] == pytest.approx(flops_at_slots(cfg, s["slots_per_token"]))
    topk = sample_run(race_run, prompts, n=2, steps=2, race_mode="topk")
    assert topk.settings["race_mode"] == "topk" and topk.settings["slots_per_token"] == pytest.approx(2.0)
    assert topk.settings["flops_per_image"] == pytest.approx(count(cfg, vocab_size(cfg)).flops_per_image)
    # By threshold, an image is the same whether sampled alone or with other prompts.
    alone = sample_run(race_run, prompts[:1], n=1, steps=2)
    np.testing.assert_allclose(alone.images[0, 0], by_threshold.images[0, 0], atol=1e-5)


def test_race_eval_in_top_k_mode_writes_beside_the_runs_own_eval_json(race_run):
    from ecdit_cli.evaluate.eval_run import evaluate_run

    own = evaluate_run(race_run, n=1, steps=2, per_tag=1, fd=False)
    before = (race_run / rundir.EVAL).read_bytes()
    other = evaluate_run(race_run, n=1, steps=2, per_tag=1, fd=False, race_mode="topk")
    assert (race_run / rundir.EVAL).read_bytes() == before
    assert json.loads((race_run / "eval_topk.json").read_text()) == json.loads(json.dumps(other))
    assert own["settings"]["race_mode"] == "threshold" and other["settings"]["race_mode"] == "topk"
    assert other["settings"]["slots_per_token"] == pytest.approx(2.0)
    assert own["flops_per_image"] > 0 and own["settings"]["slots_per_token"] > 0


def test_analyze_on_a_race_run_reports_its_measured_experts_per_token(race_run, tmp_path):
    from ecdit_cli.evaluate.allocation import analyze_run

    doc, files = analyze_run(race_run, out_dir=tmp_path, prompts=["a red circle"], n=1, steps=2, scenes_per_tag=1)
    assert doc["routing"] == "race" and doc["race_mode"] == "threshold" and doc["routing_group"] == "batch"
    assert doc["slots_per_token_measured"] > 0 and files["json"].is_file()


def test_a_sweep_over_routing_groups_collapses_the_axis_for_dense_and_token_choice_and_names_race_points():
    from ecdit_cli.model.accounting import count
    from ecdit_cli.study.labels import series_labels
    from ecdit_cli.study.spec import make_sweep, parse_spec, run_id_for_config

    spec = parse_spec({"name": "v", "grid": {"size": ["debug"], "routing": ["dense", "token_choice", "expert_choice",
                                                                            "race"],
                                             "num_experts": [8], "capacity_factor": [2.0], "top_k": [2],
                                             "routing_group": ["image", "batch"], "steps": [10]}})
    points = {p.run_id: p for p in make_sweep(spec)}
    assert sorted(points) == sorted(["debug-dense-s0", "debug-tc-e8-k2-s0", "debug-ec-e8-f2-image-s0",
                                     "debug-ec-e8-f2-batch-s0", "debug-race-e8-f2-image-s0",
                                     "debug-race-e8-f2-batch-s0"])
    assert points["debug-race-e8-f2-batch-s0"].config.moe.routing_group == "batch"
    assert points["debug-tc-e8-k2-s0"].config.moe.routing_group == "image"
    # The dense point is matched to the reference MoE point's FLOPs; race costs the same as EC.
    flops = {rid: count(p.config).flops_per_image for rid, p in points.items()}
    assert flops["debug-race-e8-f2-batch-s0"] == flops["debug-ec-e8-f2-image-s0"]
    assert flops["debug-dense-s0"] == pytest.approx(flops["debug-ec-e8-f2-image-s0"], rel=1e-3)
    single = resolve_config(preset="debug", overrides=["moe.routing=race", "moe.routing_group=batch"])
    assert run_id_for_config(single) == "debug-race-e8-f2-batch-s0"
    assert run_id_for_config(resolve_config(preset="debug", overrides=["moe.routing=race"])) == "debug-race-e8-f2-s0"
    import pandas as pd

    runs = pd.DataFrame([{"routing": p.axes["routing"], "routing_group": p.axes.get("routing_group")}
                         for p in points.values()])
    assert set(series_labels(runs, ["routing", "routing_group"])) == {
        "dense", "token_choice", "expert_choice", "expert_choice group=batch", "race", "race group=batch"}


def test_a_study_with_race_points_trains_and_plots_race_statistics_in_its_own_colour(tmp_path):
    from ecdit_cli.cli import main
    from ecdit_cli.study.figure_style import routing_color

    spec = tmp_path / "spec.yaml"
    spec.write_text("name: r\nbase: {train: {batch_size: 4, val_every: 4, log_every: 2, ckpt_every: 4, "
                    "val_timesteps: 2, warmup_steps: 1}, data: {val_size: 4}}\n"
                    "grid: {size: [debug], routing: [dense, race], routing_group: [batch], steps: [4]}\n")
    for args in (["sweep", str(spec), "-o", str(tmp_path / "r")], ["train", "--sweep", str(tmp_path / "r")],
                 ["plot", str(tmp_path / "r")]):
        try:
            main(args)
        except SystemExit as e:
            assert not e.code, args
    runs = (tmp_path / "r" / "runs.csv").read_text()
    assert "debug-race-batch-s0" in runs and "debug-dense-s0" in runs  # -batch even where the axis has one value
    assert (tmp_path / "r" / "plots" / "race_stats.png").is_file()
    assert "race_stats" in (tmp_path / "r" / "report.md").read_text()
    assert routing_color("race") not in {routing_color(r) for r in ("dense", "token_choice", "expert_choice")}


def test_an_expert_cap_keeps_each_experts_highest_picks_per_group_and_a_loose_cap_changes_nothing():
    torch.manual_seed(3)
    logits = torch.randn(64, 4)
    logits[:, 0] += 2.0  # expert 0 wins most of the race
    G, E, f = 16, 4, 2.0
    free = race(logits, G, f)
    capped = race(logits, G, f, expert_cap=1.0)
    C = expert_capacity(G, f, E)
    probs = torch.softmax(logits, -1)
    for n in range(64 // G):
        for e in range(E):
            mine = [int(t) for t in free.token_idx_EC[e] if n * G <= t < (n + 1) * G]
            kept = sorted(int(t) for t in capped.token_idx_EC[e] if n * G <= t < (n + 1) * G)
            best = sorted(sorted(mine, key=lambda t: -float(probs[t, e]))[:C])
            assert kept == best, (n, e)
    assert int((free.token_idx_EC[0] < 64).sum()) > 4 * C >= capped.capacity
    assert capped.stats["race_dropped_frac"] > 0 and free.stats["race_dropped_frac"] == 0
    loose = race(logits, G, f, expert_cap=E / f)  # cap x C = G: the natural bound
    assert torch.equal(loose.experts_per_token_S, free.experts_per_token_S)
    # With a threshold the cap applies per image, so images stay independent.
    t = float(free.threshold_score)
    a = race(logits, G, f, threshold=t, expert_cap=1.0)
    b = race(logits[:G], G, f, threshold=t, expert_cap=1.0)
    assert torch.equal(a.experts_per_token_S[:G], b.experts_per_token_S)


def test_the_race_balance_loss_is_one_for_uniform_picks_and_grows_when_one_expert_takes_them_all():
    uniform = race(torch.zeros(32, 4) + torch.eye(4).repeat(8, 1) * 1e-4, 0, 1.0)
    assert float(uniform.aux_loss) == pytest.approx(1.0, abs=1e-3)
    skewed = torch.zeros(32, 4)
    skewed[:, 0] = 10.0
    one = race(skewed, 0, 1.0)
    assert float(one.aux_loss) > 3.5 and one.tokens_per_expert_E.tolist() == [32, 0, 0, 0]
    assert race(skewed, 0, 1.0, threshold=0.5).aux_loss is None  # inference: no loss
