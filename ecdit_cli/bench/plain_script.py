"""A plain PyTorch training script, the whole-process reference of `ecdit bench train`.

What a reader would write to train a DiT of a preset's shape from scratch in one file: render
the built-in scenes for each batch, a rectified-flow loss on `plain_dit.PlainDiT` (fixed random
text states instead of a text encoder), AdamW with gradient clipping, the loss printed every
`log_every` steps, the weights saved at the end. No DeepSpeed, no validation, no EMA, no
checkpoints, no run directory. `ecdit bench train` times this process from its start to its exit
next to a whole `ecdit train` process of the same preset, steps and batch, so the ratio is what
everything ecdit adds costs a user who trains one run (issue target: <= 1.25x).

    python -m ecdit_cli.bench.plain_script PRESET STEPS BATCH OUT_FILE [key=value ...]
"""

from __future__ import annotations

import sys
import time


def main(argv: list[str]) -> None:
    import torch

    from ecdit_cli.bench.plain_dit import PlainDiT
    from ecdit_cli.config import resolve_config
    from ecdit_cli.data.sources import make_source

    preset, steps, batch, out_file, *overrides = argv
    steps, batch = int(steps), int(batch)
    cfg = resolve_config(preset=preset, overrides=["moe.routing=dense", *overrides])
    t, d = cfg.train, cfg.data
    torch.manual_seed(t.seed)
    source = make_source(d.source, image_size=cfg.model.input_size, channels=cfg.model.in_channels,
                         min_objects=d.min_objects, max_objects=d.max_objects, seed=d.seed)
    model = PlainDiT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    text = torch.randn(batch, cfg.text.max_len, cfg.text.width)
    gen = torch.Generator().manual_seed(t.seed)
    for step in range(steps):
        images, _ = source.batch("train", step * batch, batch)
        x0 = torch.from_numpy(images)
        time_ = torch.sigmoid(torch.randn(batch, generator=gen))  # logit-normal timesteps
        noise = torch.randn(x0.shape, generator=gen)
        tb = time_.view(-1, 1, 1, 1)
        x_t = (1 - tb) * x0 + tb * noise
        loss = (model(x_t, time_, text) - (noise - x0)).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % t.log_every == 0:
            print(f"step {step + 1} loss {loss.item():.4f} {time.perf_counter():.3f}", flush=True)
    torch.save(model.state_dict(), out_file)


if __name__ == "__main__":
    main(sys.argv[1:])
