"""What the DiT is fed in training: pixels or latents from the configured source, and where
the text states come from (the model's encoder, or a prepared cache's stored states).

`training_source(cfg)` builds the source for a run:
- `data.source=prepared`: the cache, after checking that its space, image (or latent) size,
  VAE and text encoder are the run's; a mismatch is one line naming every difference;
- `model.space=latent` with any other source: that source rendered or read at the VAE's input
  size, encoded on the fly (`vae.LatentSource`);
- otherwise the pixel source itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ecdit_cli.config import RunConfig
from ecdit_cli.data.sources import make_source
from ecdit_cli.errors import EcditError


def cache_requirements(cfg: RunConfig) -> dict[str, Any]:
    """What a prepared cache must hold for this run (see prepared.cache_mismatches)."""
    from ecdit_cli.files import fingerprint

    m, want = cfg.model, {"space": cfg.model.space}
    if m.space == "pixel":
        want.update(image_size=m.input_size, channels=m.in_channels)
    else:
        want.update(latent_shape=(m.in_channels, m.input_size, m.input_size), vae_fingerprint=fingerprint(m.vae_path))
    if cfg.text.encoder != "learned":
        from ecdit_cli.model.text import frozen_encoder_dir

        want.update(text_fingerprint=fingerprint(frozen_encoder_dir(cfg.text)), max_len=cfg.text.max_len)
    return want


def training_source(cfg: RunConfig, device: str = "cpu"):
    """The run's data source (module docstring); raises one line when a cache does not fit the run.
    `device` runs the VAE that encodes on the fly (the training device)."""
    d, m = cfg.data, cfg.model
    if d.source == "prepared":
        from ecdit_cli.data.prepared import PreparedSource, cache_mismatches

        source = PreparedSource(d.path, seed=d.seed)
        diff = cache_mismatches(source.manifest, cache_requirements(cfg))
        if diff:
            raise EcditError(f"prepared cache {d.path} does not fit this run: {'; '.join(diff)}")
        # Stored states stand in for the encoder only when they are the run's own encoder's.
        source.use_text_states = source.has_text and cfg.text.encoder != "learned"
        return source
    if m.space == "latent":
        from ecdit_cli.model.t2i import latent_vae
        from ecdit_cli.model.vae import LatentSource, load_vae

        vae = load_vae(latent_vae(cfg).path, str(device))
        pixels = make_source(d.source, image_size=m.input_size * vae.downsample, channels=vae.image_channels,
                             path=d.path, min_objects=d.min_objects, max_objects=d.max_objects, seed=d.seed)
        return LatentSource(pixels, vae)
    return make_source(d.source, image_size=m.input_size, channels=m.in_channels, path=d.path,
                       min_objects=d.min_objects, max_objects=d.max_objects, seed=d.seed)


def text_inputs(source, model, split: str, start: int, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(text input, mask) for samples start.. of a split: the cache's stored states when the
    source serves them, else the model's own tokenizer / encoder."""
    if getattr(source, "use_text_states", False):
        states, mask = source.text_states(split, start, len(captions))
        return torch.from_numpy(np.ascontiguousarray(states)), torch.from_numpy(mask)
    return model.tokenize(captions)
