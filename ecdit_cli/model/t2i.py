"""The trained unit: text encoder + DiT, with the tokenizer (and VAE) that belong to them.

`TextToImage` is what DeepSpeed wraps and what `final/model.pt` holds. The learned text
encoder is a submodule (trained with the DiT); a frozen pretrained encoder (`text.encoder=hf`
or `minilm`) and a latent-space run's VAE are kept outside the module tree, so that DeepSpeed
neither optimises nor checkpoints their weights: a run names their folders in its config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ecdit_cli.config import RunConfig
from ecdit_cli.errors import EcditError
from ecdit_cli.model.dit import DiT, DiTOutput
from ecdit_cli.model.text import FrozenTextEncoder, LearnedTextEncoder, WordTokenizer


class TextToImage(nn.Module):
    def __init__(self, cfg: RunConfig, vocabulary: list[str], ep_rank: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = WordTokenizer(vocabulary, cfg.text.max_len)
        self.text_encoder: LearnedTextEncoder | None = None
        # Lists hide frozen parts from nn.Module registration (no optimizer state, no checkpoint).
        self._frozen: list[FrozenTextEncoder] = []
        self._vae: list[Any] = []
        if cfg.text.encoder == "learned":
            self.text_encoder = LearnedTextEncoder(len(self.tokenizer.vocab), cfg.text)
        else:
            self._frozen.append(frozen_text_encoder(cfg))
        if cfg.model.space == "latent":
            self._vae.append(latent_vae(cfg))
        self.dit = DiT(cfg, ep_rank=ep_rank)

    @property
    def frozen_text(self) -> FrozenTextEncoder | None:
        return self._frozen[0] if self._frozen else None

    @property
    def vae(self):
        return self._vae[0] if self._vae else None

    def frozen_to(self, device) -> TextToImage:
        """Put the frozen text encoder and VAE on `device` (the module's own `.to` cannot see them)."""
        from ecdit_cli.model.text import frozen_encoder_dir, load_text_encoder
        from ecdit_cli.model.vae import load_vae

        device = str(device)
        if self._frozen:
            self._frozen[0] = load_text_encoder(frozen_encoder_dir(self.cfg.text), self.cfg.text.max_len, device)
        if self._vae:
            self._vae[0] = load_vae(self.cfg.model.vae_path, device)
        return self

    def image_shape(self) -> tuple[int, int]:
        """(channels, side) of the images this model draws: the DiT's input, or its decoded latents."""
        m = self.cfg.model
        if self.vae is None:
            return m.in_channels, m.input_size
        return self.vae.image_channels, m.input_size * self.vae.downsample

    def to_pixels(self, x0: Tensor) -> Tensor:
        """The DiT's output space -> images (N, C, H, W) in about [-1, 1] (decoded in latent space)."""
        return x0 if self.vae is None else self.vae.decode(x0).to(x0.device)

    def tokenize(self, captions: list[str], strict: bool = False) -> tuple[Tensor, Tensor]:
        """Captions -> (text input, mask): token ids (B, L) for the learned encoder, frozen
        states (B, L, W) for a pretrained one. `strict` rejects words outside the vocabulary."""
        if self.text_encoder is not None:
            return self.tokenizer.encode(captions, strict=strict)
        return self._frozen[0].encode_captions(captions)

    def forward(self, x_t: Tensor, t: Tensor, text: Tensor, mask: Tensor, drop: Tensor | None = None) -> DiTOutput:
        """x_t (B, C, H, W), t (B,), text ids (B, L) or states (B, L, W), mask (B, L), drop (B,) bool."""
        if text.dtype == torch.long:
            assert self.text_encoder is not None
            states = self.text_encoder(text, mask)
        else:
            states = text
        return self.dit(x_t, t, states, mask, drop)

    def export(self) -> dict[str, Any]:
        """Plain-typed metadata stored next to the weights in final/model.pt."""
        return {"config": self.cfg.to_dict(), "vocabulary": self.tokenizer.vocab[2:]}


def frozen_text_encoder(cfg: RunConfig) -> FrozenTextEncoder:
    """The run's frozen text encoder, its width checked against text.width."""
    from ecdit_cli.model.text import frozen_encoder_dir, load_text_encoder

    folder = frozen_encoder_dir(cfg.text)
    enc = load_text_encoder(folder, cfg.text.max_len)
    if enc.width != cfg.text.width:
        raise EcditError(f"text.width={cfg.text.width} must equal the hidden size of the text encoder in {folder} "
                         f"({enc.width}): --set text.width={enc.width}")
    return enc


def latent_vae(cfg: RunConfig):
    """The run's VAE, its latent channels checked against model.in_channels."""
    from ecdit_cli.model.vae import load_vae

    vae = load_vae(cfg.model.vae_path)
    if vae.latent_channels != cfg.model.in_channels:
        raise EcditError(f"model.in_channels={cfg.model.in_channels} must equal the latent channels of the VAE in "
                         f"{cfg.model.vae_path} ({vae.latent_channels}) with model.space=latent: "
                         f"--set model.in_channels={vae.latent_channels}")
    return vae
