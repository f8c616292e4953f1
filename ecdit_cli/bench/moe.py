"""One FFN layer, timed: dense vs our token- and expert-choice MoE layers vs DeepSpeed's top-2.

Every MoE variant activates the same FLOPs per token as the dense reference: a dense FFN of
hidden width f x 4D (f = capacity factor; 2 x 4D for the paper's f = 2), against experts of
hidden 4D of which each token gets f on average (expert choice: exactly f slots per token of a
group; token choice top-2: 2 routes per token within the same slot budget).

Variants (`VARIANTS`): dense, token choice top-2 (per image), expert choice per image, expert
choice over pooled groups of several images, expert choice and race routing over the whole
batch (`routing_group: batch`), race per image, DeepSpeed's own TopKGate(k=2) in
deepspeed.moe.layer.MoE (the external reference; one routing group of all tokens, its Experts
container), and our EC and TC layers run through DeepSpeed's MOELayer (the path expert
parallelism takes) instead of the local fast path. Then the routing variants (README "Routing
variants"), each at the same activated FLOPs: a shared expert (f/2 routed slots + a shared FFN of
hidden f/2 x 4D), fine-grained experts (2E experts of hidden 2D at 2f slots), the decoupled router
input with renormalised gates x2.5 (its LayerNorm and concatenation timed with it), the balanced
and random debug routers, and a capacity schedule, which needs two layers: [1.5f, 0.5f] over two
stacked EC layers, timed against two stacked dense FFNs (`dense_pair`, its reference).

Forward is timed without autograd (the inference cost); forward+backward with a fixed upstream
gradient plus the auxiliary loss where the layer has one (weight 0.01), parameter gradients
freed between calls so that every call allocates them alike.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecdit_cli.bench.timing import interleaved, load_average, machine_info, paired_ratio, peak_memory, summary
from ecdit_cli.errors import EcditError

VARIANTS = ("dense", "tc_top2", "ec_image", "ec_pooled", "ds_top2", "ec_dslayer", "tc_dslayer", "ec_batch",
            "race_image", "race_batch", "ec_shared", "ec_fine", "ec_decoupled", "ec_balanced", "ec_random",
            "dense_pair", "ec_schedule")
VARIANT_LABELS = {
    "dense": "dense FFN, hidden f x 4D (reference)",
    "tc_top2": "token choice top-2 (ours, per image)",
    "ec_image": "expert choice f=2 per image (ours)",
    "ec_pooled": "expert choice, pooled groups (ours)",
    "ds_top2": "DeepSpeed TopKGate k=2 (deepspeed.moe MoE)",
    "ec_dslayer": "expert choice via DeepSpeed MOELayer",
    "tc_dslayer": "token choice via DeepSpeed MOELayer",
    "ec_batch": "expert choice over the whole batch (ours)",
    "race_image": "race f=2 per image (ours)",
    "race_batch": "race f=2 over the whole batch (ours)",
    "ec_shared": "expert choice f/2 + shared expert f/2 x 4D",
    "ec_fine": "expert choice fine-grained: 2E experts of 2D, 2f slots",
    "ec_decoupled": "expert choice, decoupled router [LN(x), t], gates renormalised x2.5",
    "ec_balanced": "expert choice, balanced debug routing",
    "ec_random": "expert choice, fixed random routing",
    "dense_pair": "two dense FFNs, hidden f x 4D (reference of the schedule)",
    "ec_schedule": "two expert-choice layers, capacity schedule [1.5f, 0.5f] (ratios to dense_pair)",
}
# The row each variant's ratios are taken against (dense unless listed).
REFERENCES = {"ec_schedule": "dense_pair"}
AUX_WEIGHT = 0.01


@dataclass(frozen=True)
class LayerShape:
    """One benchmark shape: `images` x `tokens_per_image` tokens of width `width`, `experts` experts."""

    images: int
    tokens_per_image: int
    width: int
    experts: int

    @property
    def tokens(self) -> int:
        return self.images * self.tokens_per_image

    def label(self) -> str:
        return f"{self.images}x{self.tokens_per_image} tok, D={self.width}, E={self.experts}"


def shapes_from_lists(images: list[int], tokens: list[int], widths: list[int], experts: list[int]) -> list[LayerShape]:
    """Every combination of the given lists, in order."""
    for name, values in (("images", images), ("tokens", tokens), ("width", widths), ("experts", experts)):
        if not values or any(v < 1 for v in values):
            raise EcditError(f"--{name} {values} is invalid: give one or more positive integers")
    return [LayerShape(*combo) for combo in itertools.product(images, tokens, widths, experts)]


class _DeepSpeedTop2(nn.Module):
    """deepspeed.moe.layer.MoE with its TopKGate(k=2) and Experts container, as shipped."""

    def __init__(self, width: int, hidden: int, experts: int, capacity_factor: float) -> None:
        super().__init__()
        from ecdit_cli.model.moe import DeepSpeedMoE, FeedForward

        # DeepSpeed's top-2 doubles its capacity factor internally: f / 2 gives E * C = f * S slots.
        self.moe = DeepSpeedMoE(hidden_size=width, expert=FeedForward(width, hidden), num_experts=experts,
                                ep_size=1, k=2, capacity_factor=capacity_factor / 2,
                                eval_capacity_factor=capacity_factor / 2, min_capacity=0, use_residual=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        y, l_aux, _ = self.moe(x)
        return y, l_aux


class _Ours(nn.Module):
    """Our MoEFeedForward returning (y, aux loss or None). `variant`: MoEFeedForward keywords;
    `expert_hidden` / `experts` replace 4D / the shape's expert count (fine-grained experts)."""

    def __init__(self, routing: str, shape: LayerShape, capacity_factor: float, group_size: int,
                 deepspeed_layer: bool, routing_group: str = "image", expert_hidden: int | None = None,
                 experts: int | None = None, **variant) -> None:
        super().__init__()
        from ecdit_cli.model.moe import MoEFeedForward

        D = shape.width
        self.layer = MoEFeedForward(D, expert_hidden or 4 * D, experts or shape.experts, routing, capacity_factor,
                                    2, group_size, use_deepspeed_layer=deepspeed_layer, routing_group=routing_group,
                                    tokens_per_image=shape.tokens_per_image, **variant)
        nn.init.normal_(self.layer.router.wg.weight, std=0.02)  # as DiT.initialize_weights
        self.decoupled = variant.get("router_input_size") is not None
        if self.decoupled:  # a fixed timestep embedding per image, as DiTBlock hands it over
            self.register_buffer("c_BD", torch.randn(shape.images, D, generator=torch.Generator().manual_seed(1)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        r_in = None
        if self.decoupled:
            n = F.layer_norm(x, x.shape[-1:], eps=1e-6)
            r_in = torch.cat([n, self.c_BD.unsqueeze(1).expand_as(n)], dim=-1)
        y, r = self.layer(x, r_in)
        return y, r.aux_loss


class _Stack(nn.Module):
    """Two layers one after the other (a capacity schedule needs two MoE layers to differ)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        h, aux1 = self.first(x)
        y, aux2 = self.second(h)
        return y, aux1 if aux2 is None else aux2 if aux1 is None else aux1 + aux2


class _Dense(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        from ecdit_cli.model.moe import FeedForward

        self.ffn = FeedForward(width, hidden)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.ffn(x), None


def build_layer(variant: str, shape: LayerShape, capacity_factor: float = 2.0, pool_tokens: int = 1024) -> nn.Module:
    """The module of one variant at one shape; forward(x_BTD) -> (y_BTD, aux loss or None)."""
    D, T = shape.width, shape.tokens_per_image
    # Pooled groups: as many whole images as fit in `pool_tokens` (the paper's 1024 in training).
    pool = max(1, pool_tokens // T) * T
    if variant == "dense":
        return _Dense(D, int(round(capacity_factor * 4 * D)))
    if variant == "ds_top2":
        return _DeepSpeedTop2(D, 4 * D, shape.experts, capacity_factor)
    if variant in ("tc_top2", "tc_dslayer"):
        return _Ours("token_choice", shape, capacity_factor, T, variant == "tc_dslayer")
    if variant in ("ec_image", "ec_dslayer"):
        return _Ours("expert_choice", shape, capacity_factor, T, variant == "ec_dslayer")
    if variant == "ec_pooled":
        return _Ours("expert_choice", shape, capacity_factor, pool, False)
    if variant in ("ec_batch", "race_batch"):
        # Batch-level groups (training mode, as benchmarked): every token of the batch in one group.
        routing = "race" if variant == "race_batch" else "expert_choice"
        return _Ours(routing, shape, capacity_factor, 0, False, "batch")
    if variant == "race_image":
        return _Ours("race", shape, capacity_factor, T, False)
    f = capacity_factor
    if variant == "ec_shared":
        return _Ours("expert_choice", shape, f / 2, T, False, shared_hidden=int(round(f / 2 * 4 * D)))
    if variant == "ec_fine":
        return _Ours("expert_choice", shape, 2 * f, T, False, expert_hidden=2 * D, experts=2 * shape.experts)
    if variant == "ec_decoupled":
        return _Ours("expert_choice", shape, f, T, False, router_input_size=2 * D, renormalize_gates=True,
                     route_scale=2.5)
    if variant in ("ec_balanced", "ec_random"):
        return _Ours("expert_choice", shape, f, T, False, routing_debug=variant[3:])
    if variant == "dense_pair":
        return _Stack(_Dense(D, int(round(f * 4 * D))), _Dense(D, int(round(f * 4 * D))))
    if variant == "ec_schedule":
        return _Stack(_Ours("expert_choice", shape, 1.5 * f, T, False),
                      _Ours("expert_choice", shape, 0.5 * f, T, False))
    raise EcditError(f"variant {variant!r} is invalid: allowed: {', '.join(VARIANTS)}")


def layer_calls(module: nn.Module, x: Tensor, grad: Tensor) -> tuple[Callable[[], None], ...]:
    """(forward, forward+backward, free gradients) closures of one layer on a fixed input and
    upstream gradient; forward+backward frees the previous call's gradients first."""
    params = [p for p in module.parameters() if p.requires_grad]
    aux_grad = torch.tensor(AUX_WEIGHT, device=x.device)

    def forward() -> None:
        with torch.no_grad():
            module(x)

    def free_grads() -> None:
        for p in params:
            p.grad = None
        x.grad = None

    def forward_backward() -> None:
        free_grads()
        y, aux = module(x)
        if aux is None:
            torch.autograd.backward([y], [grad])
        else:
            torch.autograd.backward([y, aux], [grad, aux_grad.to(aux.dtype)])

    return forward, forward_backward, free_grads


def _input(shape: LayerShape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.images, shape.tokens_per_image, shape.width, generator=g)
    grad = torch.randn(x.shape, generator=g) / x.numel() ** 0.5
    return x.to(device, dtype).requires_grad_(True), grad.to(device, dtype)


def bench_shape(shape: LayerShape, variants: list[str], reps: int, warmup: int, device: torch.device,
                dtype: torch.dtype, capacity_factor: float = 2.0, pool_tokens: int = 1024,
                memory: bool = True) -> list[dict]:
    """Rows (one per variant) of medians, ratios to dense and peak memory at one shape."""
    variants = list(variants) if "dense" in variants else ["dense", *variants]
    for v in list(variants):
        ref = REFERENCES.get(v)
        if ref and ref not in variants:
            variants.insert(variants.index(v), ref)
    torch.manual_seed(0)
    modules = {v: build_layer(v, shape, capacity_factor, pool_tokens).to(device, dtype) for v in variants}
    x, grad = _input(shape, device, dtype)
    calls = {v: layer_calls(m, x, grad) for v, m in modules.items()}
    fwd = interleaved({v: c[0] for v, c in calls.items()}, reps, warmup, device)
    fwd_bwd = interleaved({v: c[1] for v, c in calls.items()}, reps, warmup, device)
    mem = {v: peak_memory(c[1], device, before=c[2]) for v, c in calls.items()} if memory else {}
    rows = []
    for v in variants:
        f, fb = summary(fwd[v]), summary(fwd_bwd[v])
        rows.append({
            **asdict(shape), "tokens": shape.tokens, "variant": v, "label": VARIANT_LABELS[v],
            "fwd_ms": 1e3 * f["median"], "fwd_iqr_ms": 1e3 * f["iqr"],
            "fwd_bwd_ms": 1e3 * fb["median"], "fwd_bwd_iqr_ms": 1e3 * fb["iqr"], "reps": reps,
            "peak_mem_bytes": mem.get(v),
        })
    by_variant = {r["variant"]: r for r in rows}
    for r in rows:
        r["reference"] = name = REFERENCES.get(r["variant"], "dense")
        ref = by_variant[name]
        r["fwd_ratio"] = paired_ratio(fwd, r["variant"], name)
        r["fwd_bwd_ratio"] = paired_ratio(fwd_bwd, r["variant"], name)
        r["mem_ratio"] = r["peak_mem_bytes"] / ref["peak_mem_bytes"] if memory and ref["peak_mem_bytes"] else None
    return rows


def memory_sweep(images: list[int], tokens_per_image: int, width: int, experts: int, device: torch.device,
                 dtype: torch.dtype, variants: tuple[str, ...] = ("dense", "ec_image"),
                 capacity_factor: float = 2.0) -> list[dict]:
    """Peak memory of one fwd+bwd at growing token counts (images x tokens_per_image).

    Linear growth shows as a constant marginal cost per token (bytes between consecutive sizes
    / tokens added); a tokens x experts x capacity tensor would make it grow with the tokens.
    """
    rows = []
    for v in variants:
        prev = None
        for n in sorted(images):
            shape = LayerShape(n, tokens_per_image, width, experts)
            torch.manual_seed(0)
            module = build_layer(v, shape, capacity_factor).to(device, dtype)
            x, grad = _input(shape, device, dtype)
            _, fb, free = layer_calls(module, x, grad)
            fb()  # warm-up: lazy inits must not count
            peak = peak_memory(fb, device, before=free)
            row = {"variant": v, "images": n, "tokens": shape.tokens, "peak_mem_bytes": peak,
                   "bytes_per_token": peak / shape.tokens, "marginal_bytes_per_token": None}
            if prev is not None:
                row["marginal_bytes_per_token"] = (peak - prev["peak_mem_bytes"]) / (shape.tokens - prev["tokens"])
            rows.append(row)
            prev = row
    return rows


def bench_moe(shapes: list[LayerShape], variants: list[str] | None = None, reps: int = 10, warmup: int = 2,
              device: torch.device | None = None, dtype: torch.dtype | None = None, capacity_factor: float = 2.0,
              pool_tokens: int = 1024, memory: bool = True, sweep_images: list[int] | None = None,
              on_progress: Callable[[str], None] = lambda msg: None) -> dict:
    """The whole `bench moe` result: machine, settings, one row per (shape, variant), memory sweep."""
    from ecdit_cli.bench.timing import default_dtype

    device = device or torch.device("cpu")
    dtype = dtype or default_dtype(device)
    variants = list(variants or VARIANTS)
    for v in variants:
        if v not in VARIANTS:
            raise EcditError(f"variant {v!r} is invalid: allowed: {', '.join(VARIANTS)}")
    if reps < 1:
        raise EcditError(f"reps={reps} is invalid: must be >= 1")
    machine = machine_info(device, dtype)  # before the runs: the load average is other processes' load
    rows = []
    for shape in shapes:
        on_progress(f"layer {shape.label()}: {len(variants)} variants x {reps} interleaved reps")
        rows += bench_shape(shape, variants, reps, warmup, device, dtype, capacity_factor, pool_tokens, memory)
    sweep = []
    if memory and sweep_images:
        s0 = shapes[0]
        on_progress(f"memory sweep over {sweep_images} images of {s0.tokens_per_image} tokens")
        sweep = memory_sweep(sweep_images, s0.tokens_per_image, s0.width, s0.experts, device, dtype,
                             capacity_factor=capacity_factor)
    return {
        "kind": "moe",
        "machine": machine,
        "settings": {"reps": reps, "warmup": warmup, "capacity_factor": capacity_factor,
                     "pool_tokens": pool_tokens, "variants": variants, "aux_loss_weight": AUX_WEIGHT},
        "rows": rows,
        "load_avg_1m_end": load_average(),
        "memory_sweep": sweep,
    }
