"""Benchmarks: is an MoE layer as cheap as a dense FFN with the same activated FLOPs?

- `bench_moe`: one FFN layer (dense, token choice, expert choice per image and pooled,
  DeepSpeed's own top-2, our layers inside DeepSpeed's MOELayer): forward and forward+backward
  time, ratios to dense, peak memory, and peak memory against the token count.
- `bench_step`: the whole model's training step on the DeepSpeed engine and its sampling step,
  EC and TC against FLOP-matched and backbone-matched dense models (throughput, inference
  overhead vs theory, model FLOP utilisation on a GPU).
- `bench_ep`: the EC training step on 1 process vs `ep` expert-parallel processes, with the
  all-to-all share.
- `bench_train`: the whole training loop against its engine step, the same model in plain PyTorch,
  a plain DiT and one sgemm, with the issue's throughput targets marked met or not.
- `bench_data`: rendering, a training batch of the scene source, and the detector, per batch.
- `moe_markdown` / `step_markdown` / `data_markdown`: the tables of BENCHMARKS.md.

Results are plain dicts (JSON-ready). See timing.py for how timings and memory are taken.
"""

from ecdit_cli.bench.data import bench_data
from ecdit_cli.bench.ep import bench_ep
from ecdit_cli.bench.moe import VARIANTS, LayerShape, bench_moe, memory_sweep, shapes_from_lists
from ecdit_cli.bench.report import data_markdown, ep_markdown, moe_markdown, step_markdown, train_markdown
from ecdit_cli.bench.step import MODELS, bench_step, step_configs
from ecdit_cli.bench.timing import bench_device, interleaved, machine_info, peak_memory, summary
from ecdit_cli.bench.train import bench_train

__all__ = [
    "MODELS", "VARIANTS", "LayerShape", "bench_data", "bench_device", "bench_train", "train_markdown", "data_markdown", "bench_ep", "bench_moe", "bench_step", "ep_markdown", "interleaved",
    "machine_info", "memory_sweep", "moe_markdown", "peak_memory", "shapes_from_lists",
    "step_configs", "step_markdown", "summary",
]
