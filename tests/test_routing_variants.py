"""Routing variants (moe.shared_experts, expert_width_mult, router_input, route_scale,
renormalize_gates, capacity_schedule, routing_debug): equivalences, invariants, accounting, ids."""

import copy
import io

import pandas as pd
import pytest
import torch
from fixtures_moe import tensor_sizes
from torch import nn

from ecdit_cli.config import resolve_config
from ecdit_cli.errors import ConfigError
from ecdit_cli.model.accounting import (
    capacity_settings,
    count,
    dense_width_for_flops,
    layer_slots_per_token,
    trained_capacity_factor,
)
from ecdit_cli.model.dit import DiT, DiTBlock
from ecdit_cli.model.moe import FeedForward, MoEFeedForward, dispatch_combine, dispatch_combine_reference
from ecdit_cli.model.routing import debug_routing, expert_capacity, expert_choice, scale_gates
from ecdit_cli.study.labels import series_labels
from ecdit_cli.study.spec import make_sweep, parse_spec, run_id_for_config

EC = "moe.routing=expert_choice"


def _layer(routing="expert_choice", E=4, D=16, F_=32, f=2.0, k=2, group=8, ds=False, **variant):
    torch.manual_seed(1)
    layer = MoEFeedForward(D, F_, E, routing, f, k, group, use_deepspeed_layer=ds, **variant)
    nn.init.normal_(layer.router.wg.weight, std=0.5)  # decisive routing
    return layer


def _copy_ffn(dst: FeedForward, w1, b1, w2, b2) -> None:
    with torch.no_grad():
        dst.fc1.weight.copy_(w1.T)
        dst.fc1.bias.copy_(b1)
        dst.fc2.weight.copy_(w2.T)
        dst.fc2.bias.copy_(b2)


# ---------------------------------------------------------------------------------------------
# Shared experts


@pytest.mark.parametrize("ds", [False, True], ids=["fast", "deepspeed_layer"])
@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_a_shared_expert_with_zeroed_routed_experts_equals_a_dense_ffn_of_the_shared_width(routing, ds):
    layer = _layer(routing, ds=ds, shared_hidden=24)
    with torch.no_grad():
        layer.experts.w2.zero_()
        layer.experts.b2.zero_()
    dense = FeedForward(16, 24)
    dense.load_state_dict(layer.shared.state_dict())
    x1 = torch.randn(3, 8, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y_moe, _ = layer(x1)
    y_dense = dense(x2)
    torch.testing.assert_close(y_moe, y_dense, rtol=1e-6, atol=1e-6)
    y_moe.square().sum().backward()
    y_dense.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.shared.fc1.weight.grad, dense.fc1.weight.grad, rtol=1e-5, atol=1e-6)
    # An ordinary data-parallel module: no expert marker, so the engine all-reduces it over every rank.
    assert all(getattr(p, "allreduce", True) for p in layer.shared.parameters())


def test_shared_experts_are_one_ffn_of_their_summed_width_and_refused_for_dense():
    cfg = resolve_config(preset="debug", overrides=[EC, "moe.shared_experts=2", "moe.shared_expert_width_mult=0.25"])
    assert cfg.shared_hidden == cfg.model.mlp_hidden // 2
    block = DiT(cfg).blocks[1]
    assert block.mlp.shared.fc1.out_features == cfg.shared_hidden
    with pytest.raises(ConfigError, match="moe.shared_experts=1 is invalid: only applies to MoE routings"):
        resolve_config(preset="debug", overrides=["moe.shared_experts=1"])


# ---------------------------------------------------------------------------------------------
# One expert with capacity covering every token: every routed variant is a dense FFN of its width


ONE_EXPERT_VARIANTS = [
    # routing, layer keywords, output scale
    ("expert_choice", {"routing_debug": "balanced"}, 1.0),
    ("expert_choice", {"routing_debug": "random", "debug_seed": 5}, 1.0),
    ("token_choice", {"routing_debug": "random"}, 1.0),
    ("token_choice", {"routing_debug": "balanced"}, 1.0),
    ("expert_choice", {"renormalize_gates": True, "route_scale": 2.5}, 2.5),
    ("token_choice", {"route_scale": 0.5}, 0.5),
    ("expert_choice", {"router_input_size": 5}, 1.0),  # decoupled: the router reads its own input
    ("token_choice", {"router_input_size": 5, "renormalize_gates": True}, 1.0),
    # Race takes every variant but the debug routers (one expert, f = 1: k = G picks, every token).
    ("race", {"router_input_size": 5, "renormalize_gates": True, "route_scale": 2.5}, 2.5),
    ("race", {"route_scale": 0.5}, 0.5),
]


