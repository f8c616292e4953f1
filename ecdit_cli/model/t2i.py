"""The trained unit: text encoder + DiT, with the tokenizer that belongs to them.

`TextToImage` is what DeepSpeed wraps and what `final/model.pt` holds. The learned text
encoder is a submodule (trained with the DiT); the frozen MiniLM encoder is kept outside the
module tree so that DeepSpeed neither optimises nor checkpoints its weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ecdit_cli.config import RunConfig
from ecdit_cli.model.dit import DiT, DiTOutput
from ecdit_cli.model.text import FrozenMiniLM, LearnedTextEncoder, WordTokenizer


class TextToImage(nn.Module):
    def __init__(self, cfg: RunConfig, vocabulary: list[str], ep_rank: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = WordTokenizer(vocabulary, cfg.text.max_len)
        self.text_encoder: LearnedTextEncoder | None = None
        self._frozen: list[FrozenMiniLM] = []  # a list hides it from nn.Module registration
        if cfg.text.encoder == "learned":
            self.text_encoder = LearnedTextEncoder(len(self.tokenizer.vocab), cfg.text)
        else:
            self._frozen.append(FrozenMiniLM(cfg.text))
        self.dit = DiT(cfg, ep_rank=ep_rank)

    def tokenize(self, captions: list[str], strict: bool = False) -> tuple[Tensor, Tensor]:
        """Captions -> (text input, mask): token ids (B, L) for the learned encoder, frozen
        states (B, L, W) for MiniLM. `strict` rejects words outside the vocabulary."""
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
