"""Write rendered scenes as a folder of images with same-named .txt captions (`ecdit prepare`'s input).

    python scripts/scenes_folder.py OUT_DIR [-n 512] [--size 32] [--seed 0]

OUT_DIR/000000.png + OUT_DIR/000000.txt, ...: the first n images of the scenes' training stream,
so a run on the prepared folder can still be scored by `ecdit eval` (GenEval's detector reads
these scenes). Stands in for your own photos and captions.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def write_scenes(out: Path, n: int, size: int = 32, seed: int = 0) -> list[str]:
    """Write n scenes; returns their captions."""
    import numpy as np
    from PIL import Image

    from ecdit_cli.data.scenes import SceneSpec, render_batch

    out.mkdir(parents=True, exist_ok=True)
    images, captions, _, _ = render_batch(SceneSpec(size), seed, "train", 0, n)
    for i, (image, caption) in enumerate(zip(images, captions)):
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(out / f"{i:06d}.png")
        (out / f"{i:06d}.txt").write_text(caption + "\n")
    return captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("-n", type=int, default=512, help="images to write")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_scenes(args.out, args.n, args.size, args.seed)
    print(f"wrote {args.n} images with captions to {args.out}")


if __name__ == "__main__":
    main()
