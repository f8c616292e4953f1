"""Load a finished run's consolidated weights (`final/model.pt`, or an export's `model.safetensors`)
without DeepSpeed's engine."""

from __future__ import annotations

from pathlib import Path

import torch

from ecdit_cli import RUN_FORMAT_VERSION, rundir
from ecdit_cli.config import RunConfig, config_from_dict, load_run_config
from ecdit_cli.devices import resolve_precision
from ecdit_cli.errors import EcditError
from ecdit_cli.model.t2i import TextToImage


def read_final_weights(run_dir: str | Path) -> dict:
    """The payload of RUN_DIR/final/model.pt (plain types and tensors only: `weights_only=True`
    refuses anything else, so loading it runs no code from the file)."""
    run_dir = rundir.require_dir(run_dir, "run directory")
    if rundir.is_run_dir(run_dir):
        load_run_config(run_dir)  # refuses a run directory written by another format version
    path = run_dir / rundir.FINAL_WEIGHTS
    if not path.exists():
        status = rundir.run_status(run_dir) if rundir.is_run_dir(run_dir) else "not a run directory"
        raise EcditError(f"{run_dir} has no final weights ({rundir.FINAL_WEIGHTS}); run status: {status}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise EcditError(f"cannot read {path}: {type(err).__name__} (truncated or corrupt?)") from None
    version = payload.get("format_version")
    if version != RUN_FORMAT_VERSION:
        raise EcditError(f"{path} has run format version {version!r}; this ecdit reads {RUN_FORMAT_VERSION}")
    return payload


def load_run(run_dir: str | Path, use_ema: bool = True, device: str = "cpu",
             capacity_factor: float | None = None, race_mode: str | None = None) -> tuple[TextToImage, RunConfig]:
    """(model in eval mode, its config) from a run directory or an export directory (`ecdit
    export`). The MoE layers run locally (ep_size 1).

    `capacity_factor` replaces an expert-choice run's trained f at inference: the router's
    weights do not depend on it (each expert still ranks the tokens by the same affinities and
    keeps its C = G f / E best), so a user can trade compute for quality when sampling. It
    replaces a capacity schedule too: every MoE layer then runs at f.
    `race_mode` (threshold or topk) replaces a race run's `moe.race_inference`.
    """
    from ecdit_cli.model.export import WEIGHTS, is_export_dir, read_export

    run_dir = rundir.require_dir(run_dir, "run directory")
    if is_export_dir(run_dir):
        data, vocabulary, weights = read_export(run_dir, use_ema)
        path = run_dir / WEIGHTS
        version = data.get("format_version")
        if version != RUN_FORMAT_VERSION:
            raise EcditError(f"{path.parent / 'config.json'} has run format version {version!r}; "
                             f"this ecdit reads {RUN_FORMAT_VERSION}")
    else:
        payload = read_final_weights(run_dir)
        path = run_dir / rundir.FINAL_WEIGHTS
        data, vocabulary = payload["config"], payload["vocabulary"]
        weights = payload["ema"] if use_ema and payload.get("ema") else payload["model"]
    if capacity_factor is not None:
        routing = data["moe"].get("routing")
        if routing != "expert_choice":
            raise EcditError(f"--capacity-factor applies to expert-choice runs; {run_dir} is a {routing} run")
        data["moe"]["capacity_factor"] = float(capacity_factor)
        data["moe"]["capacity_schedule"] = []  # F replaces a capacity schedule too: every layer runs at F
    if race_mode is not None:
        routing = data["moe"].get("routing")
        if routing != "race":
            raise EcditError(f"--race-mode applies to race runs; {run_dir} is a {routing} run")
        data["moe"]["race_inference"] = race_mode
    data["moe"]["ep_size"] = 1
    data["moe"]["deepspeed_layer"] = False
    cfg = config_from_dict(data)
    model = TextToImage(cfg, vocabulary)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise EcditError(f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if resolve_precision(cfg.train.precision, device) == "bf16":
        # Sample in the precision the run trained in (DeepSpeed's bf16 casts the trained modules;
        # frozen encoders and a VAE keep their own dtype).
        model = model.to(torch.bfloat16)
    return model.to(device).frozen_to(device).eval(), cfg
