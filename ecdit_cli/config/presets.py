"""Named model sizes: the paper's family (Table 1 of EC-DiT) and a CPU family for real studies here.

A preset is a function returning config overrides (nested dict); any routing and expert count
can be combined with any preset. Paper presets follow the paper's Table 1 (docs/paper.md):
hidden, depth, heads, KV heads; head dim 64. The parts the paper does not state are our
choices, documented here: latent input 32x32x4 with patch 2 (256x256 images through an 8x VAE,
256 tokens; train them on a latent cache: `ecdit prepare --vae`, `data.source: prepared`,
`model.space: latent`), a 768-wide text
encoder (CLIP-L-like) with 77 tokens, DiT-style per-block adaLN-Zero. `m` is dense M
(46 blocks); `m-moe` is the 38-block backbone of EC-DiT-M-64E (Table 1: "46 dense, 38 MoE").

The CPU family trains on 32x32 RGB scenes with patch 4 (64 tokens per image) on 2 cores;
`debug` trains in seconds for tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ecdit_cli.errors import ConfigError, did_you_mean


def _paper(hidden: int, depth: int, heads: int, kv_heads: int, experts: int = 32) -> Callable[[], dict]:
    def preset() -> dict[str, Any]:
        return {
            "model": {"input_size": 32, "in_channels": 4, "patch_size": 2, "hidden_size": hidden,
                      "depth": depth, "num_heads": heads, "num_kv_heads": kv_heads, "mlp_ratio": 4.0},
            "moe": {"num_experts": experts, "capacity_factor": 2.0, "top_k": 2},
            "text": {"width": 768, "max_len": 77, "depth": 2, "num_heads": 12},
            # Latents are not rendered here: point data.path at a folder of .npy latents + captions.jsonl.
            "data": {"source": "folder"},
            "train": {"optimizer": "rmsprop", "lr": 1e-4, "warmup_steps": 20000, "steps": 800000,
                      "batch_size": 4096, "precision": "bf16"},
        }

    return preset


def _cpu(hidden: int, depth: int, heads: int, kv_heads: int, text_width: int) -> Callable[[], dict]:
    def preset() -> dict[str, Any]:
        return {
            "model": {"input_size": 32, "in_channels": 3, "patch_size": 4, "hidden_size": hidden,
                      "depth": depth, "num_heads": heads, "num_kv_heads": kv_heads, "mlp_ratio": 4.0},
            "text": {"width": text_width, "depth": 2, "num_heads": 4, "max_len": 16},
        }

    return preset


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    # CPU family: 32x32 pixels, patch 4 (64 tokens), head dim 16-32.
    "debug": _cpu(hidden=32, depth=2, heads=2, kv_heads=1, text_width=32),
    # mini sits between debug and tiny so that a study has five CPU sizes below medium
    # (65K to 3.3M activated parameters: sweeps/reference.yaml).
    "mini": _cpu(hidden=48, depth=3, heads=3, kv_heads=1, text_width=48),
    "tiny": _cpu(hidden=64, depth=4, heads=4, kv_heads=2, text_width=64),
    "small": _cpu(hidden=96, depth=6, heads=4, kv_heads=2, text_width=64),
    "medium": _cpu(hidden=128, depth=8, heads=4, kv_heads=2, text_width=96),
    "large": _cpu(hidden=192, depth=8, heads=6, kv_heads=2, text_width=128),
    # Paper family (Table 1, docs/paper.md).
    "xl": _paper(1152, 28, 18, 6),
    "xxl": _paper(1536, 38, 24, 6),
    "3xl": _paper(2304, 42, 36, 6),
    "m": _paper(3072, 46, 48, 12, experts=64),
    "m-moe": _paper(3072, 38, 48, 12, experts=64),
}


def preset_overrides(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(
            f"unknown preset '{name}'" + (did_you_mean(name, PRESETS) or f" (allowed: {', '.join(PRESETS)})")
        )
    return PRESETS[name]()
