"""`ecdit bench moe`, `step`, `train` and `data`: the benchmarks of BENCHMARKS.md."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Benchmarks: MoE layer and whole-model step time against dense at equal activated FLOPs.",
                  no_args_is_help=True)

DeviceOpt = Annotated[str, typer.Option("--device", help="cpu (fp32) or cuda (bf16, one GPU).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the results as JSON instead of markdown tables.")]
MarkdownOpt = Annotated[Optional[Path], typer.Option("--markdown", help="Also write the markdown tables to FILE.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="CPU intra-op threads (0 = torch's default).")]
RepsOpt = Annotated[int, typer.Option("--reps", help="Interleaved repetitions per candidate (medians reported).")]
WarmupOpt = Annotated[int, typer.Option("--warmup", help="Untimed calls of each candidate first.")]


def _progress(quiet: bool):
    if quiet:
        return lambda msg: None
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    return lambda msg: console.print(f"[dim]{msg}[/]")


@contextlib.contextmanager
def _stdout_to_stderr():
    """Keep stdout for the results: DeepSpeed prints and logs to stdout (its logger binds the
    stream at import, so it is imported here, inside the redirection)."""
    from ecdit_cli import deepspeed_compat

    with contextlib.redirect_stdout(sys.stderr):
        deepspeed_compat.import_deepspeed()
        yield


def _emit(result: dict, markdown: str, as_json: bool, path: Optional[Path]) -> None:
    if path is not None:
        from ecdit_cli.files import atomic_write_text

        atomic_write_text(path, markdown + "\n")
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(markdown)


@app.command("moe")
def moe(
    images: Annotated[Optional[list[int]], typer.Option("--images", help="Images per batch (repeatable).")] = None,
    tokens: Annotated[Optional[list[int]], typer.Option("--tokens", help="Tokens per image (repeatable).")] = None,
    width: Annotated[Optional[list[int]], typer.Option("--width", help="Model width D (repeatable).")] = None,
    experts: Annotated[Optional[list[int]], typer.Option("--experts", help="Number of experts (repeatable).")] = None,
    variant: Annotated[Optional[list[str]], typer.Option("--variant", help="Only these variants (repeatable); "
                                                         "dense is always included.")] = None,
    capacity_factor: Annotated[float, typer.Option("--capacity-factor", help="f: expert slots per token.")] = 2.0,
    pool_tokens: Annotated[int, typer.Option("--pool-tokens", help="Tokens per pooled EC routing group.")] = 1024,
    sweep: Annotated[Optional[list[int]], typer.Option("--sweep", help="Image counts of the memory sweep "
                                                       "(repeatable; default 1 2 4 8 16).")] = None,
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="Measure peak memory (and the sweep).")] = True,
    reps: RepsOpt = 20,
    warmup: WarmupOpt = 2,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = 0,
    as_json: JsonOpt = False,
    markdown: MarkdownOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines on stderr.")] = False,
) -> None:
    """Time one FFN layer: dense vs TC top-2 vs EC (per image, pooled) vs DeepSpeed top-2 vs MOELayer path.

    The shapes are every combination of --images, --tokens, --width and --experts (default: 8 images x 256
    tokens, widths 256 and 512, 8 experts).
    """
    from ecdit_cli.bench import bench_device, bench_moe, moe_markdown, shapes_from_lists
    from ecdit_cli.bench.timing import set_threads

    dev = bench_device(device)
    set_threads(threads)
    shapes = shapes_from_lists(images or [8], tokens or [256], width or [256, 512], experts or [8])
    with _stdout_to_stderr():
        result = bench_moe(shapes, variant or None, reps=reps, warmup=warmup, device=dev,
                           capacity_factor=capacity_factor, pool_tokens=pool_tokens, memory=memory,
                           sweep_images=sweep or [1, 2, 4, 8, 16], on_progress=_progress(quiet))
    _emit(result, moe_markdown(result), as_json, markdown)


@app.command("step")
def step(
    preset: Annotated[str, typer.Option("--preset", help="Model preset (see `ecdit info`).")] = "medium",
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config key (repeatable).")] = None,
    batch: Annotated[int, typer.Option("--batch", help="Images per step.")] = 32,
    reps: RepsOpt = 10,
    sample_reps: Annotated[Optional[int], typer.Option(
        "--sample-reps", help="Interleaved repetitions of the sampling step (default 3 x --reps).")] = None,
    warmup: WarmupOpt = 1,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = 0,
    peak_tflops: Annotated[Optional[float], typer.Option(
        "--peak-tflops", help="Peak bf16 TFLOP/s of the device: adds model FLOP utilisation.")] = None,
    width_multiple: Annotated[int, typer.Option(
        "--width-multiple", help="Round the FLOP-matched dense FFN width to a multiple of this (1 = exact).")] = 64,
    ep: Annotated[int, typer.Option("--ep", help="Also run the EC step on this many expert-parallel processes "
                                               "(CPU; 0 = skip).")] = 0,
    as_json: JsonOpt = False,
    markdown: MarkdownOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines on stderr.")] = False,
) -> None:
    """Time a training step and a sampling step of the dense, token-choice and expert-choice models."""
    from ecdit_cli.bench import bench_device, bench_ep, bench_step, step_markdown
    from ecdit_cli.bench.timing import set_threads
    from ecdit_cli.errors import EcditError

    dev = bench_device(device)
    if ep and dev.type != "cpu":
        raise EcditError("--ep runs on the CPU here (one GPU per process is not set up by the benchmark)")
    set_threads(threads)
    progress = _progress(quiet)
    with _stdout_to_stderr():
        result = bench_step(preset, list(set_ or []), batch=batch, reps=reps, warmup=warmup, device=dev,
                            peak_tflops=peak_tflops, width_multiple=width_multiple, sample_reps=sample_reps,
                            on_progress=progress)
        if ep:
            result["ep"] = bench_ep(preset, list(set_ or []), batch=batch, reps=reps, warmup=warmup, ep=ep,
                                    on_progress=progress)
    _emit(result, step_markdown(result), as_json, markdown)


@app.command("data")
def data(
    batch: Annotated[int, typer.Option("--batch", help="Images per batch.")] = 32,
    image_size: Annotated[int, typer.Option("--image-size", help="Image side in pixels (16..64).")] = 32,
    reps: RepsOpt = 10,
    warmup: WarmupOpt = 1,
    threads: ThreadsOpt = 0,
    as_json: JsonOpt = False,
    markdown: MarkdownOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines on stderr.")] = False,
) -> None:
    """Time the built-in data path: scene rendering, a training batch, the exact detector."""
    from ecdit_cli.bench import bench_data, data_markdown
    from ecdit_cli.bench.timing import set_threads
    from ecdit_cli.errors import EcditError

    if batch < 1 or reps < 1:
        raise EcditError(f"--batch {batch} / --reps {reps} is invalid: both must be >= 1")
    set_threads(threads)
    result = bench_data(batch=batch, image_size=image_size, reps=reps, warmup=warmup, on_progress=_progress(quiet))
    _emit(result, data_markdown(result), as_json, markdown)


@app.command("train")
def train(
    preset: Annotated[str, typer.Option("--preset", help="Model preset (see `ecdit info`).")] = "tiny",
    routing: Annotated[Optional[list[str]], typer.Option(
        "--routing", help="Routings to measure (repeatable) [default: dense and expert_choice].")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Steps of each full-loop run (the demo's settings).")] = 200,
    rounds: Annotated[int, typer.Option("--rounds", help="Full-loop runs per routing, each followed by the timed steps.")] = 3,
    reps: RepsOpt = 10,
    batch: Annotated[int, typer.Option("--batch", help="Images per step.")] = 32,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config key (repeatable).")] = None,
    no_startup: Annotated[bool, typer.Option("--no-startup", help="Skip the start-up measurement (two subprocesses).")] = False,
    no_whole: Annotated[bool, typer.Option(
        "--no-whole", help="Skip the whole-process comparison (`ecdit train` vs a plain PyTorch script, each round).")] = False,
    compile_: Annotated[bool, typer.Option(
        "--compile", help="Also time the engine step of a torch.compile'd engine (train.compile; the first "
                          "step compiles, ~100 s for the debug model on 2 cores).")] = False,
    threads: ThreadsOpt = 0,
    as_json: JsonOpt = False,
    markdown: MarkdownOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines on stderr.")] = False,
) -> None:
    """Time the whole training loop against its engine step, plain PyTorch, a plain DiT and sgemm."""
    from ecdit_cli.bench import bench_train, train_markdown
    from ecdit_cli.bench.timing import set_threads
    from ecdit_cli.config.schema import ROUTINGS
    from ecdit_cli.errors import EcditError

    routings = tuple(routing or ("dense", "expert_choice"))
    for r in routings:
        if r not in ROUTINGS:
            raise EcditError(f"--routing {r!r} is invalid: allowed: {', '.join(ROUTINGS)}")
    set_threads(threads)
    with _stdout_to_stderr():
        result = bench_train(preset, routings, steps=steps, rounds=rounds, reps=reps, batch=batch,
                             overrides=list(set_ or []), startup=not no_startup, whole=not no_whole,
                             compile=compile_, on_progress=_progress(quiet))
    _emit(result, train_markdown(result), as_json, markdown)
