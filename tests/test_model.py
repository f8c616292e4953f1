"""The DiT: adaLN-Zero identity at init, accounting equals the modules, paper presets, masks."""

import pytest
import torch

from ecdit_cli.config import resolve_config
from ecdit_cli.model.accounting import count, dense_width_for_flops
from ecdit_cli.model.dit import DiT
from ecdit_cli.model.t2i import TextToImage


def _inputs(cfg, B=2, L=6):
    torch.manual_seed(3)
    x = torch.randn(B, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    t = torch.rand(B)
    text = torch.randn(B, L, cfg.text.width)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    return x, t, text, mask


@pytest.mark.parametrize("routing", ["dense", "token_choice", "expert_choice"])
def test_every_block_is_the_identity_and_the_model_outputs_zeros_at_init(routing):
    cfg = resolve_config(preset="debug", overrides=[f"moe.routing={routing}"])
    model = DiT(cfg)
    x, t, text, mask = _inputs(cfg)
    tokens = torch.randn(2, cfg.model.tokens_per_image, cfg.model.hidden_size)
    c = model.t_embedder(t)
    txt, m = model.y_embedder(text, mask)
    for block in model.blocks:
        out, _ = block(tokens, c, txt, m)
        assert torch.equal(out, tokens)
    assert torch.equal(model(x, t, text, mask).velocity, torch.zeros_like(x))


@pytest.mark.parametrize("overrides", [
    ["moe.routing=dense"],
    ["moe.routing=dense", "moe.dense_width_mult=1.5"],
    ["moe.routing=expert_choice", "moe.num_experts=4"],
    ["moe.routing=token_choice", "moe.num_experts=6", "moe.moe_every=1", "moe.moe_first=0"],
    ["moe.routing=expert_choice", "model.num_kv_heads=4", "text.width=48"],
])
def test_analytic_parameter_counts_equal_the_sum_over_module_parameters(overrides):
    cfg = resolve_config(preset="tiny", overrides=overrides)
    vocab = ["a", "red", "circle", "two", "squares"]
    model = TextToImage(cfg, vocab)
    acc = count(cfg, vocab_size=len(model.tokenizer.vocab))
    assert acc.params_total == sum(p.numel() for p in model.dit.parameters())
    assert acc.params_text == sum(p.numel() for p in model.text_encoder.parameters())


def test_activated_parameters_count_f_experts_per_moe_layer():
    ec = count(resolve_config(preset="small", overrides=["moe.routing=expert_choice", "moe.capacity_factor=2"]))
    dense = count(resolve_config(preset="small"))
    expert = 2 * 96 * 384 + 384 + 96
    n_moe = 3
    # EC with f = 2: the dense backbone, one extra expert per MoE layer, and the routers.
    assert ec.params_active == dense.params_total + n_moe * expert + n_moe * 96 * 8


def test_paper_presets_reproduce_the_published_moe_minus_dense_differences_within_one_percent():
    published = {"xl": (1.47e9, 6.08e9), "xxl": (2.35e9, 13.47e9), "3xl": (4.50e9, 32.15e9), "m": (8.03e9, 97.21e9)}
    for name, (dense_pub, moe_pub) in published.items():
        dense = count(resolve_config(preset=name)).params_total
        moe = count(resolve_config(preset="m-moe" if name == "m" else name,
                                   overrides=["moe.routing=expert_choice"])).params_total
        assert (moe - dense) / (moe_pub - dense_pub) == pytest.approx(1.0, abs=0.01), name
    m64 = count(resolve_config(preset="m-moe", overrides=["moe.routing=expert_choice"]))
    assert m64.params_active == pytest.approx(8.27e9, rel=0.01)
    assert m64.num_moe_layers == 19


def test_dense_width_multiplier_matches_the_activated_flops_of_the_moe_model():
    moe = resolve_config(preset="medium", overrides=["moe.routing=expert_choice"])
    dense = resolve_config(preset="medium")
    dense.moe.dense_width_mult = dense_width_for_flops(dense, count(moe).flops_per_image)
    assert count(dense).flops_per_image == pytest.approx(count(moe).flops_per_image, rel=1e-3)
    assert 1.4 < dense.moe.dense_width_mult < 1.6  # MoE in half the blocks at f = 2: ~1.5x


def test_padded_text_tokens_do_not_change_the_output():
    cfg = resolve_config(preset="debug", overrides=["moe.routing=expert_choice"])
    torch.manual_seed(0)
    model = DiT(cfg)
    for p in model.parameters():  # leave the zero init so that every path is exercised
        p.data.add_(torch.randn_like(p) * 0.05)
    x, t, text, mask = _inputs(cfg)
    out1 = model(x, t, text, mask).velocity
    text2 = text.clone()
    text2[1, 3:] = torch.randn(3, cfg.text.width) * 10  # padded positions of image 1
    out2 = model(x, t, text2, mask).velocity
    torch.testing.assert_close(out1, out2)


def test_caption_dropout_replaces_the_caption_with_the_learned_null_token():
    cfg = resolve_config(preset="debug")
    model = DiT(cfg)
    _, _, text, mask = _inputs(cfg)
    drop = torch.tensor([True, False])
    states, m = model.y_embedder(text, mask, drop)
    assert m[0].tolist() == [True] + [False] * 5 and torch.equal(m[1], mask[1])
    other = torch.randn_like(text)
    states2, _ = model.y_embedder(other, mask, drop)
    torch.testing.assert_close(states[0, 0], states2[0, 0])  # the null caption ignores the text


def test_experts_are_initialised_identically_whatever_the_expert_parallel_layout():
    full = resolve_config(preset="debug", overrides=["moe.routing=expert_choice", "moe.num_experts=4"])
    half = resolve_config(preset="debug", overrides=["moe.routing=expert_choice", "moe.num_experts=4",
                                                     "moe.ep_size=2"])
    torch.manual_seed(0)
    m_full = DiT(full)
    torch.manual_seed(0)
    m_rank1 = DiT(half, ep_rank=1)
    w_full = m_full.blocks[1].mlp.experts.w1
    w_rank1 = m_rank1.blocks[1].mlp.experts.w1
    assert w_rank1.shape[0] == 2
    assert torch.equal(w_rank1, w_full[2:])
    assert torch.equal(m_full.blocks[0].attn.q.weight, m_rank1.blocks[0].attn.q.weight)


def test_moe_blocks_are_every_other_block_starting_with_the_second():
    cfg = resolve_config(preset="medium", overrides=["moe.routing=expert_choice"])
    assert [cfg.moe.is_moe_block(i) for i in range(8)] == [False, True] * 4
    model = DiT(cfg)
    assert [b.is_moe for b in model.blocks] == [False, True] * 4
