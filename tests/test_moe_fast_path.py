"""The fast local MoE path (custom dispatch/combine autograd, CSR segment sums) against the
plain gather / bmm / index_add reference: outputs and gradients, both segment-sum kernels."""

import copy

import pytest
import torch

from ecdit_cli.model.moe import (
    MoEFeedForward,
    SlotPlan,
    _Combine,
    _Dispatch,
    dispatch_combine,
    dispatch_combine_reference,
    segment_sum,
)
from ecdit_cli.model.routing import token_choice


def _layer(routing, E=4, D=16, F_=32, f=2.0, group=8, dtype=torch.float32):
    torch.manual_seed(1)
    layer = MoEFeedForward(D, F_, E, routing, f, 2, group)
    torch.nn.init.normal_(layer.router.wg.weight, std=0.5)
    return layer.to(dtype)


def _run(layer, x, path, use_csr=None):
    """(y, grads of x, experts and router) of one layer call through `path` ('fast' or 'ref')."""
    x = x.detach().clone().requires_grad_(True)
    B, T, D = x.shape
    x_SD = x.reshape(B * T, D)
    r = layer.router.route(x_SD)
    if path == "fast":
        y = dispatch_combine(x_SD, r, layer.experts, use_csr=use_csr)
    else:
        y = dispatch_combine_reference(x_SD, r, layer.experts)
    loss = (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
    if r.aux_loss is not None:
        loss = loss + r.aux_loss
    loss.backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    return y, grads


CASES = [
    # routing, capacity factor, group size (tokens), images x tokens
    ("expert_choice", 2.0, 8, (4, 8)),  # per image
    ("expert_choice", 2.0, 16, (4, 8)),  # pooled groups of two images
    ("expert_choice", 2.0, 24, (4, 8)),  # a shorter remainder group
    ("expert_choice", 0.5, 8, (3, 8)),  # tokens no expert picks
    ("expert_choice", 4.0, 8, (2, 8)),  # every expert takes every token
    ("token_choice", 2.0, 8, (4, 8)),
    ("token_choice", 0.5, 8, (4, 8)),  # dropped routes and unused slots
    ("token_choice", 1.0, 16, (3, 8)),
]


@pytest.mark.parametrize("use_csr", [True, False], ids=["csr", "index_add"])
@pytest.mark.parametrize("routing,f,group,bt", CASES)
def test_fast_path_equals_the_index_add_reference_in_outputs_and_gradients(routing, f, group, bt, use_csr):
    fast = _layer(routing, f=f, group=group)
    ref = copy.deepcopy(fast)
    x = torch.randn(*bt, 16)
    y1, g1 = _run(fast, x, "fast", use_csr)
    y2, g2 = _run(ref, x, "ref")
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_router_gets_gradients_through_the_fused_combine_weights():
    layer = _layer("expert_choice")
    _, grads = _run(layer, torch.randn(2, 8, 16), "fast")
    assert grads["deepspeed_moe.gate.wg.weight"].abs().sum() > 0


@pytest.mark.parametrize("use_csr", [True, False], ids=["csr", "index_add"])
def test_fast_path_in_bf16_matches_the_reference_within_bf16_precision(use_csr):
    fast = _layer("expert_choice", dtype=torch.bfloat16)
    ref = copy.deepcopy(fast)
    x = torch.randn(4, 8, 16).bfloat16()
    y1, g1 = _run(fast, x, "fast", use_csr)
    y2, g2 = _run(ref, x, "ref")
    assert y1.dtype == torch.bfloat16
    torch.testing.assert_close(y1, y2, rtol=2e-2, atol=2e-2)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=5e-2, atol=5e-2, msg=name)


@pytest.mark.parametrize("use_csr", [True, False], ids=["csr", "index_add"])
def test_custom_dispatch_and_combine_pass_gradcheck_in_float64(use_csr):
    torch.manual_seed(0)
    S, E, D = 12, 3, 5
    r = token_choice(torch.randn(S, E, dtype=torch.float64), 6, 0.75, 2)  # has unused slots
    plan = SlotPlan.build(r.token_idx_EC, S, use_csr)
    x = torch.randn(S, D, dtype=torch.float64, requires_grad=True)
    y = torch.randn(plan.token_J.numel(), D, dtype=torch.float64, requires_grad=True)
    w = r.weight_EC.detach().reshape(-1).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: _Dispatch.apply(a, plan), (x,))
    # Unused slots get no weight gradient; used ones get the reference's (multiply + index_add).
    assert torch.autograd.gradcheck(lambda a: _Combine.apply(a, w.detach(), plan), (y,))
    used = ~plan.unused_J
    out = _Combine.apply(y, w, plan)
    out.square().sum().backward()
    assert torch.equal(w.grad[~used], torch.zeros(int((~used).sum()), dtype=torch.float64))
    w2 = w.detach().clone().requires_grad_(True)
    ref = torch.zeros(S + 1, D, dtype=torch.float64).index_add(0, plan.token_J, y.detach() * w2.unsqueeze(-1))[:S]
    ref.square().sum().backward()
    torch.testing.assert_close(w.grad[used], w2.grad[used])


def test_segment_sum_adds_each_tokens_slots_and_skips_unused_ones():
    tok = torch.tensor([[2, 0, 4], [2, 4, 1]])  # S = 4: value 4 marks an unused slot
    src = torch.arange(6, dtype=torch.float32).view(6, 1).expand(6, 2).contiguous()
    w = torch.tensor([1.0, 2.0, 3.0, 0.5, 4.0, 1.0])
    for use_csr in (True, False):
        plan = SlotPlan.build(tok, 4, use_csr)
        out = segment_sum(src, plan, w)
        expected = torch.tensor([[2.0], [5.0], [1.5], [0.0]]).expand(4, 2)
        torch.testing.assert_close(out, expected)
