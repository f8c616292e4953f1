"""Load a finished run's consolidated weights (`final/model.pt`) without DeepSpeed's engine."""

from __future__ import annotations

from pathlib import Path

import torch

from ecdit_cli import RUN_FORMAT_VERSION, rundir
from ecdit_cli.config import RunConfig, config_from_dict, load_run_config
from ecdit_cli.errors import EcditError
from ecdit_cli.model.t2i import TextToImage


def load_run(run_dir: str | Path, use_ema: bool = True, device: str = "cpu",
             capacity_factor: float | None = None) -> tuple[TextToImage, RunConfig]:
    """(model in eval mode, its config). The MoE layers run locally (ep_size 1).

    `capacity_factor` replaces an expert-choice run's trained f at inference: the router's
    weights do not depend on it (each expert still ranks the tokens by the same affinities and
    keeps its C = G f / E best), so a user can trade compute for quality when sampling. It
    replaces a capacity schedule too: every MoE layer then runs at f.
    """
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
    data = payload["config"]
    if capacity_factor is not None:
        routing = data["moe"].get("routing")
        if routing != "expert_choice":
            raise EcditError(f"--capacity-factor applies to expert-choice runs; {run_dir} is a {routing} run")
        data["moe"]["capacity_factor"] = float(capacity_factor)
        data["moe"]["capacity_schedule"] = []
    data["moe"]["ep_size"] = 1
    data["moe"]["deepspeed_layer"] = False
    cfg = config_from_dict(data)
    model = TextToImage(cfg, payload["vocabulary"])
    weights = payload["ema"] if use_ema and payload.get("ema") else payload["model"]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise EcditError(f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device).eval(), cfg
