"""`ecdit export`: a finished run as plain files any PyTorch program can load without pickle.

An export directory holds

    model.safetensors  the weights ecdit samples with (the EMA weights; the raw ones for a run
                       trained without EMA), float32, every expert of every MoE layer
    config.json        the run's config (`RunConfig.to_dict()`), set for one process
                       (moe.ep_size=1, moe.deepspeed_layer=false): build the model from it
    vocab.json         the word list of the learned text encoder's tokenizer (ids 0 and 1 are
                       padding and the unknown word, as in `WordTokenizer`)

safetensors is a flat table of named tensors plus a JSON header: reading it runs no code, unlike
`torch.load` of a pickle. `model/load.py` loads an export wherever a run directory is accepted
(`ecdit sample`, `ecdit eval`, `ecdit analyze`); the README shows the same in plain torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecdit_cli import __version__
from ecdit_cli.errors import EcditError
from ecdit_cli.files import atomic_write_bytes, atomic_write_text

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
VOCAB = "vocab.json"
DEFAULT_DIR = "export"  # RUN_DIR/export unless -o is given


@dataclass
class Exported:
    out_dir: Path
    files: list[Path]
    weights: str  # "ema" or "model"
    num_tensors: int
    num_params: int


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / WEIGHTS).is_file() and (Path(path) / CONFIG).is_file()


def import_safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise EcditError("exports need the safetensors package: pip install -e '.[export]'") from None
    return safetensors.torch


def inference_config(data: dict[str, Any]) -> dict[str, Any]:
    """A run config dict set for one process: all experts local, no DeepSpeed dispatch."""
    data = json.loads(json.dumps(data))
    data["moe"]["ep_size"] = 1
    data["moe"]["deepspeed_layer"] = False
    return data


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Exported:
    """Write RUN_DIR's final weights, config and vocabulary as an export directory."""
    from ecdit_cli.model.load import read_final_weights

    st = import_safetensors()
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / DEFAULT_DIR
    if out.exists() and not out.is_dir():
        raise EcditError(f"export directory is not a directory: {out}")
    payload = read_final_weights(run_dir)
    kind = "ema" if payload.get("ema") else "model"
    # Own storage per tensor: safetensors refuses views that share memory.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in payload[kind].items()}
    meta = {"format": "pt", "ecdit_weights": kind, "ecdit_version": __version__,
            "format_version": str(payload.get("format_version"))}
    atomic_write_bytes(out / WEIGHTS, st.save(tensors, metadata=meta))
    atomic_write_text(out / CONFIG, json.dumps(inference_config(payload["config"]), indent=2) + "\n")
    atomic_write_text(out / VOCAB, json.dumps(list(payload["vocabulary"])) + "\n")
    return Exported(out, [out / WEIGHTS, out / CONFIG, out / VOCAB], kind, len(tensors),
                    sum(t.numel() for t in tensors.values()))


def read_export(path: Path, use_ema: bool = True) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """(config dict, vocabulary, weights) of an export directory; nothing is unpickled."""
    from ecdit_cli.files import read_json

    st = import_safetensors()
    weights_file = path / WEIGHTS
    try:
        from safetensors import safe_open

        with safe_open(str(weights_file), framework="pt") as f:
            kind = (f.metadata() or {}).get("ecdit_weights", "model")
        weights = st.load_file(str(weights_file))
    except Exception as err:  # safetensors raises its own error type on a damaged header
        raise EcditError(f"cannot read {weights_file}: {type(err).__name__} (truncated or corrupt?)") from None
    if not use_ema and kind == "ema":
        raise EcditError(f"{path} holds the EMA weights only (an export keeps what ecdit samples with); "
                         "sample the run directory itself for the raw weights")
    data = read_json(path / CONFIG, "export config")
    vocab = read_json(path / VOCAB, "export vocabulary") if (path / VOCAB).is_file() else None
    if not isinstance(data, dict) or not isinstance(vocab, list):
        raise EcditError(f"{path} is not a complete export (config.json must be a mapping, vocab.json a list)")
    return data, vocab, weights