@pytest.mark.parametrize("ds", [False, True], ids=["fast", "deepspeed_layer"])
@pytest.mark.parametrize("routing,variant,scale", ONE_EXPERT_VARIANTS)
def test_one_expert_covering_every_token_equals_a_dense_ffn_of_the_expert_width_for_every_variant(
        routing, variant, scale, ds):
    D, Fe = 16, 12  # a narrow (fine-grained) expert: the dense FFN has its width
    layer = _layer(routing, E=1, F_=Fe, f=1.0, k=1, ds=ds, **variant)
    dense = FeedForward(D, Fe)
    ex = layer.experts
    _copy_ffn(dense, ex.w1[0], ex.b1[0], ex.w2[0], ex.b2[0])
    x1 = torch.randn(3, 8, D, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    router_input = torch.randn(3, 8, 5) if "router_input_size" in variant else None
    y_moe, r = layer(x1, router_input)
    y_dense = scale * dense(x2)
    assert torch.equal(r.experts_per_token_S, torch.ones(24, dtype=torch.long))
    torch.testing.assert_close(y_moe, y_dense, rtol=1e-6, atol=1e-6)
    y_moe.square().sum().backward()
    y_dense.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ex.w1.grad[0], dense.fc1.weight.grad.T, rtol=1e-5, atol=1e-6)


def _moe_and_dense_models(overrides):
    """A one-expert MoE DiT with `overrides` and the dense DiT holding the same weights."""
    moe_cfg = resolve_config(preset="debug", overrides=[EC, "moe.num_experts=1", "model.depth=4", *overrides])
    dense_cfg = resolve_config(preset="debug", overrides=["model.depth=4"])
    torch.manual_seed(0)
    moe, dense = DiT(moe_cfg), DiT(dense_cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # leave adaLN-Zero's identity so that every branch counts
    dense_state = dense.state_dict()
    for name, value in moe.state_dict().items():
        if name in dense_state:
            dense_state[name] = value
    dense.load_state_dict(dense_state)
    for moe_block, dense_block in zip(moe.blocks, dense.blocks, strict=True):
        if moe_block.is_moe:
            ex = moe_block.mlp.experts
            _copy_ffn(dense_block.mlp, ex.w1[0], ex.b1[0], ex.w2[0], ex.b2[0])
    return moe, dense


@pytest.mark.parametrize("overrides", [
    ["moe.capacity_schedule=[1, 3]"],
    ["moe.router_input=decoupled"],
    ["moe.routing_debug=random", "moe.renormalize_gates=true"],
    ["moe.routing=race", "moe.capacity_schedule=[1, 3]", "moe.router_input=decoupled"],
    ["moe.routing_group=batch", "moe.capacity_schedule=[1, 2]", "moe.routing_debug=balanced"],
    ["moe.routing=race", "moe.routing_group=batch", "moe.router_input=decoupled", "moe.renormalize_gates=true"],
])
def test_a_one_expert_dit_with_a_routed_variant_equals_the_dense_dit_with_its_weights(overrides):
    moe, dense = _moe_and_dense_models(overrides)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, generator=g)
    text, mask = torch.randn(2, 5, 32, generator=g), torch.ones(2, 5, dtype=torch.bool)
    out = moe(x, t, text, mask)
    assert len(out.routing) == 2
    torch.testing.assert_close(out.velocity, dense(x, t, text, mask).velocity, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Router input


def _block(router_input):
    cfg = resolve_config(preset="debug", overrides=[EC, f"moe.router_input={router_input}"])
    torch.manual_seed(0)
    block = DiTBlock(cfg, 1)
    nn.init.normal_(block.mlp.router.wg.weight, std=1.0)
    nn.init.zeros_(block.adaLN_modulation[-1].weight)  # adaLN-Zero: no modulation, as at init
    nn.init.zeros_(block.adaLN_modulation[-1].bias)
    return cfg, block


def test_decoupled_router_input_changes_routing_with_the_timestep_while_hidden_routing_does_not_see_it():
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 64, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    c1, c2 = torch.randn(2, 32, generator=g), torch.randn(2, 32, generator=g)
    for router_input, changes in (("hidden", False), ("decoupled", True)):
        cfg, block = _block(router_input)
        assert block.mlp.router.wg.in_features == (2 if changes else 1) * cfg.model.hidden_size
        _, r1 = block(x, c1, text, mask)
        _, r2 = block(x, c2, text, mask)
        assert torch.equal(r1.token_idx_EC, r2.token_idx_EC) != changes, router_input


def test_decoupled_routing_reads_the_unmodulated_token_so_adaln_modulation_does_not_move_it():
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 64, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    mask, c = torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 32, generator=g)
    for router_input, moves in (("hidden", True), ("decoupled", False)):
        _, block = _block(router_input)
        _, r1 = block(x, c, text, mask)
        D = x.shape[-1]
        with torch.no_grad():  # a strong timestep-dependent shift and scale of the FFN input only
            block.adaLN_modulation[-1].weight[3 * D:5 * D].normal_(std=1.0)
        _, r2 = block(x, c, text, mask)
        assert torch.equal(r1.token_idx_EC, r2.token_idx_EC) != moves, router_input


