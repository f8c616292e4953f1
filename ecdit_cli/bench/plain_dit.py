"""A plain text-conditioned DiT for `ecdit bench train`: the reference the real model is timed against.

Written as a reader would write a DiT from the paper in one file, with nothing ecdit adds:
patch embedding, sin-cos positions (learned here: the cost is the same), timestep MLP,
adaLN-Zero blocks of multi-head self-attention, cross-attention to fixed text states (no text
encoder, no padding mask) and a tanh-GELU MLP, a final adaLN layer, an MSE loss on the velocity.
Same width, depth, heads, MLP ratio, patch and image size as the config it mirrors; dense FFNs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecdit_cli.config import RunConfig


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm_x = nn.LayerNorm(d, eps=1e-6)
        self.q_x, self.kv_x, self.proj_x = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)
        self.ada = nn.Linear(d, 6 * d)

    def _attn(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, T, D = q.shape
        h = self.heads
        q, k, v = (z.reshape(B, -1, h, D // h).transpose(1, 2) for z in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)

    def forward(self, x: Tensor, c: Tensor, text: Tensor) -> Tensor:
        s1, g1, a1, s2, g2, a2 = self.ada(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + g1) + s1
        x = x + a1 * self.proj(self._attn(*self.qkv(h).chunk(3, dim=-1)))
        k, v = self.kv_x(text).chunk(2, dim=-1)
        x = x + self.proj_x(self._attn(self.q_x(self.norm_x(x)), k, v))
        h = self.norm2(x) * (1 + g2) + s2
        return x + a2 * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class PlainDiT(nn.Module):
    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        m = cfg.model
        d, p = m.hidden_size, m.patch_size
        self.patch, self.channels, self.grid = p, m.in_channels, m.input_size // p
        self.embed = nn.Conv2d(m.in_channels, d, p, stride=p)
        self.pos = nn.Parameter(torch.zeros(1, self.grid**2, d))
        self.t_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.text_proj = nn.Linear(cfg.text.width, d)
        self.blocks = nn.ModuleList(_Block(d, m.num_heads, m.mlp_hidden) for _ in range(m.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, p * p * m.in_channels)

    @staticmethod
    def _t_features(t: Tensor, dim: int = 256) -> Tensor:
        freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
        args = t[:, None].float() * 1000 * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, x: Tensor, t: Tensor, text_states: Tensor) -> Tensor:
        B = x.shape[0]
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        c = self.t_mlp(self._t_features(t))
        text = self.text_proj(text_states)
        for block in self.blocks:
            h = block(h, c, text)
        shift, scale = self.final_ada(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
        h = self.out(self.final_norm(h) * (1 + scale) + shift)
        g, p, C = self.grid, self.patch, self.channels
        return h.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)
