"""Peak dense bf16 tensor-core throughput of known GPUs, for model FLOP utilisation (MFU).

MFU = model FLOPs per second (accounting.py: 3 x the forward FLOPs per image for a training
step, the forward FLOPs for a sampling step) / the device's peak. Peaks are NVIDIA's datasheet
values for bf16 *without* structured sparsity (the datasheets' headline figures are twice these,
with sparsity, which a dense model cannot use):

| GPU | bf16 dense TFLOP/s |
|---|---:|
| H100 SXM, H200 SXM, GH200 | 989 |
| H100 NVL, H200 NVL | 835 |
| H100 PCIe | 756 |
| A100 (SXM and PCIe) | 312 |

A device that is not in the table gets no MFU (and the report says so) rather than a guess;
`ecdit bench step --peak-tflops` supplies a peak for any device.
"""

from __future__ import annotations

# (substrings the name from torch.cuda.get_device_name must all contain, label, TFLOP/s), most
# specific first: "NVIDIA H100 PCIe" must not fall through to the SXM entry.
PEAKS_BF16_DENSE: tuple[tuple[tuple[str, ...], str, float], ...] = (
    (("GH200",), "GH200", 989.0),
    (("H200", "NVL"), "H200 NVL", 835.0),
    (("H200",), "H200 SXM", 989.0),
    (("H100", "NVL"), "H100 NVL", 835.0),
    (("H100", "PCIE"), "H100 PCIe", 756.0),
    (("H100",), "H100 SXM", 989.0),
    (("A100",), "A100", 312.0),
)


def peak_bf16_tflops(gpu_name: str | None) -> tuple[str, float] | None:
    """(label, peak bf16 dense TFLOP/s) of a device name such as 'NVIDIA H100 80GB HBM3'; None if unknown."""
    if not gpu_name:
        return None
    name = gpu_name.upper()
    for parts, label, tflops in PEAKS_BF16_DENSE:
        if all(p in name for p in parts):
            return label, tflops
    return None


def resolve_peak(gpu_name: str | None, given: float | None) -> dict[str, object]:
    """The peak a report uses: `given` (--peak-tflops) first, then the table; with a line saying which.

    {"peak_tflops": float | None, "peak_note": str}; no GPU (a CPU run) and no `given` -> no MFU
    and an empty note."""
    if given is not None:
        return {"peak_tflops": float(given), "peak_note": f"MFU against --peak-tflops {given:g} TFLOP/s."}
    if gpu_name is None:
        return {"peak_tflops": None, "peak_note": ""}
    found = peak_bf16_tflops(gpu_name)
    if found is None:
        return {"peak_tflops": None,
                "peak_note": f"No MFU: {gpu_name} is not in the peak table (ecdit_cli/bench/peaks.py: H100, H200, "
                             "GH200, A100); rerun with --peak-tflops set to its dense bf16 peak."}
    label, tflops = found
    return {"peak_tflops": tflops, "peak_note": f"MFU against the {label}'s {tflops:g} TFLOP/s bf16 dense peak "
                                                "(NVIDIA datasheet, without sparsity)."}


def mfu(flops: float, seconds: float, peak_tflops: float) -> float:
    """Model FLOP utilisation: `flops` done in `seconds` as a share of `peak_tflops`."""
    return flops / seconds / (peak_tflops * 1e12)
