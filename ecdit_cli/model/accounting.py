"""Analytic parameter and FLOP counts of a run config (no model is built).

Counts follow the modules in model/dit.py exactly (a test checks `params_total` against
`sum(p.numel())` for small configs), so paper-size configs (97B parameters) can be counted on a
laptop.

- params_total: every trainable parameter of the denoiser (DiT trunk, embedders, caption
  projection, all experts). The text encoder is counted separately (`params_text`): the
  paper's encoder is frozen and outside the DiT.
- params_active: the parameters one image token's forward uses on average. An MoE layer
  contributes its router, its shared FFN (if any) and `a` experts, where a = E * C / G is the
  number of expert slots per token (expert choice and race: the capacity factor f, after
  rounding C; token choice: min(k, that), since routes beyond the slot budget are dropped).
  With a capacity schedule each MoE layer has its own f, hence its own a.
- flops_per_image: forward FLOPs (2 per multiply-add) of matmuls and attention for one image
  at `text.max_len` text tokens: patch embedding, timestep MLP, caption projection, self- and
  cross-attention (projections, scores and weighted sums), adaLN, FFN or routed experts (at
  their own hidden width, `moe.expert_width_mult`), the shared FFN, the router (reading D
  features, or 2D when decoupled), the final layer. Element-wise ops (norms, softmax, GeLU) are left out.
- Training FLOPs = 3 x forward (backward costs two forwards) x images seen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ecdit_cli.config import RunConfig
from ecdit_cli.model.routing import expert_capacity

FREQ_EMBED = 256  # TimestepEmbedder frequency features


@dataclass
class Accounting:
    params_total: int
    params_active: float
    params_text: int
    flops_per_image: float
    tokens_per_image: int
    num_moe_layers: int
    slots_per_token: float  # expert FFNs per token in an MoE layer (0 for dense models)
    breakdown_params: dict[str, int] = field(default_factory=dict)
    breakdown_flops: dict[str, float] = field(default_factory=dict)

    def train_flops(self, images: float) -> float:
        return 3.0 * self.flops_per_image * images

    def to_dict(self) -> dict:
        return asdict(self)


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def text_encoder_params(cfg: RunConfig, vocab_size: int | None) -> int:
    t = cfg.text
    if t.encoder != "learned":
        return 0  # frozen and external
    W = t.width
    layer = _linear(W, 3 * W) + _linear(W, W) + _linear(W, 4 * W) + _linear(4 * W, W) + 4 * W
    return (vocab_size or 0) * W + t.max_len * W + t.depth * layer + 2 * W


def layer_slots_per_token(cfg: RunConfig) -> list[float]:
    """Expert FFNs one token gets on average in each MoE layer (E * C / G at that layer's f)."""
    moe, m = cfg.moe, cfg.model
    if not moe.is_moe:
        return []
    G = moe.group_size or m.tokens_per_image
    out = []
    for f in moe.capacity_factors(m.depth):
        slots = moe.num_experts * expert_capacity(G, f, moe.num_experts) / G
        # Race keeps E * C picks per group, expert choice's budget: the same slots on average. Batch
        # groups are counted per image (G = T), the groups inference routes with; training's groups
        # of a micro-batch differ only by the rounding of C.
        out.append(slots if moe.routing in ("expert_choice", "race") else min(float(moe.top_k), slots))
    return out


def expert_slots_per_token(cfg: RunConfig) -> float:
    """Expert FFNs one token gets on average in an MoE layer (E * C / G), averaged over the MoE
    layers when a capacity schedule gives them different factors."""
    per_layer = layer_slots_per_token(cfg)
    if not per_layer:
        return 0.0
    if len(set(per_layer)) == 1:
        return per_layer[0]
    return sum(per_layer) / len(per_layer)


def trained_capacity_factor(cfg: RunConfig) -> float | None:
    """The one capacity factor every MoE layer of `cfg` runs at, or None under a capacity
    schedule (then `--capacity-factor F` is never "the trained one")."""
    return None if cfg.moe.capacity_schedule else cfg.moe.capacity_factor


def capacity_settings(cfg: RunConfig) -> dict[str, Any]:
    """What an expert-choice sample or eval records about its capacity: `capacity_factor`, or
    the per-layer `capacity_factors` under a capacity schedule; nothing for other routings."""
    moe = cfg.moe
    if moe.routing != "expert_choice":
        return {}
    if moe.capacity_schedule:
        return {"capacity_factors": moe.capacity_factors(cfg.model.depth)}
    return {"capacity_factor": float(moe.capacity_factor)}


def count(cfg: RunConfig, vocab_size: int | None = None) -> Accounting:
    m, moe = cfg.model, cfg.moe
    D, T, L, W = m.hidden_size, m.tokens_per_image, cfg.text.max_len, cfg.text.width
    p2c = m.patch_size**2 * m.in_channels
    kv = 2 * m.num_kv_heads * m.head_dim
    Fh = m.mlp_hidden
    F_dense = Fh if moe.is_moe else int(round(Fh * moe.dense_width_mult))
    Fe, Fs = cfg.expert_hidden, cfg.shared_hidden if moe.is_moe else 0
    R = 2 * D if moe.is_moe and moe.router_input == "decoupled" else D
    E = moe.num_experts
    slots = layer_slots_per_token(cfg)
    a = expert_slots_per_token(cfg)

    P: dict[str, int] = {}
    P["embedders"] = (
        p2c * D + D  # x_embedder (conv as linear)
        + _linear(FREQ_EMBED, D) + _linear(D, D)  # t_embedder
        + _linear(W, D) + _linear(D, D) + 2 * D + W  # y_embedder: MLP, LayerNorm, null caption
    )
    attn = _linear(D, D) + _linear(D, kv) + _linear(D, D)
    P["self_attention"] = m.depth * attn
    P["cross_attention"] = m.depth * (attn + 2 * D)  # + norm_cross affine
    P["adaln"] = m.depth * _linear(D, 6 * D)
    expert = _linear(D, Fe) + _linear(Fe, D)
    n_moe = sum(moe.is_moe_block(i) for i in range(m.depth))
    P["ffn_dense"] = (m.depth - n_moe) * (_linear(D, F_dense) + _linear(F_dense, D))
    P["experts"] = n_moe * E * expert
    if Fs:  # only when present, so the breakdown of a config without one is unchanged
        P["shared_experts"] = n_moe * (_linear(D, Fs) + _linear(Fs, D))
    P["routers"] = n_moe * R * E
    P["final_layer"] = _linear(D, 2 * D) + _linear(D, p2c)
    total = sum(P.values())
    # One factor everywhere: n * a, the form (and float rounding) used before capacity schedules.
    uniform = len(set(slots)) <= 1
    active = total - P["experts"] + (n_moe * a * expert if uniform else sum(slots) * expert)

    Fl: dict[str, float] = {}
    Fl["embedders"] = 2.0 * (T * p2c * D + FREQ_EMBED * D + D * D + L * (W * D + D * D))
    # Projections + QK^T and AV (each 2*T*Lk*D).
    Fl["self_attention"] = m.depth * 2.0 * (T * D * D + T * D * kv + T * D * D + 2 * T * T * D)
    Fl["cross_attention"] = m.depth * 2.0 * (T * D * D + L * D * kv + T * D * D + 2 * T * L * D)
    Fl["adaln"] = m.depth * 2.0 * D * 6 * D + 2.0 * D * 2 * D
    Fl["ffn_dense"] = (m.depth - n_moe) * 2.0 * T * 2 * D * F_dense
    Fl["experts"] = (n_moe * 2.0 * T * a * 2 * D * Fe if uniform
                     else sum(2.0 * T * a_j * 2 * D * Fe for a_j in slots))
    if Fs:
        Fl["shared_experts"] = n_moe * 2.0 * T * 2 * D * Fs
    Fl["routers"] = n_moe * 2.0 * T * R * E
    Fl["final_layer"] = 2.0 * T * D * p2c
    return Accounting(
        params_total=total,
        params_active=active,
        params_text=text_encoder_params(cfg, vocab_size),
        flops_per_image=sum(Fl.values()),
        tokens_per_image=T,
        num_moe_layers=n_moe,
        slots_per_token=a,
        breakdown_params=P,
        breakdown_flops=Fl,
    )


def flops_at_slots(cfg: RunConfig, slots_per_token: float, acc: Accounting | None = None) -> float:
    """Forward FLOPs per image when an MoE layer gives each token `slots_per_token` experts on
    average (measured, e.g. race routing by its learned threshold at inference) instead of the
    config's budget: expert FLOPs are linear in the slots."""
    acc = acc or count(cfg)
    if not acc.slots_per_token:
        return acc.flops_per_image
    experts = acc.breakdown_flops["experts"]
    return acc.flops_per_image - experts + experts * slots_per_token / acc.slots_per_token


def dense_width_for_flops(cfg: RunConfig, target_flops: float) -> float:
    """The `moe.dense_width_mult` that makes a dense config's forward FLOPs equal `target_flops`.

    FLOPs are affine in the dense FFN width, so two evaluations give the exact multiplier;
    the hidden width is then rounded to an integer, so equality holds to ~1/F.
    """
    import copy

    lo, hi = copy.deepcopy(cfg), copy.deepcopy(cfg)
    lo.moe.dense_width_mult, hi.moe.dense_width_mult = 1.0, 2.0
    f1, f2 = count(lo).flops_per_image, count(hi).flops_per_image
    return 1.0 + (target_flops - f1) / (f2 - f1)


# ----------------------------------------------------------------------------------------------
# Summaries: what `ecdit info` shows.

# Published totals of Table 1 (docs/paper.md): (dense, MoE). MoE: 32 experts; M: 64 experts at depth 38.
PAPER_TOTALS = {"xl": (1.47e9, 6.08e9), "xxl": (2.35e9, 13.47e9), "3xl": (4.50e9, 32.15e9), "m": (8.03e9, 97.21e9)}


def vocab_size(cfg: RunConfig) -> int | None:
    """Words of the learned text encoder when they are known before training: the scenes'
    vocabulary plus <pad> and <unk>; None for other sources (their words come from the data)."""
    if cfg.data.source != "scenes":
        return None
    from ecdit_cli.data.scenes import vocabulary
    from ecdit_cli.model.text import WordTokenizer

    return len(WordTokenizer(vocabulary(), cfg.text.max_len).vocab)


def summary(cfg: RunConfig, acc: Accounting | None = None) -> dict:
    """The shape and counts of a config (one row of `ecdit info`); `acc` if already counted."""
    m, acc = cfg.model, acc or count(cfg, vocab_size(cfg))
    return {
        "preset": cfg.preset, "routing": cfg.moe.routing, "hidden_size": m.hidden_size, "depth": m.depth,
        "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads, "tokens_per_image": acc.tokens_per_image,
        "num_experts": cfg.moe.num_experts if cfg.moe.is_moe else 0, "num_moe_layers": acc.num_moe_layers,
        "slots_per_token": acc.slots_per_token, "params_total": acc.params_total,
        "params_active": acc.params_active, "params_text": acc.params_text, "flops_per_image": acc.flops_per_image,
    }


def paper_comparison() -> list[dict]:
    """Our counts of the paper presets beside Table 1 (MoE: 32 experts; M: 64 experts at depth 38)."""
    from ecdit_cli.config import resolve_config

    rows = []
    for name, (p_dense, p_moe) in PAPER_TOTALS.items():
        dense = count(resolve_config(preset=name))
        moe = count(resolve_config(preset="m-moe" if name == "m" else name, overrides=["moe.routing=expert_choice"]))
        diff = moe.params_total - dense.params_total
        rows.append({
            "model": name.upper() + ("-64E" if name == "m" else "-32E"), "dense_total": dense.params_total,
            "paper_dense": p_dense, "moe_total": moe.params_total, "paper_moe": p_moe,
            "moe_minus_dense": diff, "paper_moe_minus_dense": p_moe - p_dense,
            "diff_rel_error": diff / (p_moe - p_dense) - 1, "moe_active": moe.params_active,
        })
    return rows
