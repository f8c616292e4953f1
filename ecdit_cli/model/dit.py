"""The text-to-image DiT of EC-DiT (PixArt-alpha style), with a config-chosen FFN per block.

Trunk names follow facebookresearch/DiT (x_embedder, t_embedder, adaLN_modulation,
final_layer). A block is self-attention (grouped-query) -> cross-attention to the text tokens
(padding-masked) -> FFN; the timestep enters through adaLN-Zero modulation of the
self-attention and FFN branches; text enters only through cross-attention (docs/paper.md). The FFN
of block i is dense, or an MoE layer (token or expert choice) when `moe.is_moe_block(i)`.

`initialize_weights` holds all initialisation: with adaLN-Zero gates and the cross-attention
output projection at zero, every block is the identity and the model outputs zeros at init.

Shape legend: B images, T image tokens, L text tokens, D width, W text width, H heads,
Hkv key/value heads, Dh head dim, p patch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecdit_cli import devices
from ecdit_cli.config import RunConfig
from ecdit_cli.model.moe import FeedForward, MoEFeedForward
from ecdit_cli.model.routing import RoutingResult
from ecdit_cli.seeding import hash_seed


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size^2, embed_dim) fixed 2-D sin-cos embedding (MAE / DiT)."""
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid = np.meshgrid(grid_h, grid_h)  # w goes first, as in DiT
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)

    def _1d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    half = embed_dim // 2
    emb = np.concatenate([_1d(half - half % 2, grid[0]), _1d(half - half % 2, grid[1])], axis=1)
    if emb.shape[1] < embed_dim:  # odd widths: pad (only tiny debug widths hit this)
        emb = np.pad(emb, ((0, 0), (0, embed_dim - emb.shape[1])))
    return emb


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features (scaled to DiT's 0..1000 range) -> MLP -> D."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * 1000.0 * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t_B: Tensor) -> Tensor:
        freq = self.timestep_embedding(t_B, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class CaptionProjection(nn.Module):
    """Per-token text states (W) -> model width (D), PixArt's y_embedder; owns the null caption.

    Caption dropout (classifier-free guidance) replaces a caption by one learned null token.
    The output is layer-normed (our addition to PixArt's MLP): unit-scale keys and values let
    cross-attention use the text from the first steps; with small context vectors the text path
    is a product of small factors and a small learned encoder barely conditions the image.
    """

    def __init__(self, text_width: int, hidden_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(text_width, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.null_W = nn.Parameter(torch.zeros(text_width))

    def forward(self, text_BLW: Tensor, mask_BL: Tensor, drop_B: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # The `any` test keeps the null embedding out of the graph when nothing is dropped (its
        # gradient stays None, so AdamW leaves it alone). On an accelerator the test would be a
        # device sync per forward, and under torch.compile a graph break: there torch.where always
        # runs (same outputs; the null embedding then gets zero gradients, i.e. weight decay, in
        # such steps).
        if drop_B is not None and (not devices.syncs_are_free(drop_B.device) or torch.compiler.is_compiling()
                                   or bool(drop_B.any())):
            null_BLW = torch.zeros_like(text_BLW)
            null_BLW[:, 0] = self.null_W.to(text_BLW.dtype)
            null_mask = torch.zeros_like(mask_BL)
            null_mask[:, 0] = True
            d = drop_B.view(-1, 1, 1)
            text_BLW = torch.where(d, null_BLW, text_BLW)
            mask_BL = torch.where(d[:, :, 0], null_mask, mask_BL)
        return self.norm(self.fc2(F.gelu(self.fc1(text_BLW), approximate="tanh"))), mask_BL


class Attention(nn.Module):
    """Multi-head attention with grouped-query K/V heads; self- or cross-attention."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, cross: bool = False) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * kv_dim)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.cross = cross

    def forward(self, x_BTD: Tensor, ctx_BLD: Tensor | None = None, mask_BL: Tensor | None = None) -> Tensor:
        B, T, D = x_BTD.shape
        ctx = x_BTD if ctx_BLD is None else ctx_BLD
        L = ctx.shape[1]
        q = self.q(x_BTD).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(ctx).view(B, L, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask_BL is None else mask_BL.view(B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


def race_kwargs(cfg: RunConfig) -> dict:
    """MoEFeedForward's batch-group and race settings. routing_group=batch routes the whole local
    micro-batch as one group (group_size 0) in training; eval mode falls back to one image."""
    moe = cfg.moe
    return {"routing_group": moe.routing_group, "tokens_per_image": cfg.model.tokens_per_image,
            "race_momentum": moe.race_threshold_momentum, "race_inference": moe.race_inference,
            "race_expert_cap": moe.race_expert_cap}


class DiTBlock(nn.Module):
    """self-attn (adaLN-Zero) -> cross-attn (zero-init out proj) -> FFN or MoE (adaLN-Zero)."""

    def __init__(self, cfg: RunConfig, index: int, ep_rank: int = 0) -> None:
        super().__init__()
        m, moe = cfg.model, cfg.moe
        self.index = index
        D = m.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(D, m.num_heads, m.num_kv_heads)
        # Our choice (not stated in the paper): a LayerNorm on the cross-attention query input,
        # as in SD3 / Hunyuan-DiT; PixArt feeds the raw residual stream.
        self.norm_cross = nn.LayerNorm(D, eps=1e-6)
        self.cross_attn = Attention(D, m.num_heads, m.num_kv_heads, cross=True)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.is_moe = moe.is_moe_block(index)
        self.decoupled_router = self.is_moe and moe.router_input == "decoupled"
        if self.is_moe:
            # This block's place among the MoE blocks picks its capacity factor (moe.capacity_schedule).
            moe_index = sum(moe.is_moe_block(i) for i in range(index))
            self.mlp = MoEFeedForward(
                D, cfg.expert_hidden, moe.num_experts, moe.routing, moe.capacity_factors(m.depth)[moe_index],
                moe.top_k, 0 if moe.routing_group == "batch" else moe.group_size or m.tokens_per_image,
                moe.normalize_top_k, moe.ep_size, moe.deepspeed_layer, moe.force_balanced, ep_rank,
                **race_kwargs(cfg),
                shared_hidden=cfg.shared_hidden, router_input_size=2 * D if self.decoupled_router else None,
                route_scale=moe.route_scale, renormalize_gates=moe.renormalize_gates,
                routing_debug=moe.routing_debug, debug_seed=hash_seed(cfg.train.seed, index, 1),
            )
        else:
            hidden = m.mlp_hidden if moe.is_moe else int(round(m.mlp_hidden * moe.dense_width_mult))
            self.mlp = FeedForward(D, hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x: Tensor, c: Tensor, text: Tensor, mask: Tensor) -> tuple[Tensor, RoutingResult | None]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(self.norm_cross(x), text, mask)
        # The router sees the token after self- and cross-attention (its FFN input) ...
        n = self.norm2(x)
        h = modulate(n, shift_mlp, scale_mlp)
        routing = None
        if self.decoupled_router:
            # ... or, decoupled (Nucleus-Image), the un-modulated LayerNorm of the token beside the
            # timestep embedding: adaLN's timestep-dependent scale no longer sets the logits' size,
            # and the noise level reaches the router directly rather than through that scale.
            h, routing = self.mlp(h, torch.cat([n, c.unsqueeze(1).expand_as(n)], dim=-1))
        elif self.is_moe:
            h, routing = self.mlp(h)
        else:
            h = self.mlp(h)
        return x + gate_mlp.unsqueeze(1) * h, routing


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


@dataclass
class DiTOutput:
    velocity: Tensor  # (B, C, H, W)
    routing: list[RoutingResult] = field(default_factory=list)  # one per MoE block, in block order


class DiT(nn.Module):
    """Text-conditioned DiT predicting the rectified-flow velocity."""

    def __init__(self, cfg: RunConfig, text_width: int | None = None, ep_rank: int = 0) -> None:
        """`ep_rank`: this process's expert-parallel rank; it holds experts
        [ep_rank * E / ep_size, (ep_rank + 1) * E / ep_size)."""
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        self.in_channels = self.out_channels = m.in_channels
        self.patch_size = m.patch_size
        self.grid = m.input_size // m.patch_size
        D = m.hidden_size
        self.x_embedder = nn.Conv2d(m.in_channels, D, kernel_size=m.patch_size, stride=m.patch_size)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = CaptionProjection(text_width or cfg.text.width, D)
        self.register_buffer("pos_embed", torch.zeros(1, self.grid**2, D), persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(cfg, i, ep_rank) for i in range(m.depth)])
        self.final_layer = FinalLayer(D, m.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        # Patch embedding like nn.Linear (DiT).
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.y_embedder.null_W, std=1.0)  # on the scale of the encoder's (normed) states
        for block in self.blocks:
            # adaLN-Zero: all gates and shifts start at zero, so each branch starts switched off.
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            # Cross-attention has no adaLN gate: a zero output projection makes it start as 0.
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
            if block.is_moe:
                block.mlp.experts.reset_parameters(seed=hash_seed(self.cfg.train.seed, block.index))
                # Small router init: near-uniform affinities without exact ties (ties would make
                # every expert choose the same tokens at step 0).
                nn.init.normal_(block.mlp.router.wg.weight, std=0.02)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x_BTP: Tensor) -> Tensor:
        """(B, T, p*p*C) -> (B, C, H, W)."""
        c, p, h = self.out_channels, self.patch_size, self.grid
        x = x_BTP.reshape(x_BTP.shape[0], h, h, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x_BCHW: Tensor, t_B: Tensor, text_BLW: Tensor, mask_BL: Tensor,
                drop_B: Tensor | None = None) -> DiTOutput:
        """x (B, C, H, W) noisy image, t (B,) in [0, 1], text (B, L, W) states, mask (B, L) bool."""
        x = self.x_embedder(x_BCHW).flatten(2).transpose(1, 2)  # (B, T, D)
        # DeepSpeed's bf16 casts parameters, not buffers: the fp32 table would promote x to fp32.
        x = x + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t_B)  # (B, D)
        text, mask = self.y_embedder(text_BLW.to(x.dtype), mask_BL, drop_B)  # (B, L, D)
        routing: list[RoutingResult] = []
        for block in self.blocks:
            x, r = block(x, c, text, mask)
            if r is not None:
                routing.append(r)
        return DiTOutput(self.unpatchify(self.final_layer(x, c)), routing)
