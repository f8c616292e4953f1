"""`ecdit prepare`: an image-text collection -> a sharded training cache for data.source=prepared."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def prepare(
    source: Annotated[str, typer.Argument(help="A folder of images with same-named .txt captions, a .jsonl/.csv "
                                                "manifest (path, caption), or WebDataset .tar shards (a file, a "
                                                "{000..009} pattern or a folder of them).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Cache folder to write (a re-run resumes it).")],
    image_size: Annotated[int, typer.Option("--image-size", help="Side of the stored images in pixels (before a VAE).")] = 32,
    channels: Annotated[int, typer.Option("--channels", help="3 (RGB) or 1 (grey).")] = 3,
    min_size: Annotated[Optional[int], typer.Option("--min-size", help="Skip images whose shorter side is below this (default: --image-size; 0 keeps all).")] = None,
    vae: Annotated[Optional[Path], typer.Option("--vae", help="A local diffusers AutoencoderKL folder: store float16 latents instead of pixels.")] = None,
    text_encoder: Annotated[Optional[str], typer.Option("--text-encoder", help="A local transformers folder (T5 encoder, CLIP text model, any AutoModel + tokenizer), or 'minilm': store per-token states.")] = None,
    max_len: Annotated[int, typer.Option("--max-len", help="Text tokens per caption (the run's text.max_len).")] = 16,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Source items per shard (the unit of resuming).")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per encoder forward.")] = 64,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto, for the encoders.")] = "auto",
) -> None:
    """Turn images and captions into a training cache: uint8 pixels or VAE latents, cached text states."""
    from ecdit_cli.cli.progress import console, count_progress
    from ecdit_cli.config.schema import TextConfig
    from ecdit_cli.data.prepare import PrepareOptions
    from ecdit_cli.data.prepare import prepare as run_prepare
    from ecdit_cli.devices import resolve_device

    options = PrepareOptions(image_size=image_size, channels=channels, min_size=min_size, shard_size=shard_size,
                             batch_size=batch_size)
    dev = resolve_device(device, "--device")
    image_enc = text_enc = None
    if vae is not None:
        from ecdit_cli.model.vae import load_vae

        image_enc = load_vae(vae, dev)
    if text_encoder is not None:
        from ecdit_cli.model.text import frozen_encoder_dir, load_text_encoder

        text_cfg = (TextConfig(encoder="minilm", width=384, max_len=max_len) if text_encoder == "minilm"
                    else TextConfig(encoder="hf", hf_path=text_encoder, max_len=max_len))
        text_enc = load_text_encoder(frozen_encoder_dir(text_cfg), max_len, dev)
    progress = count_progress(console, unit="items")
    with progress:
        task = progress.add_task("preparing", total=None)
        summary = run_prepare(source, out, options, image_enc, text_enc,
                              on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    skipped = sum(summary.skipped.values())
    why = ", ".join(f"{n} {reason}" for reason, n in summary.skipped.items() if n) or "none"
    resumed = f", {summary.resumed_shards} found complete" if summary.resumed_shards else ""
    what = "latents" if summary.space == "latent" else "images"
    console.print(f"{summary.cache}: {summary.written} {what} written from {summary.items} {summary.source_kind} "
                  f"items in {summary.shards} shard(s){resumed}; skipped {skipped} ({why})", markup=False)
    speed = ("nothing left to do" if summary.resumed_shards == summary.shards
             else f"{summary.seconds:.1f} s, {summary.images_per_s:.1f} items/s")
    console.print(f"{speed}; train on it with --set data.source=prepared --set data.path={summary.cache}", markup=False)
