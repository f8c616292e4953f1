"""Sampling a trained run: Euler integration of the rectified-flow ODE with classifier-free guidance.

Images start as Gaussian noise at t = 1 and follow dx/dt = v(x, t) down to t = 0
(`rectified_flow.euler_sample`). Guidance combines a conditional and an unconditional velocity,
v = v_u + s (v_c - v_u) (`rectified_flow.cfg_combine`); the unconditional pass uses caption dropout's
learned null caption (`drop=True`), exactly as training dropped captions. Both passes share one
forward (the batch is [conditional; unconditional]); several images are sampled together.

In latent space (`model.space=latent`) the Euler steps run on latents and the VAE decodes
x_0 once at the end; images come back at the VAE's output size.

Determinism: the initial noise of image j of prompt i is a pure function of (seed, i, j)
(numpy's SeedSequence, so it is the same on every host and device). With per-image routing
groups (the default) the network itself is batch-independent, so an image does not depend on
which other prompts or how many images share its batch (to float rounding). With pooled groups
(`moe.group_size` > tokens per image) images compete for the same experts, so an image depends
on its batch neighbours by design (the paper's pooled inference groups). Batch-level groups
(`moe.routing_group: batch`) are a training pool only: in eval mode they route per image, and
race routes by its learned threshold, so both stay batch-independent here.

Defaults: cfg scale 4.0 (PixArt / SD3 use 4.5-7 at 256 px; on a `tiny` scenes run, 4 drew
fewer spurious objects for one-object prompts than 1 or 2), 30 Euler steps (rectified-flow
paths are nearly straight; 25-50 is usual), shift 1.0 (no timestep shift at 32 x 32 pixels).

With `record_routing` the conditional pass runs on its own (so token-choice loads count
conditional tokens only) and every MoE layer's routing is kept per Euler step
(`RoutingRecord`): how many experts processed each image token, and the per-expert loads.
"""

from __future__ import annotations

import contextlib
import json
import math
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecdit_cli.config.sampling import DEFAULT_CFG_SCALE, DEFAULT_GUIDANCE_MAX_T, DEFAULT_SHIFT, DEFAULT_STEPS
from ecdit_cli.errors import EcditError
from ecdit_cli.figures import figure_bytes
from ecdit_cli.files import atomic_write_bytes, npz_bytes
from ecdit_cli.model.rectified_flow import cfg_combine, euler_sample, euler_timesteps

DEFAULT_BATCH_SIZE = 64  # images integrated together (each costs two rows with guidance)
_NOISE_SALT = 0x5A3B1E  # keeps the sampling noise apart from every other default_rng([seed, ...]) stream


@dataclass
class RoutingRecord:
    """Routing of the conditional pass, per Euler step and MoE layer (L layers, E experts).

    Token order within an image is the DiT's patch order: row-major over the (grid, grid) patches.
    """

    routing: str  # "expert_choice" or "token_choice"
    blocks: list[int]  # DiT block index of each MoE layer
    num_experts: int
    t: np.ndarray  # (steps,) the t at which each step's velocity was evaluated
    experts_per_token: np.ndarray  # (steps, L, P, N, grid, grid) int16: experts that processed each patch
    tokens_per_expert: np.ndarray  # (steps, L, E) routes asked of each expert, before capacity (all images)
    kept_per_expert: np.ndarray  # (steps, L, E) tokens each expert processed (all images)


@dataclass
class SampleResult:
    prompts: list[str]
    images: np.ndarray  # (P, N, H, W, C) float32 in [0, 1]
    settings: dict[str, Any] = field(default_factory=dict)
    routing: RoutingRecord | None = None


def initial_noise(seed: int, prompt_index: int, image_index: int, shape: Sequence[int]) -> np.ndarray:
    """The starting noise (C, H, W) float32 of image `image_index` of prompt `prompt_index`."""
    rng = np.random.default_rng([_NOISE_SALT, int(seed), int(prompt_index), int(image_index)])
    return rng.standard_normal(tuple(shape), dtype=np.float32)


