"""Routers: expert choice (EC-DiT, arXiv 2410.02098, Alg. 1) and token choice (GShard top-k).

Both routers turn router logits into one sparse representation, the *slot table*: expert e's
buffer has `capacity` slots; slot c holds the flat index of the token it processes
(`token_idx_EC`) and the weight its output is combined with (`weight_EC`). Unused slots point
at a zero pad row (index S) with weight 0. The same table drives the fast local dispatch
(gather / batched matmul / index_add, `moe.py`) and DeepSpeed's MOELayer (converted to its
sparse [k, S] routes by `slots_to_routes`). No tensor of size tokens x experts x capacity is
ever built.

Routing groups: tokens are split into consecutive groups of `group_size` tokens (one image by
default, so routing is batch-independent); each group has its own per-expert capacity
`C = expert_capacity(group_size, f, E)`, and the slot tables of all groups are concatenated
along the capacity axis (capacity = sum of the groups' C).

Race routing (`race`, at the end of this file) picks (token, expert) pairs by one top-k per
group, so its slot table's width is the busiest expert's count rather than a fixed capacity.

Debug and baseline routers (`debug_routing`, `moe.routing_debug`) build the same slot table
without looking at the router: `balanced` deals each group's slots round-robin over its tokens,
`random` does the same after a fixed random shuffle of the token positions. Gate variants
(`scale_gates`: per-token renormalisation, a route scale) act on any slot table's weights.

Shape legend: S tokens (all groups, flattened), E experts, C slots per expert (all groups),
N groups, G tokens per group, K routes per token (race: picks per group), R picks, D width,
J = E * C slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ecdit_cli.seeding import hash_seed


def expert_capacity(group_tokens: int, capacity_factor: float, num_experts: int) -> int:
    """Slots per expert for one routing group: C = round(G * f / E), clamped to [1, G].

    Rounding is half-up (floor(x + 0.5)) so that G * f / E = 15.5 gives 16; the clamp keeps
    C >= 1 for tiny groups and C <= G because an expert cannot take a token twice. With the
    paper's setting (G divisible by E, f = 2) C = 2G/E exactly and E * C = f * G slots.
    The same formula sizes token-choice buffers, so both routings get the same slot budget.
    """
    c = math.floor(group_tokens * capacity_factor / num_experts + 0.5)
    return max(1, min(group_tokens, c))


@dataclass
class RoutingResult:
    """One MoE layer's routing decision for S tokens, in slot-table form."""

    token_idx_EC: Tensor  # (E, C) long, token feeding each slot; S marks an unused slot
    weight_EC: Tensor  # (E, C) fp32 combine weight of each slot (0 where unused); carries router grads
    num_tokens: int  # S
    aux_loss: Tensor | None = None  # token choice: GShard load-balancing loss (unweighted)
    z_loss: Tensor | None = None  # token choice: router z-loss (unweighted)
    experts_per_token_S: Tensor | None = None  # (S,) long, detached: experts that processed each token
    tokens_per_expert_E: Tensor | None = None  # (E,) detached: routes each expert was asked for (before capacity)
    # Scalars for logging, as 0-dim device tensors (or plain floats where the host knows them):
    # the training loop moves them to the host in one transfer per log step, not one per layer
    # and forward (each transfer waits for the device to finish its queue).
    stat_values: dict[str, Tensor | float] = field(default_factory=dict)
    threshold_score: Tensor | None = None  # race top-k: mean k-th largest score of the groups (fp32, detached)

    @property
    def capacity(self) -> int:
        return self.token_idx_EC.shape[1]

    @property
    def stats(self) -> dict[str, float]:
        """`stat_values` on the host (one transfer): for analysis and tests, not the training loop."""
        return host_floats(self.stat_values)


def host_floats(values: dict[str, Tensor | float]) -> dict[str, float]:
    """{key: float} of a dict of 0-dim tensors and floats, with one host transfer for all tensors."""
    keys = [k for k, v in values.items() if isinstance(v, Tensor)]
    moved = torch.stack([values[k].detach().double() for k in keys]).tolist() if keys else []
    out = {k: float(v) for k, v in values.items()}  # floats as they are; tensors overwritten below
    out.update(zip(keys, moved, strict=True))
    return out


