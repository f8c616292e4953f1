"""Expert-choice and token-choice routing: invariants, references and equivalences."""

import copy

import pytest
import torch
import torch.nn.functional as F
from fixtures_moe import copy_dense_into_expert, tensor_sizes

from ecdit_cli.model.moe import FeedForward, GroupedExperts, MoEFeedForward
from ecdit_cli.model.routing import (
    expert_capacity,
    expert_choice,
    load_balancing_loss,
    slots_to_routes,
    token_choice,
)

torch.manual_seed(0)


def _layer(routing="expert_choice", E=4, D=16, F_=32, f=2.0, k=2, group=8, ds=False):
    torch.manual_seed(1)
    layer = MoEFeedForward(D, F_, E, routing, f, k, group, use_deepspeed_layer=ds)
    torch.nn.init.normal_(layer.router.wg.weight, std=0.5)  # decisive routing
    return layer


def _reference_moe(layer, x_BTD):
    """Explicit loop over experts and groups, straight from the paper's equations."""
    B, T, D = x_BTD.shape
    x = x_BTD.reshape(-1, D)
    r = layer.router
    probs = torch.softmax(x.float() @ r.wg.weight.float().T, dim=-1)
    out = torch.zeros_like(x)
    G = r.group_size
    ex = layer.experts
    for start in range(0, x.shape[0], G):
        xs, ps = x[start:start + G], probs[start:start + G]
        C = expert_capacity(xs.shape[0], r.capacity_factor, r.num_experts)
        for e in range(r.num_experts):
            idx = ps[:, e].topk(C).indices
            h = F.gelu(xs[idx] @ ex.w1[e] + ex.b1[e], approximate="tanh") @ ex.w2[e] + ex.b2[e]
            out[start + idx] += ps[idx, e:e + 1] * h
    return out.view(B, T, D)


def test_expert_capacity_rounds_half_up_and_stays_within_one_and_the_group():
    assert expert_capacity(64, 2.0, 8) == 16
    assert expert_capacity(62, 2.0, 8) == 16  # 15.5 -> 16
    assert expert_capacity(60, 2.0, 8) == 15
    assert expert_capacity(4, 0.5, 8) == 1  # never 0
    assert expert_capacity(8, 4.0, 2) == 8  # never more than the group