def test_a_router_with_its_own_input_refuses_a_call_without_it():
    layer = _layer(router_input_size=5, ds=True)
    with pytest.raises(RuntimeError, match="router_input"):
        layer(torch.randn(2, 8, 16))


# ---------------------------------------------------------------------------------------------
# Gate scaling


def test_renormalised_gates_make_each_routed_tokens_weights_sum_to_the_route_scale():
    logits = torch.randn(32, 4)
    raw = expert_choice(logits, 8, 1.0)
    r = scale_gates(copy.copy(raw), renormalize=True, route_scale=2.5)
    per_token = torch.zeros(33).index_add(0, r.token_idx_EC.reshape(-1), r.weight_EC.reshape(-1))[:32]
    routed = raw.experts_per_token_S > 0
    assert (~routed).any()  # f = 1: some tokens get no expert, and keep zero
    torch.testing.assert_close(per_token[routed], torch.full((int(routed.sum()),), 2.5))
    assert torch.equal(per_token[~routed], torch.zeros(int((~routed).sum())))
    scaled = scale_gates(copy.copy(raw), renormalize=False, route_scale=0.5)
    torch.testing.assert_close(scaled.weight_EC, 0.5 * raw.weight_EC)
    assert scale_gates(copy.copy(raw), False, 1.0).weight_EC is raw.weight_EC  # defaults: untouched


# ---------------------------------------------------------------------------------------------
# Capacity schedule


@pytest.mark.parametrize("depth,schedule,expected", [
    (6, "[]", [2.0, 2.0, 2.0]),
    (6, "[4, 2]", [4.0, 4.0, 2.0]),  # three MoE layers: the middle one counts as early
    (8, "[4, 2]", [4.0, 4.0, 2.0, 2.0]),
    (6, "[1, 2, 3]", [1.0, 2.0, 3.0]),
    (2, "[4, 2]", [4.0]),
])
def test_a_capacity_schedule_gives_each_moe_layer_its_stated_capacity(depth, schedule, expected):
    cfg = resolve_config(preset="debug", overrides=[EC, f"model.depth={depth}", f"moe.capacity_schedule={schedule}"])
    assert cfg.moe.capacity_factors(depth) == expected
    model = DiT(cfg)
    assert [b.mlp.router.capacity_factor for b in model.blocks if b.is_moe] == expected
    out = model(torch.randn(2, 3, 32, 32), torch.rand(2), torch.randn(2, 4, 32), torch.ones(2, 4, dtype=torch.bool))
    T, E = cfg.model.tokens_per_image, cfg.moe.num_experts
    assert [r.capacity for r in out.routing] == [2 * expert_capacity(T, f, E) for f in expected]


def test_accounting_follows_the_capacity_schedule_by_a_hand_count():
    base = resolve_config(preset="debug", overrides=[EC, "model.depth=6"])
    sched = resolve_config(preset="debug", overrides=[EC, "model.depth=6", "moe.capacity_schedule=[4, 2]"])
    D, Fh, T = 32, 128, 64
    expert_params = 2 * D * Fh + Fh + D
    a, b = count(sched), count(base)
    # Factors 4, 4, 2 instead of 2, 2, 2: four more expert FFNs per token over the three layers.
    assert layer_slots_per_token(sched) == [4.0, 4.0, 2.0] and a.slots_per_token == pytest.approx(10 / 3)
    assert a.params_active - b.params_active == 4 * expert_params
    assert a.flops_per_image - b.flops_per_image == 4 * 2 * T * 2 * D * Fh
    assert a.params_total == b.params_total
    dense = resolve_config(preset="debug", overrides=["model.depth=6"])
    dense.moe.dense_width_mult = dense_width_for_flops(dense, a.flops_per_image)
    assert count(dense).flops_per_image == pytest.approx(a.flops_per_image, rel=1e-3)
    tc = resolve_config(preset="debug", overrides=["moe.routing=token_choice", "model.depth=4",
                                                   "moe.capacity_schedule=[0.5, 4]"])
    assert layer_slots_per_token(tc) == [0.5, 2.0]  # token choice: min(k, E C / G)
    assert trained_capacity_factor(sched) is None and trained_capacity_factor(base) == 2.0
    assert capacity_settings(sched) == {"capacity_factors": [4.0, 4.0, 2.0]}