def count_indices(idx: Tensor, size: int) -> Tensor:
    """(size,) long: how often each value in [0, size) occurs in `idx` (all values must be < size).

    `torch.bincount` on CUDA reads the largest value back to the host to size its output (a
    device sync in every forward); a scatter-add into a buffer of known size does not.
    """
    flat = idx.reshape(-1)
    return torch.zeros(size, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))


def _group_bounds(num_tokens: int, group_size: int) -> list[tuple[int, int]]:
    """[(start, length)] of consecutive groups: full groups, then one shorter remainder group."""
    g = group_size if group_size > 0 else num_tokens
    n_full, rem = divmod(num_tokens, g)
    bounds = [(0, n_full * g)] if n_full else []
    if rem:
        bounds.append((n_full * g, rem))
    return bounds


def expert_choice(logits_SE: Tensor, group_size: int, capacity_factor: float) -> RoutingResult:
    """Expert-choice routing (docs/paper.md, steps 1-4).

    A = softmax(logits) over experts in fp32; in every group each expert keeps the C tokens
    with the largest affinity for it; the combine weight is the raw affinity A[s, e] (not
    renormalised). A token nobody picks gets no FFN output (its residual passes through).
    """
    S, E = logits_SE.shape
    g = group_size if group_size > 0 else S
    probs_SE = torch.softmax(logits_SE.float(), dim=-1)
    idx_parts, w_parts = [], []
    for start, length in _group_bounds(S, g):
        G = min(g, length)
        N = length // G
        C = expert_capacity(G, capacity_factor, E)
        probs_NEG = probs_SE[start : start + length].view(N, G, E).transpose(1, 2)
        # Unsorted: the order of an expert's slots is irrelevant (all are summed), and skipping
        # the sort of each expert's C picks makes topk ~40% faster on the CPU.
        w_NEC, idx_NEC = probs_NEG.topk(C, dim=-1, sorted=False)
        # Group-local token positions -> flat token indices (group n starts at start + n * G).
        idx_NEC = idx_NEC + torch.arange(start, start + length, G, device=logits_SE.device).view(N, 1, 1)
        idx_parts.append(idx_NEC.permute(1, 0, 2).reshape(E, N * C))
        w_parts.append(w_NEC.permute(1, 0, 2).reshape(E, N * C))
    token_idx_EC = idx_parts[0] if len(idx_parts) == 1 else torch.cat(idx_parts, dim=1)
    weight_EC = w_parts[0] if len(w_parts) == 1 else torch.cat(w_parts, dim=1)

    experts_per_token_S = count_indices(token_idx_EC, S)  # long: carries no grad
    ept = experts_per_token_S.float()
    # Statistics stay on the device (no sync here). Every slot is used, so the mean is exactly
    # E * C / S, known on the host.
    std, mx, unrouted = torch.stack([ept.std(unbiased=False), ept.max(), (ept == 0).float().mean()]).unbind()
    stats = {
        "ec_experts_per_token_mean": E * token_idx_EC.shape[1] / S,
        "ec_experts_per_token_std": std,
        "ec_experts_per_token_max": mx,
        "ec_unrouted_frac": unrouted,
    }
    return RoutingResult(
        token_idx_EC=token_idx_EC,
        weight_EC=weight_EC,
        num_tokens=S,
        experts_per_token_S=experts_per_token_S,
        tokens_per_expert_E=torch.full((E,), token_idx_EC.shape[1], device=logits_SE.device),
        stat_values=stats,
    )


def load_balancing_loss(probs_SE: Tensor, expert_SK: Tensor, group_size: int = 0) -> Tensor:
    """GShard / Switch auxiliary loss: E * sum_e mean_s(P[s, e]) * (share of routes to e).

    Computed per routing group and averaged over groups, as GShard does per group: the loss of
    a batch is then the mean of its images' losses, so it does not depend on how images are
    split across processes. The share counts all k routes of every token (before capacity),
    so the loss is 1.0 for a perfectly uniform router at any k and grows to E when every
    route goes to one expert.
    """
    S, E = probs_SE.shape
    losses = []
    for start, length in _group_bounds(S, group_size):
        G = min(group_size or S, length)
        N = length // G
        p_NGE = probs_SE[start:start + length].view(N, G, E)
        e_NR = expert_SK[start:start + length].reshape(N, -1)
        share_NE = F.one_hot(e_NR, E).float().mean(dim=1)
        losses.append(E * (p_NGE.mean(dim=1) * share_NE).sum(dim=-1))  # (N,) one per group
    return torch.cat(losses).mean()


