"""`train.init_from`: start a run from another run's final weights; dense -> MoE is sparse upcycling.

Sparse upcycling (Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints", arXiv 2212.05055): every expert of an MoE block starts as a copy of the dense
run's FFN of that block, optionally perturbed by `train.init_noise` (Gaussian, relative to the
RMS of each weight matrix; biases are copied exactly); attention, embeddings, norms, the text
encoder and the dense blocks are copied as they are.

The router starts at zero (their paper draws it at random). With zero logits every affinity is
1/E, so at step 0 the MoE block computes the dense FFN times the total gate a token receives:
- token choice with `normalize_top_k` (the default): the k kept gates are renormalised to sum to
  1, so a token that keeps all its routes gets the dense output, bit for bit (tested for k = 1, 2);
  a route dropped for capacity loses its share. All tokens tie on every expert and pick the same
  first k experts, so only a capacity covering every token (C = G, f >= E) drops nothing;
- expert choice: a token picked by n experts gets n/E x the dense output; with f = E every expert
  picks every token (C = G) and the block equals the dense FFN to rounding (a sum of E terms
  y/E; measured 4e-7 at E = 8). At f < E the tied affinities make every expert pick the same
  C tokens: those get the dense output, the others none, until the router moves.
A zero router therefore starts from the dense model's function where a random one would not.
The price is symmetry: with identical experts and uniform affinities the router's gradient is
zero under expert choice, up to rounding (the softmax Jacobian cancels equal per-expert gradients), so
experts that start as exact copies stay copies. Expert choice needs `train.init_noise` > 0
(e.g. 0.01) to specialise; token choice also breaks symmetry through its top-k ties and
balancing loss, but only coarsely. The run logs a warning when the noise is 0.

Upcycling refuses fine-grained experts (`moe.expert_width_mult` != 1: an expert narrower than
the dense FFN cannot be its copy) and shared experts (`moe.shared_experts` > 0: a shared FFN beside
copied experts would not start from the dense model's function). The decoupled router input, gate
scaling, capacity schedules, debug routers, race and batch groups upcycle like any routing (the
router starts at zero whatever it reads).

From an MoE run of the same shape every weight is copied (a plain warm start; routing and
capacity may differ). Config keys that decide a weight's shape (including the expert and shared
widths and the router input) must agree; the first that does not is named in one line.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any

import torch

from ecdit_cli import RUN_FORMAT_VERSION, rundir
from ecdit_cli.config import RunConfig, config_changes, config_from_dict, load_run_config
from ecdit_cli.errors import EcditError
from ecdit_cli.seeding import hash_seed

KEY = "train.init_from"
# Keys whose values fix the shapes of copied weights (all of model.* and text.* are compared).
_SHAPE_SECTIONS = ("model.", "text.")
_MOE_SHAPE_KEYS = ("moe.num_experts", "moe.moe_every", "moe.moe_first", "moe.expert_width_mult",
                   "moe.shared_experts", "moe.shared_expert_width_mult", "moe.router_input")
# A routed expert's (El, D, F) / (El, F, D) weights and where the dense FFN keeps them.
_EXPERT_FROM_DENSE = {"w1": ("fc1.weight", True), "b1": ("fc1.bias", False),
                      "w2": ("fc2.weight", True), "b2": ("fc2.bias", False)}
_EXPERTS = ".deepspeed_moe.experts."
_ROUTER = ".deepspeed_moe.gate.wg.weight"


def _source_dir(run_dir: str | Path) -> Path:
    path = Path(run_dir)
    if not path.is_dir():
        raise EcditError(f"{KEY}: {path} is not a directory")
    if not (path / rundir.FINAL_WEIGHTS).is_file():
        status = rundir.run_status(path) if rundir.is_run_dir(path) else "not a run directory"
        raise EcditError(f"{KEY}: {path} has no final weights ({rundir.FINAL_WEIGHTS}; run status: {status})")
    return path


def check_source(cfg: RunConfig) -> None:
    """What can be checked without the weights: the source is a finished run whose config fits
    this one (run before the run directory is touched)."""
    if not cfg.train.init_from:
        return
    path = _source_dir(cfg.train.init_from)
    try:
        src = load_run_config(path)
    except EcditError as err:
        raise EcditError(f"{KEY}: {err}") from None
    check_compatible(src, cfg, path)


def read_source(run_dir: str | Path) -> tuple[Path, dict[str, Any], RunConfig]:
    """(run directory, final/model.pt payload, its config) of the run to start from."""
    path = _source_dir(run_dir)
    weights = path / rundir.FINAL_WEIGHTS
    try:
        payload = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:
        raise EcditError(f"{KEY}: cannot read {weights}: {type(err).__name__} (truncated or corrupt?)") from None
    if payload.get("format_version") != RUN_FORMAT_VERSION:
        raise EcditError(f"{KEY}: {weights} has run format version {payload.get('format_version')!r}; "
                         f"this ecdit reads {RUN_FORMAT_VERSION}")
    return path, payload, config_from_dict(payload["config"])


def check_compatible(src: RunConfig, cfg: RunConfig, where: Path) -> str:
    """'upcycle' (dense -> MoE), 'warm_start' (same kind), or one line naming the first mismatch."""

    def mismatch(key: str, there: Any, here: Any, why: str = "") -> EcditError:
        return EcditError(f"{KEY}: {key} {there!r} in {where / rundir.CONFIG} vs {here!r} here{why}")

    keys = [c for c in config_changes(src, cfg) if c[0].startswith(_SHAPE_SECTIONS)]
    if keys:
        raise mismatch(*keys[0])
    if src.moe.is_moe and not cfg.moe.is_moe:
        raise EcditError(f"{KEY}: {where} is an MoE run (moe.routing={src.moe.routing}); a dense run cannot "
                         "start from it")
    if src.moe.is_moe:
        for k in _MOE_SHAPE_KEYS:
            there, here = getattr(src.moe, k[4:]), getattr(cfg.moe, k[4:])
            if there != here:
                raise mismatch(k, there, here)
        kind = "warm_start"
    else:
        # Dense FFNs (and every expert of an MoE run) are mlp_hidden wide only at dense_width_mult 1.
        here = cfg.moe.dense_width_mult if not cfg.moe.is_moe else 1.0
        if src.moe.dense_width_mult != here:
            raise mismatch("moe.dense_width_mult", src.moe.dense_width_mult, here,
                           " (each expert copies the dense FFN, so their widths must match)" if cfg.moe.is_moe else "")
        kind = "upcycle" if cfg.moe.is_moe else "warm_start"
        if kind == "upcycle":
            # Each expert is a copy of the dense FFN: a narrower expert cannot be one, and a shared FFN
            # added on top would double the dense output at step 0 (the function upcycling keeps).
            if cfg.moe.expert_width_mult != 1.0:
                raise EcditError(f"{KEY}: moe.expert_width_mult={cfg.moe.expert_width_mult:g} cannot be upcycled from "
                                 f"the dense run {where} (each expert copies its FFN: keep 1.0)")
            if cfg.moe.shared_experts:
                raise EcditError(f"{KEY}: moe.shared_experts={cfg.moe.shared_experts} cannot be upcycled from the "
                                 f"dense run {where} (shared FFN + copied experts would not start as the dense "
                                 "model: keep 0)")
    return kind


def _noisy(w: torch.Tensor, noise: float, seed: int, name: str, expert: int) -> torch.Tensor:
    """w + noise x RMS(w) x N(0, 1), drawn from a generator of (seed, name, global expert id): the
    same for an expert whatever the expert-parallel layout."""
    if noise == 0:
        return w
    gen = torch.Generator().manual_seed(hash_seed(seed, zlib.crc32(name.encode()), expert))
    rms = float(w.float().square().mean().sqrt())
    return w + noise * rms * torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w.dtype)


@torch.no_grad()
def initialise(model: torch.nn.Module, run_dir: str | Path, cfg: RunConfig, vocabulary: list[str]) -> dict[str, Any]:
    """Fill `model` (this rank's experts only) from `run_dir`'s final raw weights.

    Returns what the run records about it: init_from (absolute path), init_kind, init_flops (the
    source run's training FLOPs, from its summary; None if it has none)."""
    where, payload, src = read_source(run_dir)
    kind = check_compatible(src, cfg, where)
    src_vocabulary = list(payload.get("vocabulary", []))
    if src_vocabulary != list(vocabulary):
        raise EcditError(f"{KEY}: the vocabulary of {where} ({len(src_vocabulary)} words) differs from this "
                         f"run's ({len(vocabulary)} words: another data source?)")
    weights: dict[str, torch.Tensor] = payload["model"]
    noise, seed = cfg.train.init_noise, cfg.train.seed
    for name, p in model.named_parameters():
        if _EXPERTS in name:
            prefix, leaf = name.split(_EXPERTS)
            El = p.shape[0]
            first = model_expert_offset(model, name)
            if kind == "upcycle":
                src_name, transpose = _EXPERT_FROM_DENSE[leaf]
                dense = _weight(weights, f"{prefix}.{src_name}", where)
                one = dense.t() if transpose else dense
                stack = [one] * El
            else:
                full = _weight(weights, name, where)
                stack = list(full[first: first + El])
            for i, w in enumerate(stack):
                _copy(p[i], _noisy(w, noise, seed, name, first + i) if leaf in ("w1", "w2") else w, name, where)
        elif name.endswith(_ROUTER) and kind == "upcycle":
            p.zero_()
        else:
            _copy(p, _weight(weights, name, where), name, where)
    summary = rundir.read_summary(where) if (where / rundir.SUMMARY).exists() else None
    flops = (summary or {}).get("train_flops")
    return {"init_from": str(where.resolve()), "init_kind": kind,
            "init_flops": float(flops) if isinstance(flops, (int, float)) and math.isfinite(flops) else None}


def model_expert_offset(model: torch.nn.Module, param_name: str) -> int:
    """Global id of the first local expert of the GroupedExperts holding `param_name`."""
    module_name = param_name.rsplit(".", 1)[0]
    return int(getattr(model.get_submodule(module_name), "expert_offset", 0))


def _weight(weights: dict[str, torch.Tensor], name: str, where: Path) -> torch.Tensor:
    if name not in weights:
        raise EcditError(f"{KEY}: {where / rundir.FINAL_WEIGHTS} has no weight {name}")
    return weights[name]


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str, where: Path) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise EcditError(f"{KEY}: {name} is {tuple(src.shape)} in {where / rundir.FINAL_WEIGHTS} vs "
                         f"{tuple(dst.shape)} here")
    dst.copy_(src)
