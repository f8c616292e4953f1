"""`ecdit bench data`: what the built-in data costs next to a training step.

Times, interleaved, the pieces of the data path a CPU study pays for on every step or every
evaluated image: rendering a batch of scenes, a training batch from the scene source (render +
convert to the model's [-1, 1] float layout), and the exact detector on rendered and on noise
images (noise is the detector's slow case: many small components). These used to be pass/fail
timing tests; timing belongs here, where a reader sees the number and the machine it came from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ecdit_cli.bench.timing import interleaved, load_average, machine_info, summary


def bench_data(batch: int = 32, image_size: int = 32, reps: int = 10, warmup: int = 1,
               on_progress: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    from ecdit_cli.data import detector
    from ecdit_cli.data.scenes import SceneSpec, render_batch
    from ecdit_cli.data.sources import make_source

    spec = SceneSpec(image_size)
    source = make_source("scenes", image_size=image_size, channels=3)
    images = list(render_batch(spec, 0, "val", 0, batch)[0])
    rng = np.random.default_rng(0)
    noise = list(rng.uniform(0, 1, (batch, image_size, image_size, 3)).astype(np.float32))
    start = {"i": 0}

    def render() -> None:
        start["i"] += batch  # fresh indices every call: no cache can help
        render_batch(spec, 0, "train", start["i"], batch)

    def source_batch() -> None:
        start["i"] += batch
        source.batch("train", start["i"], batch)

    def detect(imgs: list) -> Callable[[], None]:
        return lambda: [detector.read_scene(x) for x in imgs]

    fns = {"render": render, "source batch": source_batch, "detector (scenes)": detect(images),
           "detector (noise)": detect(noise)}
    on_progress(f"data: {len(fns)} candidates x {reps} interleaved reps, batch {batch}, {image_size} px")
    load_start = load_average()
    times = interleaved(fns, reps=reps, warmup=warmup)
    rows = []
    for name, secs in times.items():
        s = summary(secs)
        rows.append({"name": name, "batch_ms": 1e3 * s["median"], "iqr_ms": 1e3 * s["iqr"],
                     "per_image_ms": 1e3 * s["median"] / batch, "images_per_s": batch / s["median"]})
    return {"machine": machine_info(torch.device("cpu"), torch.float32) | {"load_avg_1m": load_start},
            "load_avg_end": load_average(), "settings": {"batch": batch, "image_size": image_size, "reps": reps},
            "rows": rows}