def test_accounting_counts_shared_fine_grained_and_decoupled_layers_by_a_hand_count():
    D, Fh, T, n = 32, 128, 64, 1  # debug: one MoE layer
    base = count(resolve_config(preset="debug", overrides=[EC]))
    shared = count(resolve_config(preset="debug", overrides=[EC, "moe.shared_experts=1",
                                                             "moe.shared_expert_width_mult=0.5"]))
    Fs = Fh // 2
    assert shared.params_active - base.params_active == n * (2 * D * Fs + Fs + D)
    assert shared.params_total - base.params_total == n * (2 * D * Fs + Fs + D)
    assert shared.flops_per_image - base.flops_per_image == n * 2 * T * 2 * D * Fs
    # Fine-grained: 2E experts of half width at 2f: the same expert FLOPs, the router twice as wide.
    fine = count(resolve_config(preset="debug", overrides=[EC, "moe.num_experts=16", "moe.expert_width_mult=0.5",
                                                           "moe.capacity_factor=4"]))
    assert fine.breakdown_flops["experts"] == base.breakdown_flops["experts"]
    assert fine.flops_per_image - base.flops_per_image == n * 2 * T * D * 8
    assert fine.params_total - base.params_total == n * (D * 8 + 8 * D)  # router columns, 8 more b2 biases
    dec = count(resolve_config(preset="debug", overrides=[EC, "moe.router_input=decoupled"]))
    assert dec.params_total - base.params_total == n * D * 8
    assert dec.flops_per_image - base.flops_per_image == n * 2 * T * D * 8


@pytest.mark.parametrize("overrides", [
    [EC, "moe.shared_experts=2", "moe.shared_expert_width_mult=0.5"],
    ["moe.routing=token_choice", "moe.num_experts=16", "moe.expert_width_mult=0.5", "moe.top_k=4"],
    [EC, "moe.router_input=decoupled", "moe.capacity_schedule=[4, 1]"],
])
def test_analytic_parameter_counts_of_variants_equal_the_sum_over_module_parameters(overrides):
    cfg = resolve_config(preset="tiny", overrides=overrides)
    assert count(cfg).params_total == sum(p.numel() for p in DiT(cfg).parameters())


