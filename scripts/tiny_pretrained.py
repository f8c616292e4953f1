"""Write tiny, randomly initialised stand-ins for pretrained weights, built from configs offline.

    python scripts/tiny_pretrained.py OUT_DIR

OUT_DIR/vae   a diffusers AutoencoderKL (2 levels: 2x downsampling, 4 latent channels, scaling 0.5, shift 0.1)
OUT_DIR/t5    a transformers T5EncoderModel (width 32) with a word-level tokenizer over the scenes' words
OUT_DIR/clip  a transformers CLIPTextModel (width 32) with the same tokenizer

They exercise the same loading, caching and training code as real local weights (an SD / SD3 VAE,
a T5-XXL encoder); nothing is downloaded. The tests build theirs with these functions.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def word_tokenizer(words: list[str]):
    """A transformers fast tokenizer over a fixed word list (tokenizers' WordLevel model): no
    training data, no download, the same ids every time."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def scene_words() -> list[str]:
    from ecdit_cli.data.scenes import vocabulary

    return vocabulary()


def tiny_vae(out: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.5, shift_factor=0.1)
    vae.save_pretrained(out)
    return out


def tiny_t5(out: Path, words: list[str] | None = None, seed: int = 0) -> Path:
    import torch
    from transformers import T5Config, T5EncoderModel

    tokenizer = word_tokenizer(words or scene_words())
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_clip(out: Path, words: list[str] | None = None, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = word_tokenizer(words or scene_words())
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                         eos_token_id=1)
    CLIPTextModel(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write vae/, t5/ and clip/ into")
    args = parser.parse_args()
    for name, build in (("vae", tiny_vae), ("t5", tiny_t5), ("clip", tiny_clip)):
        print(build(args.out / name))


if __name__ == "__main__":
    main()