@pytest.mark.parametrize("group", [0, 16, 32])
def test_expert_choice_fills_every_expert_to_exactly_capacity_per_group(group):
    S, E, f = 64, 8, 2.0
    logits = torch.randn(S, E)
    r = expert_choice(logits, group, f)
    G = group or S
    C = expert_capacity(G, f, E)
    assert r.token_idx_EC.shape == (E, (S // G) * C)
    for g0 in range(0, S, G):
        in_group = (r.token_idx_EC >= g0) & (r.token_idx_EC < g0 + G)
        assert torch.equal(in_group.sum(1), torch.full((E,), C))  # exactly C per expert per group
    # No token twice for one expert.
    for e in range(E):
        assert r.token_idx_EC[e].unique().numel() == r.token_idx_EC.shape[1]


def test_expert_choice_combine_weights_are_the_raw_fp32_softmax_affinities():
    logits = torch.randn(32, 4, dtype=torch.bfloat16)
    r = expert_choice(logits, 0, 2.0)
    probs = torch.softmax(logits.float(), dim=-1)
    assert r.weight_EC.dtype == torch.float32
    expected = probs[r.token_idx_EC, torch.arange(4).view(4, 1)]
    assert torch.equal(r.weight_EC, expected)  # not renormalised


@pytest.mark.parametrize("group", [8, 16])
def test_expert_choice_layer_matches_an_explicit_per_expert_loop(group):
    layer = _layer(group=group)
    x = torch.randn(4, 8, 16)
    y, _ = layer(x)
    torch.testing.assert_close(y, _reference_moe(layer, x), rtol=1e-5, atol=1e-6)


def test_a_token_no_expert_picked_gets_exactly_zero_from_the_ffn():
    layer = _layer(f=0.5, E=2)  # 8 slots for 16 tokens: some tokens get nothing
    x = torch.randn(2, 8, 16)
    y, r = layer(x)
    unrouted = r.experts_per_token_S == 0
    assert unrouted.any()
    assert torch.equal(y.reshape(-1, 16)[unrouted], torch.zeros(int(unrouted.sum()), 16))
    assert r.stats["ec_unrouted_frac"] == pytest.approx(unrouted.float().mean().item())


@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_per_image_routing_makes_an_image_independent_of_its_batch(routing):
    layer = _layer(routing=routing, f=1.0)
    x = torch.randn(4, 8, 16)
    y_all, _ = layer(x)
    other = torch.randn(3, 8, 16)
    y_mixed, _ = layer(torch.cat([x[2:3], other]))
    torch.testing.assert_close(y_mixed[0], y_all[2])


def test_pooled_groups_let_images_in_a_group_compete_for_slots():
    layer = _layer(group=16, f=1.0)  # two images per routing group
    x = torch.randn(2, 8, 16)
    y, _ = layer(x)
    torch.testing.assert_close(y, _reference_moe(layer, x), rtol=1e-5, atol=1e-6)
    x2 = x.clone()
    x2[1] = torch.randn(8, 16) * 5  # changing the other image changes the competition
    y2, _ = layer(x2)
    assert not torch.allclose(y2[0], y[0])


def test_expert_choice_with_capacity_covering_every_token_equals_the_affinity_weighted_mixture():
    layer = _layer(E=4, f=4.0)  # C = G: every expert takes every token
    x = torch.randn(2, 8, 16)
    y, r = layer(x)
    xs = x.reshape(-1, 16)
    probs = torch.softmax(xs @ layer.router.wg.weight.T, -1)
    ex = layer.experts
    mix = sum(probs[:, e:e + 1] * (F.gelu(xs @ ex.w1[e] + ex.b1[e], approximate="tanh") @ ex.w2[e] + ex.b2[e])
              for e in range(4))
    torch.testing.assert_close(y.reshape(-1, 16), mix, rtol=1e-5, atol=1e-6)
    assert r.stats["ec_experts_per_token_mean"] == 4.0


@pytest.mark.parametrize("routing,f,k", [("expert_choice", 1.0, 1), ("token_choice", 1.0, 1)])
def test_one_expert_with_copied_weights_equals_the_dense_ffn_in_outputs_and_gradients(routing, f, k):
    D, F_ = 16, 32
    dense = FeedForward(D, F_)
    layer = MoEFeedForward(D, F_, 1, routing, f, k, 8, normalize_top_k=True)
    copy_dense_into_expert(layer, dense)
    x1 = torch.randn(3, 8, D, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y_dense = dense(x1)
    y_moe, r = layer(x2)
    # One expert: softmax over one logit is exactly 1, and capacity covers every token.
    torch.testing.assert_close(y_moe, y_dense, rtol=1e-6, atol=1e-6)
    (y_dense.square().sum()).backward()
    (y_moe.square().sum()).backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.experts.w1.grad[0], dense.fc1.weight.grad.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.experts.w2.grad[0], dense.fc2.weight.grad.T, rtol=1e-5, atol=1e-6)


def test_load_balancing_loss_on_a_hand_computed_case():
    # 4 tokens, 2 experts, k = 1. Mean probabilities (0.625, 0.375); top-1 routes: e0, e0, e0, e1.
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.3, 0.7]])
    experts = torch.tensor([[0], [0], [0], [1]])
    # E * sum_e mean_p(e) * share(e) = 2 * (0.625 * 0.75 + 0.375 * 0.25) = 1.125
    assert load_balancing_loss(probs, experts).item() == pytest.approx(1.125)
    uniform = torch.full((8, 4), 0.25)
    spread = torch.arange(8).view(8, 1) % 4
    assert load_balancing_loss(uniform, spread).item() == pytest.approx(1.0)