@pytest.mark.parametrize("overrides,message", [
    (["moe.capacity_schedule=[4, 2]"], "moe.capacity_schedule=[4.0, 2.0] is invalid: only applies to MoE routings"),
    ([EC, "model.depth=6", "moe.capacity_schedule=[4, 2, 2, 1]"],
     "give [] (moe.capacity_factor everywhere), [early, late], or one factor per MoE layer (3 here)"),
    ([EC, "moe.capacity_schedule=4"], "moe.capacity_schedule=4 is invalid: expected a list"),
    ([EC, "moe.capacity_schedule=[4, 0]"], "every factor must be a number > 0"),
    ([EC, "moe.shared_expert_width_mult=0.5"], "moe.shared_expert_width_mult=0.5 is invalid: needs moe.shared_experts"),
    (["moe.router_input=decoupled"], "moe.router_input='decoupled' is invalid: only applies to MoE routings"),
    ([EC, "moe.router_input=time"], "moe.router_input='time' is invalid: allowed: hidden, decoupled"),
    ([EC, "moe.routing_debug=random", "moe.force_balanced=true"], "cannot be combined with moe.routing_debug"),
    ([EC, "moe.route_scale=0"], "moe.route_scale=0.0 is invalid: must be > 0"),
    ([EC, "moe.expert_width_mult=0.001"], "moe.expert_width_mult=0.001 is invalid: gives a hidden width of 0"),
    (["moe.routing=race", "moe.routing_debug=random"],
     "moe.routing_debug='random' is invalid: does not apply to moe.routing=race"),
    (["moe.routing=token_choice", "moe.routing_group=batch", "moe.shared_experts=1"],
     "moe.routing_group='batch' is invalid: batch groups apply to moe.routing=expert_choice or race"),
])
def test_a_wrong_variant_combination_is_one_line_naming_the_keys(overrides, message):
    with pytest.raises(ConfigError) as err:
        resolve_config(preset="debug", overrides=overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Debug and baseline routers


def _groups(r, S, G):
    for g0 in range(0, S, G):
        tok = r.token_idx_EC
        yield g0, min(G, S - g0), (tok >= g0) & (tok < g0 + G)


@pytest.mark.parametrize("routing,f,k", [("expert_choice", 2.0, 1), ("expert_choice", 1.5, 1),
                                         ("token_choice", 2.0, 2), ("token_choice", 1.0, 2)])
def test_balanced_debug_routing_fills_every_expert_exactly_to_capacity(routing, f, k):
    S, E, G = 160, 8, 64  # two full images and a shorter remainder group
    r = debug_routing(torch.randn(S, E), "balanced", routing, G, f, k)
    for _, length, in_group in _groups(r, S, G):
        C = expert_capacity(length, f, E)
        used = C if routing == "expert_choice" else min(C, k * length // E)
        assert torch.equal(in_group.sum(1), torch.full((E,), used))  # exactly its capacity, every expert
    for e in range(E):
        row = r.token_idx_EC[e][r.token_idx_EC[e] < S]
        assert row.unique().numel() == row.numel()  # no token twice for one expert
    ept = r.experts_per_token_S
    for g0, length, _ in _groups(r, S, G):
        counts = ept[g0:g0 + length]
        assert counts.max() - counts.min() <= 1  # dealt round-robin: as even as the budget allows
    if routing == "token_choice":
        assert int(ept.max()) <= k


def test_random_debug_routing_is_fixed_for_a_seed_and_keeps_the_balanced_slot_budget():
    S, E, G, f = 128, 8, 64, 2.0
    r1 = debug_routing(torch.randn(S, E), "random", "expert_choice", G, f, seed=3)
    r2 = debug_routing(torch.randn(S, E) * 10, "random", "expert_choice", G, f, seed=3)
    assert torch.equal(r1.token_idx_EC, r2.token_idx_EC)  # the router's logits do not move it
    other = debug_routing(torch.randn(S, E), "random", "expert_choice", G, f, seed=4)
    assert not torch.equal(r1.token_idx_EC, other.token_idx_EC)
    balanced = debug_routing(torch.randn(S, E), "balanced", "expert_choice", G, f)
    assert not torch.equal(r1.token_idx_EC, balanced.token_idx_EC)
    assert r1.token_idx_EC.shape == balanced.token_idx_EC.shape == expert_choice(torch.randn(S, E), G, f).token_idx_EC.shape
    assert torch.equal(r1.experts_per_token_S.sort().values, balanced.experts_per_token_S.sort().values)
    # The same assignment by position in every image: per-image routing stays batch-independent.
    first, second = r1.token_idx_EC[:, :16], r1.token_idx_EC[:, 16:]
    assert torch.equal(second, first + G)


def test_a_random_router_is_the_same_in_every_model_of_a_seed_and_differs_between_seeds():
    def tables(seed):
        cfg = resolve_config(preset="debug", overrides=[EC, "moe.routing_debug=random", f"train.seed={seed}"])
        out = DiT(cfg)(torch.randn(1, 3, 32, 32), torch.rand(1), torch.randn(1, 4, 32), torch.ones(1, 4, dtype=torch.bool))
        return out.routing[0].token_idx_EC

    assert torch.equal(tables(0), tables(0)) and not torch.equal(tables(0), tables(1))


@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_debug_routers_combine_with_the_router_affinities_so_the_router_still_gets_gradients(routing):
    layer = _layer(routing, routing_debug="random")
    x = torch.randn(2, 8, 16)
    y, r = layer(x)
    assert r.aux_loss is None and r.z_loss is None
    probs = torch.softmax(x.reshape(16, 16) @ layer.router.wg.weight.T, -1)
    used = r.token_idx_EC < 16
    e_idx = torch.arange(4).view(4, 1).expand_as(r.token_idx_EC)
    w = probs[r.token_idx_EC.clamp(max=15), e_idx] * used
    if routing == "token_choice":  # renormalised over each token's assigned experts, as GShard's k gates
        sums = torch.zeros(17).index_add(0, r.token_idx_EC.reshape(-1), w.reshape(-1))
        w = w / sums[r.token_idx_EC].clamp_min(1e-30)
    torch.testing.assert_close(r.weight_EC, w)
    y.square().sum().backward()
    assert layer.router.wg.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# The local fast path and DeepSpeed's MOELayer agree on every variant


VARIANT_LAYERS = [
    ("expert_choice", {"shared_hidden": 20}),
    ("expert_choice", {"router_input_size": 5, "renormalize_gates": True, "route_scale": 2.5}),
    ("expert_choice", {"routing_debug": "balanced"}),
    ("token_choice", {"routing_debug": "random", "route_scale": 1.5}),
    ("token_choice", {"router_input_size": 5, "shared_hidden": 8}),
    ("race", {"router_input_size": 5, "shared_hidden": 8, "route_scale": 2.0}),
    ("race", {"renormalize_gates": True, "shared_hidden": 20}),
]


@pytest.mark.parametrize("routing,variant", VARIANT_LAYERS)
def test_the_deepspeed_layer_path_equals_the_fast_path_for_every_variant(routing, variant):
    fast = _layer(routing, **variant)
    ds = copy.deepcopy(fast)
    ds.use_deepspeed_layer = True
    x1 = torch.randn(4, 8, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    r_in = torch.randn(4, 8, 5) if "router_input_size" in variant else None
    y1, _ = fast(x1, r_in)
    y2, _ = ds(x2, r_in)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-6)
    y1.square().mean().backward()
    y2.square().mean().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    for (n, p1), (_, p2) in zip(fast.named_parameters(), ds.named_parameters(), strict=True):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind,routing", [("balanced", "expert_choice"), ("random", "token_choice")])
def test_debug_slot_tables_on_the_fast_path_equal_the_index_add_reference(kind, routing):
    layer = _layer(routing)
    x = torch.randn(3, 8, 16)
    r = scale_gates(debug_routing(layer.router.logits(x.reshape(24, 16)), kind, routing, 8, 1.5, 2, True, 7),
                    True, 2.0)
    torch.testing.assert_close(dispatch_combine(x.reshape(24, 16), r, layer.experts),
                               dispatch_combine_reference(x.reshape(24, 16), r, layer.experts), rtol=1e-5, atol=1e-6)


def test_no_variant_builds_a_tokens_by_experts_by_capacity_tensor():
    S, E, G = 256, 8, 64
    big = S * E * (S // G) * expert_capacity(G, 4.0, E)
    x = torch.randn(4, 64, 16)
    layers = [_layer("expert_choice", E=E, group=G, f=4.0, shared_hidden=32, router_input_size=32,
                     renormalize_gates=True, route_scale=2.5),
              _layer("expert_choice", E=E, group=G, f=4.0, routing_debug="random"),
              _layer("token_choice", E=E, group=G, f=4.0, routing_debug="balanced", renormalize_gates=True)]
    with tensor_sizes() as seen:
        for layer in layers:
            r_in = torch.randn(4, 64, 32) if layer.router.wg.in_features == 32 else None
            layer(x, r_in)
    assert seen and max(seen) < big // 4


# ---------------------------------------------------------------------------------------------
# Sweeps: collapsed for dense, readable ids and series


def _spec(**extra):
    return parse_spec({
        "name": "variants", "base": {"train": {"batch_size": 4}},
        "grid": {"size": ["debug"], "routing": ["dense", "token_choice", "expert_choice"], "num_experts": [8],
                 "capacity_factor": [2.0], "top_k": [2], "steps": [10]},
        "include": [
            {"routing": "expert_choice", "capacity_factor": 1.0, "moe.shared_experts": 1},
            {"routing": "expert_choice", "num_experts": 16, "capacity_factor": 4.0, "expert_width_mult": 0.5},
            {"routing": "expert_choice", "router_input": "decoupled"},
            {"routing": "expert_choice", "moe.capacity_schedule": [3, 1]},
            {"routing": "expert_choice", "routing_debug": "random"},
            {"routing": "dense", "moe.shared_experts": 1},  # collapses onto the dense point
        ], **extra})


def test_routing_variant_axes_get_readable_distinct_ids_and_collapse_for_dense():
    points = make_sweep(_spec())
    ids = [p.run_id for p in points]
    assert ids == ["debug-dense-s0", "debug-tc-e8-k2-s0", "debug-ec-e8-f2-s0", "debug-ec-e8-f1-sh1-s0",
                   "debug-ec-e16-f4-w0.5-s0", "debug-ec-e8-f2-dec-s0", "debug-ec-e8-f3_1-s0",
                   "debug-ec-e8-f2-rand-s0"]
    by_id = {p.run_id: p.config for p in points}
    assert by_id["debug-ec-e8-f1-sh1-s0"].moe.shared_experts == 1
    assert by_id["debug-ec-e8-f3_1-s0"].moe.capacity_schedule == [3.0, 1.0]
    assert by_id["debug-dense-s0"].moe.shared_experts == 0
    # Dense is matched to the baseline expert-choice point, not to a variant.
    ref = count(by_id["debug-ec-e8-f2-s0"]).flops_per_image
    assert count(by_id["debug-dense-s0"]).flops_per_image == pytest.approx(ref, rel=1e-3)
    assert run_id_for_config(by_id["debug-ec-e8-f1-sh1-s0"]) == "debug-ec-e8-f1-sh1-s0"
    assert run_id_for_config(by_id["debug-ec-e8-f2-s0"]) == "debug-ec-e8-f2-s0"


def test_a_variant_dense_cannot_take_is_one_line_naming_the_point_and_key():
    spec = _spec()
    spec.base = {"moe": {"shared_experts": 1}}
    with pytest.raises(ConfigError) as err:
        make_sweep(spec)
    assert "routing=dense" in str(err.value) and "moe.shared_experts=1 is invalid" in str(err.value)
    assert "\n" not in str(err.value)


def test_series_labels_name_each_variant_and_leave_the_baseline_label_alone():
    from ecdit_cli.study.spec import axis_names, manifest_csv

    spec = _spec()
    points = make_sweep(spec)
    runs = pd.read_csv(io.StringIO(manifest_csv(points, axis_names(spec))))
    labels = dict(zip(runs["run_id"], series_labels(runs, axis_names(spec)), strict=True))
    assert labels["debug-ec-e8-f2-s0"] == "expert_choice E=8 f=2"
    assert labels["debug-ec-e8-f1-sh1-s0"] == "expert_choice E=8 f=1 shared=1"
    assert labels["debug-ec-e16-f4-w0.5-s0"] == "expert_choice E=16 f=4 width=0.5"
    assert labels["debug-ec-e8-f2-dec-s0"] == "expert_choice E=8 f=2 router=decoupled"
    assert labels["debug-ec-e8-f3_1-s0"] == "expert_choice E=8 f=2 f per layer=[3, 1]"
    assert labels["debug-ec-e8-f2-rand-s0"] == "expert_choice E=8 f=2 debug=random"
    assert labels["debug-dense-s0"] == "dense" and labels["debug-tc-e8-k2-s0"] == "token_choice"
    assert len(set(labels.values())) == len(labels)


def test_variants_combined_with_race_and_batch_groups_get_readable_distinct_ids():
    spec = parse_spec({"name": "t", "base": {}, "grid": {"size": ["debug"], "routing": ["expert_choice", "race"],
                                                        "num_experts": [8], "capacity_factor": [2.0]},
                       "include": [{"routing": "race", "shared_experts": 1},
                                   {"routing": "race", "capacity_schedule": [4, 2]},
                                   {"routing": "race", "router_input": "decoupled", "routing_group": "batch"},
                                   {"routing": "expert_choice", "routing_group": "batch", "routing_debug": "random"}]})
    ids = sorted(p.run_id for p in make_sweep(spec))
    assert ids == sorted(["debug-ec-e8-f2-s0", "debug-race-e8-f2-s0", "debug-race-e8-f2-sh1-s0",
                          "debug-race-e8-f4_2-s0", "debug-race-e8-f2-batch-dec-s0",
                          "debug-ec-e8-f2-batch-rand-s0"])
    cfg = resolve_config(preset="debug", overrides=["moe.routing=race", "moe.routing_group=batch",
                                                    "moe.expert_width_mult=0.5"])
    assert run_id_for_config(cfg) == "debug-race-e8-f2-batch-w0.5-s0"


def test_only_routed_expert_weights_carry_the_expert_marker_with_shared_and_fine_grained_experts():
    cfg = resolve_config(preset="debug", overrides=["moe.routing=race", "moe.num_experts=16", "moe.shared_experts=1",
                                                    "moe.expert_width_mult=0.5", "moe.router_input=decoupled"])
    model = DiT(cfg)
    marked = {n for n, p in model.named_parameters() if getattr(p, "allreduce", True) is False}
    assert marked == {n for n, _ in model.named_parameters() if ".deepspeed_moe.experts." in n} != set()
    assert any(".mlp.shared." in n for n, _ in model.named_parameters())
    w1 = model.blocks[1].mlp.experts.w1
    assert w1.shape == (16, cfg.model.hidden_size, cfg.expert_hidden)  # sliced on dim 0 by expert-parallel rank


def test_series_labels_mark_batch_groups_and_leave_per_image_and_race_baselines_alone():
    runs = pd.DataFrame({"routing": ["expert_choice", "expert_choice", "race", "race"],
                         "routing_group": [None, "batch", None, "batch"], "router_input": [None, None, "decoupled", None]})
    assert series_labels(runs, ["routing", "routing_group", "router_input"]).tolist() == [
        "expert_choice", "expert_choice group=batch", "race router=decoupled", "race group=batch"]


def test_the_reference_studys_run_ids_are_unchanged():
    from pathlib import Path

    from ecdit_cli.study.spec import load_spec

    root = Path(__file__).resolve().parents[1]
    committed = pd.read_csv(root / "docs" / "reference" / "manifest.csv")["run_id"].tolist()
    assert [p.run_id for p in make_sweep(load_spec(root / "sweeps" / "reference.yaml"))] == committed



def test_the_routing_variants_study_holds_every_variant_and_reuses_the_reference_baselines(tmp_path):
    from pathlib import Path

    from ecdit_cli.study.archive import _mismatch, archived_ids
    from ecdit_cli.study.spec import load_spec, write_study

    root = Path(__file__).resolve().parents[1]
    spec = load_spec(root / "sweeps" / "routing-variants.yaml")
    points = make_sweep(spec)
    write_study(spec, points, tmp_path)
    moe = [p.config.moe for p in points]
    assert {m.routing for m in moe} == {"dense", "token_choice", "expert_choice", "race"}
    assert {m.routing_group for m in moe} == {"image", "batch"}
    assert len({p.run_id for p in points}) == len(points) == 30
    assert any(m.shared_experts for m in moe) and any(m.expert_width_mult < 1 for m in moe)
    assert {m.router_input for m in moe} == {"hidden", "decoupled"} and any(m.capacity_schedule for m in moe)
    assert {m.routing_debug for m in moe} == {"none", "random"}
    assert {p.axes["size"] for p in points} == {"mini", "tiny"}
    archive = root / "docs" / "reference" / "runs"
    reused = [p.run_id for p in points if p.run_id in set(archived_ids(archive))]
    assert len(reused) == 9  # dense, TC and EC at mini (seeds 0, 1) and tiny (seed 0)
    for rid in reused:
        assert _mismatch(archive / rid, tmp_path / "runs" / rid) is None, rid


# ---------------------------------------------------------------------------------------------
# Training: a variant model trains, checkpoints, resumes exactly and loads for sampling


@pytest.mark.parametrize("overrides", [
    [EC, "model.depth=4", "moe.shared_experts=1", "moe.router_input=decoupled", "moe.capacity_schedule=[3, 1]",
     "moe.renormalize_gates=true", "moe.route_scale=2.5", "moe.expert_width_mult=0.5"],
    ["moe.routing=token_choice", "moe.routing_debug=random"],
    ["moe.routing=race", "model.depth=4", "moe.routing_group=batch", "moe.shared_experts=1",
     "moe.router_input=decoupled", "moe.capacity_schedule=[3, 1]"],
])
def test_a_variant_run_resumes_to_the_metrics_of_an_uninterrupted_run_and_loads_for_sampling(overrides, tmp_path):
    from ecdit_cli import rundir
    from ecdit_cli.files import read_jsonl
    from ecdit_cli.model.load import load_run
    from ecdit_cli.train.loop import Callbacks, train

    cfg = resolve_config(preset="debug", overrides=[*overrides, "train.steps=10", "train.batch_size=4",
                                                    "data.val_size=8", "train.warmup_steps=2", "train.log_every=5",
                                                    "train.val_every=10", "train.ckpt_every=5",
                                                    "train.val_timesteps=2"])

    def metrics(run_dir):
        return [{k: v for k, v in r.items() if k not in ("images_per_s", "wall_time_s")}
                for r in read_jsonl(run_dir / rundir.METRICS)]

    class Crash(Exception):
        pass

    def crash(step, info):
        if step == 7:
            raise Crash

    threads = torch.get_num_threads()
    try:
        train(cfg, tmp_path / "ref")
        with pytest.raises(Crash):
            train(cfg, tmp_path / "cut", Callbacks(on_step=crash))
        assert train(cfg, tmp_path / "cut")["status"] == "done"  # resumes from step 5
    finally:
        torch.set_num_threads(threads)
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "ref")
    model, loaded = load_run(tmp_path / "ref")
    assert loaded.moe == cfg.moe
    text, mask = model.tokenize(["a red circle"])
    out = model(torch.zeros(1, 3, 32, 32), torch.tensor([0.5]), text, mask)
    assert out.velocity.shape == (1, 3, 32, 32) and torch.isfinite(out.velocity).all()
    if cfg.moe.routing == "race":  # the learned threshold and the decoupled router travel in an export
        pytest.importorskip("safetensors")
        from ecdit_cli.model.export import export_run

        router = next(b.mlp.router for b in model.dit.blocks if b.is_moe)
        assert float(router.race_threshold) > 0 and router.wg.in_features == 2 * cfg.model.hidden_size
        export_run(tmp_path / "ref", tmp_path / "export")
        exported, _ = load_run(tmp_path / "export")
        assert torch.equal(exported(torch.zeros(1, 3, 32, 32), torch.tensor([0.5]), text, mask).velocity,
                           out.velocity)
        assert torch.equal(next(b.mlp.router for b in exported.dit.blocks if b.is_moe).race_threshold,
                           router.race_threshold)
    if cfg.moe.capacity_schedule and cfg.moe.routing == "expert_choice":  # F replaces the schedule in every layer
        model, loaded = load_run(tmp_path / "ref", capacity_factor=1.0)
        assert loaded.moe.capacity_schedule == [] and loaded.moe.capacity_factors(loaded.model.depth) == [1.0, 1.0]
        assert {b.mlp.router.capacity_factor for b in model.dit.blocks if b.is_moe} == {1.0}
