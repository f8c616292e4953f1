"""Measure what the README's "Your own data" note reports: `ecdit prepare` throughput, and the
training step in pixel vs latent space at equal tokens (interleaved rounds).

    python scripts/own_data_timing.py [--images 2000] [--rounds 3] [--steps 40] [--preset tiny]

Uses the tiny random stand-ins of scripts/tiny_pretrained.py (a 2-level VAE, a 2-layer T5):
what it measures is ecdit's own overhead around the encoders plus these tiny encoders' cost,
not what a real SD VAE or T5-XXL costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    import tiny_pretrained
    from scenes_folder import write_scenes

    from ecdit_cli.config import resolve_config
    from ecdit_cli.data.prepare import PrepareOptions, prepare
    from ecdit_cli.files import read_jsonl
    from ecdit_cli.model.text import load_text_encoder
    from ecdit_cli.model.vae import load_vae
    from ecdit_cli.train.loop import train

    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--preset", default="tiny")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ecdit-own-data-"))
    vae_dir, t5_dir = tiny_pretrained.tiny_vae(root / "vae"), tiny_pretrained.tiny_t5(root / "t5")
    write_scenes(root / "scenes", args.images)
    vae, t5 = load_vae(vae_dir), load_text_encoder(t5_dir, 16)

    rates: dict[str, list[float]] = {"pixels": [], "pixels + T5": [], "latents (VAE)": [], "latents (VAE) + T5": []}
    for r in range(args.rounds):
        for name in rates:
            t0 = time.time()
            s = prepare(root / "scenes", root / f"cache-{r}-{len(name)}-{name[0]}", PrepareOptions(shard_size=500),
                        image_encoder=vae if "VAE" in name else None, text_encoder=t5 if "T5" in name else None)
            rates[name].append(s.written / (time.time() - t0))
    print(f"prepare, {args.images} 32-px PNGs, median of {args.rounds} interleaved rounds:")
    for name, v in rates.items():
        print(f"  {name:22s} {statistics.median(v):8.0f} images/s  (rounds: {', '.join(f'{x:.0f}' for x in v)})")

    cache = root / "cache-latent"
    prepare(root / "scenes", cache, PrepareOptions(shard_size=500), image_encoder=vae)
    base = [f"train.steps={args.steps}", "train.batch_size=32", "train.log_every=10", "train.val_every=1000",
            "train.ckpt_every=1000", "data.val_size=32", "train.threads=1", "moe.routing=expert_choice"]
    lat = ["model.space=latent", f"model.vae_path={vae_dir}", "model.in_channels=4", "model.input_size=16",
           "model.patch_size=2"]
    variants = {"pixel 32x32x3, patch 4 (scenes)": ["model.patch_size=4"],
                "latent 16x16x4, patch 2 (scenes through the VAE)": lat,
                "latent 16x16x4, patch 2 (prepared cache)": [*lat, "data.source=prepared", f"data.path={cache}"]}
    steps: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, extra in variants.items():
            cfg = resolve_config(preset=args.preset, overrides=[*base, *extra])
            run = root / f"run-{r}-{abs(hash(name))}"
            train(cfg, run)
            ips = [rec["images_per_s"] for rec in read_jsonl(run / "metrics.jsonl") if rec["kind"] == "train"][1:]
            steps[name].append(32 / statistics.median(ips) * 1000)
    print(f"training step, preset {args.preset}, batch 32, 64 tokens per image, 1 thread, "
          f"median of {args.rounds} interleaved rounds (ms/step):")
    for name, v in steps.items():
        print(f"  {name:50s} {statistics.median(v):7.1f}  (rounds: {', '.join(f'{x:.1f}' for x in v)})")


if __name__ == "__main__":
    main()