def test_token_choice_drops_routes_beyond_capacity_first_choices_first_then_token_order():
    # 4 tokens, 2 experts, k = 2, f = 1 -> C = 2 per expert. Everyone prefers expert 0.
    logits = torch.tensor([[2.0, 0.0], [3.0, 0.0], [1.0, 0.0], [4.0, 0.0]])
    r = token_choice(logits, 0, 1.0, 2, normalize=True)
    assert r.capacity == 2
    # Expert 0 takes the first two first choices in token order: tokens 0 and 1.
    assert r.token_idx_EC[0].tolist() == [0, 1]
    # Expert 1 gets only second choices: tokens 0 and 1 too (tokens 2, 3 overflow).
    assert r.token_idx_EC[1].tolist() == [0, 1]
    assert r.stats["tc_dropped_frac"] == pytest.approx(0.5)
    probs = torch.softmax(logits, -1)
    assert r.weight_EC[0, 0].item() == pytest.approx(probs[0, 0].item())  # k gates sum to 1 before dropping
    layer = _layer(routing="token_choice", E=2, f=1.0, group=4)
    x = torch.randn(1, 4, 16)
    y, rr = layer(x)
    dropped = rr.experts_per_token_S == 0
    assert torch.equal(y.reshape(4, 16)[dropped], torch.zeros(int(dropped.sum()), 16))


def test_token_choice_capacity_gives_the_same_slot_budget_as_expert_choice():
    logits = torch.randn(64, 8)
    ec = expert_choice(logits, 16, 2.0)
    tc = token_choice(logits, 16, 2.0, 2)
    assert ec.token_idx_EC.shape == tc.token_idx_EC.shape


@pytest.mark.parametrize("routing,group", [("expert_choice", 8), ("expert_choice", 16), ("token_choice", 8)])
def test_deepspeed_moe_layer_path_equals_the_fast_path_in_outputs_and_gradients(routing, group):
    fast = _layer(routing=routing, group=group)
    ds = copy.deepcopy(fast)
    ds.use_deepspeed_layer = True
    x1 = torch.randn(4, 8, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, r1 = fast(x1)
    y2, r2 = ds(x2)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-6)
    loss1 = y1.square().mean() + (r1.aux_loss if r1.aux_loss is not None else 0)
    loss2 = y2.square().mean() + (r2.aux_loss if r2.aux_loss is not None else 0)
    loss1.backward()
    loss2.backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    for (n, p1), (_, p2) in zip(fast.named_parameters(), ds.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_sparse_routes_list_each_tokens_experts_with_unique_slots():
    r = expert_choice(torch.randn(32, 4), 8, 2.0)
    idx, loc, gates = slots_to_routes(r)
    K = int(r.experts_per_token_S.max())
    assert idx.shape == (K, 32)
    used = idx >= 0
    assert torch.equal(used.sum(0), r.experts_per_token_S)
    pairs = set(zip(idx[used].tolist(), loc[used].tolist()))
    assert len(pairs) == int(used.sum())
    # Each route points back at the slot table entry of its token.
    assert torch.equal(r.token_idx_EC[idx[used].long(), loc[used].long()], torch.nonzero(used)[:, 1])


def test_routing_builds_no_tokens_by_experts_by_capacity_tensor():
    S, E = 256, 8
    G, f = 64, 2.0
    C_total = (S // G) * expert_capacity(G, f, E)
    big = S * E * C_total
    layer = _layer(E=E, D=16, F_=32, group=G)
    x = torch.randn(4, 64, 16)
    with tensor_sizes() as seen:
        y, _ = layer(x)
        tc = _layer(routing="token_choice", E=E, D=16, F_=32, group=G)
        tc(x)
    assert seen and max(seen) < big // 4


def test_grouped_experts_state_dict_uses_deepspeeds_per_expert_layout_and_round_trips():
    ex = GroupedExperts(3, 8, 16, "ep_size_1")
    sd = ex.state_dict()
    assert "deepspeed_experts.2.w1" in sd and "w1" not in sd
    other = GroupedExperts(3, 8, 16, "ep_size_1")
    other.load_state_dict(sd)
    assert torch.equal(other.w2, ex.w2)
    assert all(p.allreduce is False for p in ex.parameters())