def check_settings(n: int, cfg_scale: float, steps: int, seed: int, shift: float,
                   guidance_max_t: float = DEFAULT_GUIDANCE_MAX_T) -> None:
    if n < 1:
        raise EcditError(f"images per prompt must be >= 1, got {n}")
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise EcditError(f"cfg scale must be a finite number >= 0 (1 = no guidance), got {cfg_scale}")
    if steps < 1:
        raise EcditError(f"sampling steps must be >= 1, got {steps}")
    if seed < 0:
        raise EcditError(f"seed must be >= 0, got {seed}")
    if not math.isfinite(shift) or shift <= 0:
        raise EcditError(f"timestep shift must be > 0 (1 = none), got {shift}")
    if not 0 <= guidance_max_t <= 1:
        raise EcditError(f"guidance max t must be in [0, 1] (1 = guidance at every step), got {guidance_max_t}")


def tokenize_prompts(model, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (or frozen states) and mask; one error naming every unknown word of every prompt."""
    prompts = list(prompts)
    if not prompts:
        raise EcditError("give at least one prompt")
    tok = getattr(model, "tokenizer", None)
    if getattr(model, "text_encoder", None) is not None and tok is not None:
        unknown = sorted({w for p in prompts for w in tok.unknown_words(p)})
        if unknown:
            raise EcditError(f"unknown word(s) in the prompt(s): {', '.join(unknown)}; "
                             f"this model knows: {', '.join(tok.vocab[2:])}")
    return model.tokenize(prompts, strict=True)


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(total, s + size)) for s in range(0, total, max(1, size))]


def num_batches(num_prompts: int, n: int, batch_size: int = DEFAULT_BATCH_SIZE) -> int:
    """Batches `sample_images` integrates (each runs `steps` Euler steps)."""
    return len(_chunks(num_prompts * n, batch_size))


def _integrate(model, noise: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, cfg_scale: float, steps: int,
               shift: float, record: Callable[[int, list], None] | None,
               on_step: Callable[[int, float], None] | None, guidance_max_t: float = DEFAULT_GUIDANCE_MAX_T,
               ) -> torch.Tensor:
    """Euler from t = 1 to 0 for one batch; x_0 (B, C, H, W) in model range.

    Guidance applies only at steps whose t <= guidance_max_t (a guidance interval, Kynkäänniemi
    et al. 2024); above it the conditional velocity alone moves x, at one forward per step.
    """
    B = noise.shape[0]
    # Host-side t grid (the one euler_sample walks): deciding per step costs no device sync.
    guided_at = [cfg_scale != 1.0 and t <= guidance_max_t for t in euler_timesteps(steps, shift).tolist()[:-1]]
    step = 0
    # The model runs in its weights' dtype (bf16 inside a bf16 training run, train.precision);
    # the Euler integration stays in fp32. Both casts are no-ops for an fp32 model.
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        guided = guided_at[step]
        x = x.to(dtype)
        if record is not None or not guided:
            cond = model(x, t, text, mask)
            if record is not None:
                record(step, cond.routing)
            if not guided:
                return cond.velocity.float()
            drop = torch.ones(B, dtype=torch.bool, device=x.device)
            return cfg_combine(cond.velocity.float(), model(x, t, text, mask, drop).velocity.float(), cfg_scale)
        # One forward for both passes: rows [0, B) conditional, [B, 2B) with the null caption.
        drop = torch.arange(2 * B, device=x.device) >= B
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, text]), torch.cat([mask, mask]),
                     drop).velocity.float()
        return cfg_combine(both[:B], both[B:], cfg_scale)

    def after_step(i: int, t: float, _v: torch.Tensor) -> None:
        nonlocal step
        step = i + 1
        if on_step is not None:
            on_step(i, t)

    return euler_sample(velocity, noise, steps, shift, on_step=after_step)


@torch.no_grad()
def sample_images(
    model,
    cfg,
    prompts: Sequence[str],
    n: int = 1,
    cfg_scale: float = DEFAULT_CFG_SCALE,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    shift: float = DEFAULT_SHIFT,
    on_step: Callable[[int, float], None] | None = None,
    record_routing: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_progress: Callable[[int, int], None] | None = None,
    guidance_max_t: float = DEFAULT_GUIDANCE_MAX_T,
) -> SampleResult:
    """Sample `n` images for every prompt with the model's current weights.

    on_step(step, t) runs after each Euler step of each batch; on_progress(images_done,
    images_total) after each batch. Images come back as (P, N, H, W, C) in [0, 1], in prompt
    order. `record_routing` keeps the MoE routing of every step (see `RoutingRecord`).
    """
    check_settings(n, cfg_scale, steps, seed, shift, guidance_max_t)
    t_start = time.time()
    prompts = list(prompts)
    text_all, mask_all = tokenize_prompts(model, prompts)
    device = next(model.parameters()).device
    m = cfg.model
    C, H = m.in_channels, m.input_size  # the DiT's input: pixels, or latent cells
    C_img, H_img = model.image_shape() if hasattr(model, "image_shape") else (C, H)
    to_pixels = getattr(model, "to_pixels", lambda x: x)
    grid = H // m.patch_size
    T = grid * grid
    P = len(prompts)
    pairs = [(i, j) for i in range(P) for j in range(n)]
    moe_blocks = [i for i in range(m.depth) if cfg.moe.is_moe_block(i)]
    record_on = record_routing and bool(moe_blocks)
    L, E = len(moe_blocks), cfg.moe.num_experts
    ts = euler_timesteps(steps, shift)
    if record_on:
        ept = np.zeros((steps, L, P * n, T), dtype=np.int16)
        requested = np.zeros((steps, L, E), dtype=np.int64)
        kept = np.zeros((steps, L, E), dtype=np.int64)

    out = np.empty((P * n, H_img, H_img, C_img), dtype=np.float32)
    for start, stop in _chunks(len(pairs), batch_size):
        idx = [pairs[k][0] for k in range(start, stop)]
        B = stop - start
        noise = torch.from_numpy(np.stack([initial_noise(seed, i, j, (C, H, H)) for i, j in pairs[start:stop]]))
        text = text_all[idx].to(device)
        mask = mask_all[idx].to(device)
        if text.dtype == torch.long and getattr(model, "text_encoder", None) is not None:
            # Encode the captions once, not at every step: the model accepts text states directly.
            text = model.text_encoder(text, mask)
        record = None
        if record_on:
            def record(step: int, routing: list, _rows: slice = slice(start, stop), _B: int = B) -> None:
                for layer, r in enumerate(routing):
                    ept[step, layer, _rows] = r.experts_per_token_S[: _B * T].view(_B, T).cpu().numpy()
                    requested[step, layer] += r.tokens_per_expert_E.cpu().numpy().astype(np.int64)
                    kept[step, layer] += (r.token_idx_EC < r.num_tokens).sum(dim=1).cpu().numpy()
        x0 = _integrate(model, noise.to(device), text, mask, cfg_scale, steps, shift, record, on_step, guidance_max_t)
        out[start:stop] = ((to_pixels(x0).float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        if on_progress is not None:
            on_progress(stop, len(pairs))

    routing = None
    if record_on:
        routing = RoutingRecord(
            routing=cfg.moe.routing, blocks=moe_blocks, num_experts=E, t=ts[:-1].numpy().astype(np.float64),
            experts_per_token=ept.reshape(steps, L, P, n, grid, grid), tokens_per_expert=requested,
            kept_per_expert=kept,
        )
    settings = {"cfg": float(cfg_scale), "steps": int(steps), "seed": int(seed), "shift": float(shift), "n": int(n),
                "guidance_max_t": float(guidance_max_t), "wall_time_s": time.time() - t_start}
    return SampleResult(prompts=prompts, images=out.reshape(P, n, H_img, H_img, C_img), settings=settings,
                        routing=routing)


def sample_run(run_dir: str | Path, prompts: Sequence[str], n: int = 4, cfg_scale: float = DEFAULT_CFG_SCALE,
               steps: int = DEFAULT_STEPS, seed: int = 0, shift: float = DEFAULT_SHIFT, use_ema: bool = True,
               device: str = "cpu", capacity_factor: float | None = None, race_mode: str | None = None,
               **kwargs: Any) -> SampleResult:
    """Load a finished run (EMA weights by default; an expert-choice run at `capacity_factor`,
    a race run in `race_mode`, when given) and sample from it; settings name the run, its
    capacity and activated FLOPs per image (measured for race)."""
    from ecdit_cli.model.load import load_run

    check_settings(n, cfg_scale, steps, seed, shift)
    model, cfg = load_run(run_dir, use_ema=use_ema, device=device, capacity_factor=capacity_factor,
                          race_mode=race_mode)
    with measure_slots(model) as meter:
        result = sample_images(model, cfg, prompts, n, cfg_scale, steps, seed, shift, **kwargs)
    result.settings.update(run_id=cfg.name or Path(run_dir).name, ema=bool(use_ema and cfg.train.ema_decay > 0),
                           **routing_settings(cfg, meter))
    return result


class SlotMeter:
    """Counts the expert slots the MoE layers of a model use while it is attached: race routing
    by its learned threshold gives each token a data-dependent number of experts, so its
    activated FLOPs are measured, not read off the config."""

    def __init__(self) -> None:
        self.slots = 0  # used (token, expert) slots, summed over layers and forward passes
        self.tokens = 0  # tokens routed, summed the same way

    @property
    def slots_per_token(self) -> float | None:
        return self.slots / self.tokens if self.tokens else None

    def _hook(self, module, inputs, output) -> None:
        r = output[1]
        self.slots += int((r.token_idx_EC < r.num_tokens).sum())
        self.tokens += r.num_tokens


@contextlib.contextmanager
def measure_slots(model):
    """Attach a `SlotMeter` to every MoE layer of `model` for the duration of the block."""
    from ecdit_cli.model.moe import MoEFeedForward

    meter = SlotMeter()
    handles = [m.register_forward_hook(meter._hook) for m in model.modules() if isinstance(m, MoEFeedForward)]
    try:
        yield meter
    finally:
        for h in handles:
            h.remove()


def routing_settings(cfg, meter: SlotMeter | None = None) -> dict[str, Any]:
    """What a sample or eval records about its routing and compute: the capacity an expert-choice
    run sampled at; for race, the inference mode and the measured experts per token, with the
    activated forward FLOPs per image that follow from them (`flops_per_image`). Under a capacity
    schedule an expert-choice run records its per-layer `capacity_factors` instead."""
    from ecdit_cli.model.accounting import capacity_settings, count, flops_at_slots, vocab_size

    acc = count(cfg, vocab_size(cfg))
    out: dict[str, Any] = {"flops_per_image": acc.flops_per_image, **capacity_settings(cfg)}
    if cfg.moe.routing == "race":
        out["race_mode"] = cfg.moe.race_inference
        measured = meter.slots_per_token if meter is not None else None
        if measured is not None:
            out["slots_per_token"] = measured
            out["flops_per_image"] = flops_at_slots(cfg, measured, acc)
    return out


# ----------------------------------------------------------------------------------------------
# Files: a labelled PNG grid and the raw images.
# ----------------------------------------------------------------------------------------------

def show_image(ax, image: np.ndarray) -> None:
    """An (H, W, C) image in [0, 1] on a bare axis, pixels unsmoothed."""
    img = image[..., 0] if image.shape[-1] == 1 else image
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():  # a whole frame, whatever the house style hides on plots
        spine.set_visible(True)


def image_grid(result: SampleResult, title: str | None = None):
    """One row per prompt (its text as the row label), one column per image."""
    from matplotlib.figure import Figure

    P, N = result.images.shape[:2]
    cell = 1.25
    fig = Figure(figsize=(2.3 + cell * N, 0.5 + cell * P), layout="constrained")
    axes = fig.subplots(P, N, squeeze=False)
    for i in range(P):
        for j in range(N):
            ax = axes[i][j]
            show_image(ax, result.images[i, j])
            if i == 0:
                ax.set_title(f"image {j}", fontsize=8)
        axes[i][0].set_ylabel("\n".join(textwrap.wrap(result.prompts[i], 22)), rotation=0, ha="right",
                              va="center", fontsize=8, labelpad=6)
    s = result.settings
    fig.suptitle(title or f"{s.get('run_id', 'samples')}: cfg {s.get('cfg'):g}, {s.get('steps')} steps, "
                          f"seed {s.get('seed')}" + ("" if s.get("ema", True) else ", raw weights"), fontsize=9)
    return fig


def save_samples(result: SampleResult, png_path: str | Path) -> dict[str, Path]:
    """Write the grid to `png_path` and the raw images beside it (same stem, `.npz`).

    The .npz holds `images` (P, N, H, W, C) float32 in [0, 1], `prompts` (P,) and `settings`
    (a JSON string): `np.load(path)["images"]`.
    """
    png = Path(png_path)
    if png.suffix.lower() != ".png":
        raise EcditError(f"output file must end in .png, got {png}")
    npz = png.with_suffix(".npz")
    atomic_write_bytes(npz, npz_bytes(images=result.images, prompts=np.asarray(result.prompts),
                                      settings=np.asarray(json.dumps(result.settings))))
    atomic_write_bytes(png, figure_bytes(image_grid(result)))
    return {"png": png, "npz": npz}
