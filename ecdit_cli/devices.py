"""Which torch device a name stands for: one resolver for configs, commands and benchmarks."""

from __future__ import annotations

from ecdit_cli.errors import EcditError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, what: str = "--device", allowed: tuple[str, ...] = DEVICES) -> str:
    """'auto' -> 'cuda' when a CUDA device is visible, else 'cpu'; 'cpu' and 'cuda' as given.

    `what` names the setting in errors (`--device`, `train.device`); asking for CUDA where
    there is none is an error, never a silent fallback.
    """
    import torch

    if name not in allowed:
        raise EcditError(f"{what} {name!r} is invalid: allowed: {', '.join(allowed)}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else f"torch with CUDA {torch.version.cuda}"
        hint = f"{what} cpu" if what.startswith("--") else f"{what}=cpu"
        raise EcditError(f"{what}=cuda but no CUDA device is visible ({build} {torch.__version__}); use {hint}")
    return name


def syncs_are_free(device) -> bool:
    """Whether reading a value of a tensor on `device` back to the host costs nothing.

    On the CPU it is a memory read. On an accelerator it waits until the device has run every
    kernel queued so far, which stalls the host's queueing of the next ones: code on the
    training path branches on tensor values only where this is True (tests patch it to run the
    accelerator's code path on the CPU).
    """
    return getattr(device, "type", device) == "cpu"


def resolve_precision(setting: str, device: str) -> str:
    """`train.precision` on a device type: 'auto' is bf16 on CUDA (DeepSpeed's bf16 mode: bf16
    weights and activations, fp32 master weights in the optimizer, routers in fp32) and fp32
    elsewhere; 'fp32' and 'bf16' as given. Training, validation and sampling all follow it."""
    if setting == "auto":
        return "bf16" if getattr(device, "type", str(device).split(":")[0]) == "cuda" else "fp32"
    return setting