def router_z_loss(logits_SE: Tensor) -> Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2 (keeps router logits small)."""
    return torch.logsumexp(logits_SE.float(), dim=-1).square().mean()


def token_choice(
    logits_SE: Tensor,
    group_size: int,
    capacity_factor: float,
    top_k: int,
    normalize: bool = True,
) -> RoutingResult:
    """Token-choice top-k routing with a per-expert capacity and overflow dropping (GShard).

    Each token picks its top-k experts by softmax probability. Per group, expert e accepts at
    most C = expert_capacity(G, f, E) routes, so E * C equals the expert-choice slot budget
    at the same capacity factor. Priority is GShard's: all first choices of the group (in
    token order), then all second choices, and so on; routes beyond capacity are dropped and
    the token keeps its residual for them. Gates are the top-k probabilities, renormalised
    over the k choices before dropping when `normalize` (GShard), raw otherwise.
    """
    S, E = logits_SE.shape
    K = top_k
    g = group_size if group_size > 0 else S
    probs_SE = torch.softmax(logits_SE.float(), dim=-1)
    gate_SK, expert_SK = probs_SE.topk(K, dim=-1)
    if normalize:
        gate_SK = gate_SK / gate_SK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gate_SK.dtype).eps)

    bounds = _group_bounds(S, g)
    caps = [expert_capacity(min(g, length), capacity_factor, E) for _, length in bounds]
    total_C = sum(c * (length // min(g, length)) for c, (_, length) in zip(caps, bounds, strict=True))
    # Flat slot ids in a buffer of E * total_C slots plus one scratch slot for dropped routes.
    slot_parts, keep_parts, tok_parts, gate_parts = [], [], [], []
    offset = 0  # first slot column of the current group within each expert's buffer
    for (start, length), C in zip(bounds, caps, strict=True):
        G = min(g, length)
        N = length // G
        e_NKG = expert_SK[start : start + length].view(N, G, K).permute(0, 2, 1)
        # Position of each route among the routes to its expert in this group, in priority order.
        onehot_NRE = F.one_hot(e_NKG.reshape(N, K * G), E)
        loc_NR = (onehot_NRE.cumsum(dim=1) * onehot_NRE).sum(dim=-1) - 1
        keep_NR = loc_NR < C
        col_NR = offset + torch.arange(N, device=logits_SE.device).view(N, 1) * C + loc_NR
        slot_parts.append((e_NKG.reshape(N, K * G) * total_C + col_NR).reshape(-1))
        keep_parts.append(keep_NR.reshape(-1))
        tok_NKG = (start + torch.arange(length, device=logits_SE.device)).view(N, 1, G).expand(N, K, G)
        tok_parts.append(tok_NKG.reshape(-1))
        gate_parts.append(gate_SK[start : start + length].view(N, G, K).permute(0, 2, 1).reshape(-1))
        offset += N * C
    slot_R = torch.cat(slot_parts)
    keep_R = torch.cat(keep_parts)
    scratch = E * total_C
    slot_R = torch.where(keep_R, slot_R, torch.full_like(slot_R, scratch))
    token_idx = torch.full((scratch + 1,), S, dtype=torch.long, device=logits_SE.device)
    token_idx.scatter_(0, slot_R, torch.cat(tok_parts))
    weight = torch.zeros(scratch + 1, dtype=gate_SK.dtype, device=logits_SE.device)
    weight = weight.scatter(0, slot_R, torch.cat(gate_parts) * keep_R)
    token_idx_EC = token_idx[:scratch].view(E, total_C)
    weight_EC = weight[:scratch].view(E, total_C)

    tokens_per_expert_E = count_indices(expert_SK, E).detach()
    experts_per_token_S = count_indices(token_idx_EC, S + 1)[:S].detach()
    # Statistics stay on the device; the dropped share in fp64, the arithmetic (and so the
    # float) the host once did on the kept count.
    kept, imbalance = torch.stack([keep_R.sum().float(),
                                   tokens_per_expert_E.max() / tokens_per_expert_E.float().mean()]).unbind()
    stats = {
        "tc_dropped_frac": 1.0 - kept.double() / max(1, S * K),
        "tc_load_imbalance": imbalance,
    }
    return RoutingResult(
        token_idx_EC=token_idx_EC,
        weight_EC=weight_EC,
        num_tokens=S,
        aux_loss=load_balancing_loss(probs_SE, expert_SK, g),
        z_loss=router_z_loss(logits_SE),
        experts_per_token_S=experts_per_token_S,
        tokens_per_expert_E=tokens_per_expert_E,
        stat_values=stats,
    )


def _debug_group_table(G: int, E: int, C: int, used: int, kind: str, seed: int, device) -> Tensor:
    """(E, C) group-local token of each slot: expert e's slot c < `used` takes token
    (e * used + c) mod G (after a fixed shuffle of the G positions for `random`); slots from
    `used` on are unused (-1).

    Dealing the slots of all experts in order around the group gives every expert exactly `used`
    distinct tokens (used <= C <= G) and every token floor or ceil of E * used / G slots, the
    most even spread the budget allows.
    """
    j_EC = torch.arange(E, device=device).view(E, 1) * used + torch.arange(C, device=device).view(1, C)
    local_EC = j_EC % G
    if kind == "random":
        # One permutation per (layer seed, group length): fixed for the whole run, the same on every
        # rank and after a resume, and independent of the batch (position-based, like hash routing).
        gen = torch.Generator().manual_seed(hash_seed(seed, G))
        local_EC = torch.randperm(G, generator=gen).to(device)[local_EC]
    return torch.where(torch.arange(C, device=device).view(1, C) < used, local_EC, torch.full_like(local_EC, -1))


def debug_routing(logits_SE: Tensor, kind: str, routing: str, group_size: int, capacity_factor: float,
                  top_k: int = 1, normalize: bool = True, seed: int = 0) -> RoutingResult:
    """Balanced or random slot tables that ignore the router (`moe.routing_debug`).

    `balanced` (torchtitan's force_balanced, made deterministic): in every group each expert takes
    exactly its capacity C = expert_capacity(G, f, E) of tokens, dealt round-robin; for token
    choice an expert takes min(C, k G / E) tokens so that no token gets more than k routes.
    `random` is the same table after a fixed random shuffle of the token positions (seeded by
    `seed`): the same slot budget and the same experts per token, with the assignment learned
    routing would choose replaced by chance.

    Combine weights stay the router's affinities, P[s, e] = softmax(logits)[s, e] of the
    assigned (token, expert) pairs (token choice: renormalised over the token's assigned experts
    when `normalize`, as GShard's k gates): the router keeps its gradient and the outputs keep
    the scale of the routing they replace, so the comparison isolates *which* tokens each
    expert processes. Uniform weights would also change that scale (expert-choice affinities
    are about 1/E). No auxiliary or z-loss: they would train the router towards an assignment
    that is never used.
    """
    S, E = logits_SE.shape
    g = group_size if group_size > 0 else S
    probs_SE = torch.softmax(logits_SE.float(), dim=-1)
    idx_parts = []
    for start, length in _group_bounds(S, g):
        G = min(g, length)
        N = length // G
        C = expert_capacity(G, capacity_factor, E)
        used = C if routing == "expert_choice" else max(0, min(C, top_k * G // E))
        local_EC = _debug_group_table(G, E, C, used, kind, seed, logits_SE.device)
        offsets_N = torch.arange(start, start + length, G, device=logits_SE.device)
        tok_ENC = local_EC.unsqueeze(1) + offsets_N.view(1, N, 1)
        tok_ENC = torch.where(local_EC.unsqueeze(1) < 0, torch.full_like(tok_ENC, S), tok_ENC)
        idx_parts.append(tok_ENC.reshape(E, N * C))
    token_idx_EC = idx_parts[0] if len(idx_parts) == 1 else torch.cat(idx_parts, dim=1)
    used_EC = token_idx_EC < S
    expert_EC = torch.arange(E, device=logits_SE.device).view(E, 1).expand_as(token_idx_EC)
    weight_EC = probs_SE[token_idx_EC.clamp(max=S - 1), expert_EC] * used_EC
    r = RoutingResult(token_idx_EC=token_idx_EC, weight_EC=weight_EC, num_tokens=S)
    if routing == "token_choice" and normalize:
        r.weight_EC = _per_token_normalised(r)
    counts_S = count_indices(token_idx_EC, S + 1)[:S]
    r.experts_per_token_S = counts_S
    r.tokens_per_expert_E = used_EC.sum(dim=1)
    ept = counts_S.float()
    if routing == "expert_choice":
        std, mx, unrouted = torch.stack([ept.std(unbiased=False), ept.max(), (ept == 0).float().mean()]).unbind()
        r.stat_values = {"ec_experts_per_token_mean": E * token_idx_EC.shape[1] / S, "ec_experts_per_token_std": std,
                         "ec_experts_per_token_max": mx, "ec_unrouted_frac": unrouted}
    else:
        load_E = r.tokens_per_expert_E.float()
        kept, imbalance = torch.stack([load_E.sum(), load_E.max() / load_E.mean().clamp_min(1e-9)]).unbind()
        r.stat_values = {"tc_dropped_frac": 1.0 - kept.double() / max(1, S * top_k), "tc_load_imbalance": imbalance}
    return r


def _per_token_normalised(r: RoutingResult) -> Tensor:
    """weight_EC divided by the sum of its token's weights over all its slots (0 stays 0)."""
    S = r.num_tokens
    flat_J = r.token_idx_EC.reshape(-1)
    w_J = r.weight_EC.reshape(-1)
    # One segment sum over the slot table (the pad row S collects unused slots' zero weights).
    sum_S = torch.zeros(S + 1, dtype=w_J.dtype, device=w_J.device).index_add(0, flat_J, w_J)
    return (w_J / sum_S[flat_J].clamp_min(torch.finfo(w_J.dtype).tiny)).view_as(r.weight_EC)


def scale_gates(r: RoutingResult, renormalize: bool, route_scale: float) -> RoutingResult:
    """Nucleus-Image's gates: each token's combine weights renormalised to sum to 1 over the
    experts that processed it (`renormalize`), then multiplied by `route_scale`.

    Renormalising expert-choice affinities (about 1/E each) makes a token's routed output a
    convex combination of its experts' outputs whatever E is; the route scale then sets its
    size against the residual stream (Nucleus-Image: 2.5). A token no expert took keeps 0.
    With the defaults (False, 1.0) the weights are returned untouched, bit for bit.
    """
    if renormalize:
        r.weight_EC = _per_token_normalised(r)
    if route_scale != 1.0:
        r.weight_EC = r.weight_EC * route_scale
    return r


def slots_to_routes(r: RoutingResult) -> tuple[Tensor, Tensor, Tensor]:
    """Slot table -> DeepSpeed's sparse routes (indices, locations, gates), each [K, S].

    Route row k of token s holds the k-th expert (in expert order) that processes s; K is the
    largest number of experts any token received (docs/deepspeed.md: same output as K = E, faster).
    Unused entries have index -1. (expert, location) pairs are unique by construction.
    """
    E, C = r.token_idx_EC.shape
    S = r.num_tokens
    device = r.token_idx_EC.device
    tok = r.token_idx_EC.reshape(-1)
    used = tok < S
    slot = torch.arange(E * C, device=device)[used]
    tok = tok[used]
    gates = r.weight_EC.reshape(-1)[used]
    # Stable sort by token keeps expert order within a token (slots are expert-major).
    order = torch.sort(tok, stable=True).indices
    tok, slot, gates = tok[order], slot[order], gates[order]
    counts_S = torch.bincount(tok, minlength=S)
    K = max(1, int(counts_S.max())) if tok.numel() else 1
    first = torch.cumsum(counts_S, 0) - counts_S
    rank = torch.arange(tok.numel(), device=device) - first[tok]
    indices_KS = torch.full((K, S), -1, dtype=torch.int32, device=device)
    locations_KS = torch.zeros((K, S), dtype=torch.int32, device=device)
    gates_KS = torch.zeros((K, S), dtype=r.weight_EC.dtype, device=device)
    indices_KS[rank, tok] = (slot // C).to(torch.int32)
    locations_KS[rank, tok] = (slot % C).to(torch.int32)
    gates_KS = gates_KS.index_put((rank, tok), gates)
    return indices_KS, locations_KS, gates_KS


# ----------------------------------------------------------------------------------------------
# Race routing (Race-DiT, arXiv 2503.16057): one top-k over the tokens x experts scores of a group.


def race(logits_SE: Tensor, group_size: int, capacity_factor: float, threshold: float | None = None,
         expert_cap: float = 0.0) -> RoutingResult:
    """Race routing: each group keeps its k = E * C largest (token, expert) affinities.

    Scores are A = softmax(logits) over experts in fp32, as in expert choice: a token's scores
    then sum to 1, so scores of different tokens are on one scale (a global top-k over raw
    logits or sigmoids would hand every expert to the tokens with the largest hidden norm), and
    race differs from expert choice only in the selection rule, which keeps the comparison
    clean. k = E * C with C = expert_capacity(G, f, E) is expert choice's slot budget, so both
    cost the same FLOPs on average; experts per token (0..E) and tokens per expert (0..G per
    group) both vary. The combine weight is the raw affinity.

    With `threshold` (inference) every pair with A >= threshold is kept instead: no top-k over
    the group, so a token's routing does not depend on any other token. The result's
    `threshold_score` (top-k only) is the mean over groups of the k-th largest score, the value
    the router's learned threshold follows.

    Top-k mode also returns an unweighted balance loss on the picks (`aux_loss`, weighted by
    `moe.aux_loss_weight` in training, as token choice's): ours, not Race-DiT's exact
    regulariser. Without it, after 80 steps of a debug run the busiest expert took 3.7 times the
    mean load, which both idles experts and pads the slot table (`race_slot_fill` 0.27).

    `expert_cap` > 0 bounds each expert's picks per group to expert_capacity(G, cap * f, E),
    i.e. `cap` times expert choice's C (with a threshold, per image: G = `group_size`); an
    expert's picks beyond it are dropped, lowest affinity first, like token choice's overflow.
    0 leaves the natural bound: G tokens per expert and group.

    Slot table: expert e's slots hold its picks from every group, in any order, so its width
    is the largest number of tokens any expert took (not a per-group maximum, which would pad
    far more); it never exceeds S. Building it needs only the K picks and (E,) counts.
    """
    S, E = logits_SE.shape
    device = logits_SE.device
    probs_SE = torch.softmax(logits_SE.float(), dim=-1)
    kth_sum, n_groups, aux_loss = probs_SE.new_zeros(()), 0, None
    if threshold is not None:
        tok_R, exp_R = (probs_SE >= threshold).nonzero(as_tuple=True)
        w_R = probs_SE[tok_R, exp_R]
    else:
        g = group_size if group_size > 0 else S
        tok_parts, exp_parts, w_parts, aux_parts = [], [], [], []
        for start, length in _group_bounds(S, g):
            G = min(g, length)
            N = length // G
            K = E * expert_capacity(G, capacity_factor, E)
            # The group's G x E scores as one row: one top-k picks (token, expert) pairs at once.
            w_NK, flat_NK = probs_SE[start : start + length].reshape(N, G * E).topk(K, dim=-1, sorted=False)
            kth_sum = kth_sum + w_NK.detach().min(dim=-1).values.sum()
            n_groups += N
            tok_parts.append((flat_NK // E + start + torch.arange(N, device=device).view(N, 1) * G).reshape(-1))
            exp_parts.append((flat_NK % E).reshape(-1))
            w_parts.append(w_NK.reshape(-1))
            # Balance loss on the picks (GShard's form with the race's picks as the routes): 1 when
            # every expert gets K / E picks, E when one expert takes them all.
            e_NK = flat_NK % E
            share_NE = count_indices(e_NK + torch.arange(N, device=device).view(N, 1) * E,
                                     N * E).view(N, E).float() / K
            p_NE = probs_SE[start : start + length].view(N, G, E).mean(dim=1)
            aux_parts.append(E * (p_NE * share_NE).sum(dim=-1))
        tok_R, exp_R, w_R = torch.cat(tok_parts), torch.cat(exp_parts), torch.cat(w_parts)
        aux_loss = torch.cat(aux_parts).mean()

    picked = tok_R.numel()
    if expert_cap > 0:
        tok_R, exp_R, w_R = _cap_per_expert(tok_R, exp_R, w_R, group_size if group_size > 0 else S, E,
                                            expert_capacity(group_size if group_size > 0 else S,
                                                            expert_cap * capacity_factor, E))
    counts_E = count_indices(exp_R, E)
    width = max(1, int(counts_E.max())) if exp_R.numel() else 1
    # Slot of each pick: its rank among the picks of its expert (a stable sort by expert).
    order = torch.argsort(exp_R, stable=True)
    first_E = torch.cumsum(counts_E, 0) - counts_E
    pos_R = torch.empty_like(exp_R)
    pos_R[order] = torch.arange(exp_R.numel(), device=device) - first_E[exp_R[order]]
    slot_R = exp_R * width + pos_R
    token_idx = torch.full((E * width,), S, dtype=torch.long, device=device)
    token_idx[slot_R] = tok_R
    weight = probs_SE.new_zeros(E * width).scatter(0, slot_R, w_R)
    token_idx_EC, weight_EC = token_idx.view(E, width), weight.view(E, width)

    experts_per_token_S = count_indices(tok_R, S)
    ept = experts_per_token_S.float()
    # Statistics stay on the device (the slot table's width above is race's one sync per layer).
    mean, std, mn, mx, unrouted = torch.stack([ept.mean(), ept.std(unbiased=False), ept.min(), ept.max(),
                                               (ept == 0).float().mean()]).unbind()
    stats = {
        "race_experts_per_token_mean": mean,
        "race_experts_per_token_std": std,
        "race_experts_per_token_min": mn,
        "race_experts_per_token_max": mx,
        "race_unrouted_frac": unrouted,
        # Used share of the slot table: 1 when every expert took as many tokens as the busiest one.
        "race_slot_fill": tok_R.numel() / (E * width),
        "race_dropped_frac": 1.0 - tok_R.numel() / picked if picked else 0.0,  # by moe.race_expert_cap
    }
    return RoutingResult(
        token_idx_EC=token_idx_EC,
        weight_EC=weight_EC,
        num_tokens=S,
        aux_loss=aux_loss,
        z_loss=router_z_loss(logits_SE) if aux_loss is not None else None,  # weighted by moe.z_loss_weight
        experts_per_token_S=experts_per_token_S,
        tokens_per_expert_E=counts_E,
        stat_values=stats,
        threshold_score=kth_sum / n_groups if n_groups else None,
    )


def _cap_per_expert(tok_R: Tensor, exp_R: Tensor, w_R: Tensor, group: int, E: int,
                    cap: int) -> tuple[Tensor, Tensor, Tensor]:
    """The picks each expert keeps when it takes at most `cap` tokens of every group of `group`
    consecutive tokens: its highest affinities (two stable sorts rank picks within (group, expert))."""
    by_score = torch.argsort(w_R.detach(), descending=True, stable=True)
    key_R = (tok_R // group) * E + exp_R
    order = by_score[torch.argsort(key_R[by_score], stable=True)]
    key_sorted = key_R[order]
    counts = torch.bincount(key_sorted, minlength=int(key_sorted.max()) + 1 if key_sorted.numel() else 1)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=tok_R.device) - first[key_sorted]
    keep = order[rank < cap]
    return tok_R[keep], exp_R[keep], w_R[keep]


def pad_capacity(r: RoutingResult, capacity: int) -> RoutingResult:
    """The same routing with every expert's buffer widened to `capacity` unused slots' worth.

    Expert parallelism needs one capacity on every rank (DeepSpeed's all-to-all splits the
    dispatch buffer evenly), while race's width depends on the rank's tokens.
    """
    extra = capacity - r.capacity
    if extra <= 0:
        return r
    E = r.token_idx_EC.shape[0]
    r.token_idx_EC = torch.cat([r.token_idx_EC, r.token_idx_EC.new_full((E, extra), r.num_tokens)], dim=1)
    r.weight_EC = torch.cat([r.weight_EC, r.weight_EC.new_zeros(E, extra)], dim=1)
    return r
