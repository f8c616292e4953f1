"""Latent diffusion (model.space=latent) and pretrained text encoders (text.encoder=hf), end to end."""

import json
import re

import numpy as np
import pytest
import torch
from fixtures_own_data import write_shards

from ecdit_cli import rundir
from ecdit_cli.config import resolve_config
from ecdit_cli.errors import EcditError
from ecdit_cli.files import read_jsonl
from ecdit_cli.train.loop import Callbacks, train

BASE = ["train.batch_size=8", "data.val_size=8", "train.warmup_steps=2", "train.log_every=2", "train.val_every=4",
        "train.ckpt_every=4", "train.val_timesteps=2", "moe.routing=expert_choice", "moe.num_experts=4"]


def latent(models, *extra):
    """The debug preset in the tiny VAE's latent space (16x16x4 latents of 32-px images, patch 2:
    64 tokens, as many as the pixel debug run) with the tiny T5 encoder."""
    return ["model.space=latent", f"model.vae_path={models['vae']}", "model.in_channels=4", "model.input_size=16",
            "model.patch_size=2", "text.encoder=hf", f"text.hf_path={models['t5']}", "text.width=32", *extra]


def cli(*args):
    from ecdit_cli.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        assert not e.code, f"{args} exited {e.code}"


def metrics(run_dir):
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "wall_time_s")}
            for r in read_jsonl(run_dir / rundir.METRICS)]


@pytest.mark.parametrize("form", ["folder", "webdataset"])
def test_prepare_train_sample_eval_end_to_end_with_a_tiny_vae_and_t5(form, scenes_dir, tiny_models, tmp_path):
    source = scenes_dir if form == "folder" else str(write_shards(scenes_dir, tmp_path / "wds", 16)[0].parent
                                                          / "shard-{000..002}.tar")
    cache, run = tmp_path / "cache", tmp_path / "run"
    cli("prepare", source, "-o", cache, "--vae", tiny_models["vae"], "--text-encoder", tiny_models["t5"],
        "--shard-size", 16, "--device", "cpu")
    sets = [x for kv in latent(tiny_models, "data.source=prepared", f"data.path={cache}", "train.steps=4", *BASE)
            for x in ("--set", kv)]
    cli("train", "debug", *sets, "-o", run, "--quiet")
    summary = json.loads((run / rundir.SUMMARY).read_text())
    assert summary["status"] == "done" and summary["params_text"] == 0
    cli("sample", run, "-p", "a red circle", "-n", 2, "--steps", 3, "--device", "cpu")
    images = np.load(run / "samples" / "seed0.npz")["images"]
    assert images.shape == (1, 2, 32, 32, 3)  # decoded by the VAE: 32-px RGB from 16x16x4 latents
    cli("eval", run, "-n", 1, "--per-tag", 1, "--steps", 2, "--no-fd", "--device", "cpu")
    doc = json.loads((run / rundir.EVAL).read_text())
    assert doc["num_images"] == 6 and 0 <= doc["overall"] <= 1


@pytest.mark.parametrize("where", ["scenes", "prepared"])
def test_a_latent_run_stopped_after_a_checkpoint_resumes_to_the_metrics_of_an_uninterrupted_run(
        where, scenes_dir, tiny_models, tmp_path):
    extra = ["train.steps=10"]
    if where == "prepared":
        from ecdit_cli.data.prepare import PrepareOptions, prepare
        from ecdit_cli.model.text import load_text_encoder
        from ecdit_cli.model.vae import load_vae

        prepare(scenes_dir, tmp_path / "cache", PrepareOptions(shard_size=16), load_vae(tiny_models["vae"]),
                load_text_encoder(tiny_models["t5"], 16))
        extra += ["data.source=prepared", f"data.path={tmp_path / 'cache'}"]
    cfg = resolve_config(preset="debug", overrides=latent(tiny_models, *BASE, *extra))
    train(cfg, tmp_path / "ref")

    class Crash(Exception):
        pass

    def crash(step, info):
        if step == 6:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, tmp_path / "cut", Callbacks(on_step=crash))
    assert max(r["step"] for r in read_jsonl(tmp_path / "cut" / rundir.METRICS)) == 4
    assert train(cfg, tmp_path / "cut")["status"] == "done"
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "ref")


def test_a_cache_that_does_not_fit_the_run_names_every_difference_in_one_line(scenes_dir, tiny_models, tmp_path):
    from ecdit_cli.data.prepare import PrepareOptions, prepare
    from ecdit_cli.model.inputs import training_source
    from ecdit_cli.model.vae import load_vae

    prepare(scenes_dir, tmp_path / "lat", PrepareOptions(shard_size=16), load_vae(tiny_models["vae"]))
    cfg = resolve_config(preset="debug", overrides=latent(tiny_models, "data.source=prepared",
                                                          f"data.path={tmp_path / 'lat'}"))
    assert training_source(cfg).space == "latent"
    cfg.model.input_size = 8
    with pytest.raises(EcditError) as err:
        training_source(cfg)
    assert "latent side 16 (32-px images) vs model.input_size=8" in str(err.value) and "\n" not in str(err.value)
    pixel = resolve_config(preset="debug", overrides=["data.source=prepared", f"data.path={tmp_path / 'lat'}"])
    with pytest.raises(EcditError, match="space latent in the cache vs model.space=pixel"):
        training_source(pixel)
    other_vae = tmp_path / "vae2"
    from fixtures_own_data import tiny_pretrained

    tiny_pretrained.tiny_vae(other_vae, seed=1)
    cfg2 = resolve_config(preset="debug", overrides=latent({**tiny_models, "vae": other_vae}, "data.source=prepared",
                                                           f"data.path={tmp_path / 'lat'}"))
    with pytest.raises(EcditError, match="the VAE in model.vae_path is not the cache's"):
        training_source(cfg2)


def test_latents_follow_the_vae_config_scaling_and_shift_and_decode_back(tiny_models):
    from diffusers import AutoencoderKL

    from ecdit_cli.model.vae import load_vae

    vae = load_vae(tiny_models["vae"])
    raw = AutoencoderKL.from_pretrained(tiny_models["vae"])
    assert (vae.scaling_factor, vae.shift_factor, vae.downsample, vae.latent_channels) == (0.5, 0.1, 2, 4)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean = raw.encode(x).latent_dist.mean
        z = vae.encode(x)
        assert torch.allclose(z, (mean - 0.1) * 0.5)
        assert torch.allclose(vae.decode(z), raw.decode(mean).sample, atol=1e-5)  # z * (1/0.5) + 0.1 rounds


def test_a_latent_runs_flops_count_latent_tokens_and_channels(tiny_models):
    from ecdit_cli.model.accounting import count

    pix = resolve_config(preset="debug", overrides=["model.patch_size=4"])
    lat = resolve_config(preset="debug", overrides=latent(tiny_models, "text.encoder=learned", "text.width=32"))
    pix.text.width = 32
    a, b = count(pix), count(lat)
    assert a.tokens_per_image == b.tokens_per_image == 64  # 32/4 pixel patches vs 16/2 latent patches
    D, T = 32, 64
    # Only the patch embedding and the final projection see the input: 4*4*3 = 48 vs 2*2*4 = 16 values per token.
    assert a.breakdown_flops["embedders"] - b.breakdown_flops["embedders"] == 2 * T * (48 - 16) * D
    assert a.breakdown_flops["final_layer"] - b.breakdown_flops["final_layer"] == 2 * T * D * (48 - 16)
    same = ("self_attention", "cross_attention", "adaln", "ffn_dense", "experts", "routers")
    assert all(a.breakdown_flops[k] == b.breakdown_flops[k] for k in same)


@pytest.mark.parametrize("name", ["t5", "clip"])
def test_a_frozen_encoder_gives_per_token_states_its_own_and_cached(name, tiny_models):
    from transformers import AutoTokenizer

    from ecdit_cli.model.text import FrozenTextEncoder

    enc = FrozenTextEncoder(tiny_models[name], max_len=16)
    assert enc.width == 32 and enc.identity()["class"] == {"t5": "T5EncoderModel", "clip": "CLIPTextModel"}[name]
    states, mask = enc.encode_captions(["a red circle", "two blue squares left of a green triangle"])
    assert states.shape == (2, 16, 32) and mask.sum(1).tolist() == [3, 8]
    tok = AutoTokenizer.from_pretrained(tiny_models[name])
    ids = tok(["a red circle"], return_tensors="pt")
    with torch.no_grad():
        direct = enc.model(**ids).last_hidden_state[0]
    assert torch.allclose(states[0, :3], direct[:3], atol=1e-6)
    # Colour-swapped captions get different per-token states (a pooled vector would blur them).
    swapped, _ = enc.encode_captions(["a blue circle"])
    assert not torch.allclose(swapped[0, 1], states[0, 1])
    again, _ = enc.encode_captions(["a red circle"])
    assert torch.equal(again[0], states[0]) and len(enc._cache) == 3


def test_minilm_is_the_same_frozen_encoder_path_on_its_own_folder(tiny_models, tmp_path):
    from ecdit_cli.model.t2i import TextToImage
    from ecdit_cli.model.text import FrozenTextEncoder

    # text.minilm_path points at any folder holding model.safetensors (the installed package's, by default).
    cfg = resolve_config(preset="debug", overrides=["text.encoder=minilm", f"text.minilm_path={tiny_models['clip']}",
                                                    "text.width=32"])
    model = TextToImage(cfg, ["a"])
    assert isinstance(model.frozen_text, FrozenTextEncoder) and model.text_encoder is None
    bad = resolve_config(preset="debug", overrides=["text.encoder=hf", f"text.hf_path={tiny_models['t5']}",
                                                    "text.width=64"])
    with pytest.raises(EcditError, match=r"text.width=64 must equal the hidden size .* \(32\): --set text.width=32"):
        TextToImage(bad, ["a"])


@pytest.mark.parametrize("module,call,extra", [
    ("diffusers", lambda m: __import__("ecdit_cli.model.vae", fromlist=["VAE"]).VAE(m["vae"]), ".[latent]"),
    ("transformers", lambda m: __import__("ecdit_cli.model.text", fromlist=["x"]).FrozenTextEncoder(m["t5"], 16),
     ".[hf]"),
    ("webdataset", lambda m: __import__("ecdit_cli.data.collection", fromlist=["x"]).open_collection("x-{0..1}.tar"),
     ".[data]"),
])
def test_a_missing_optional_library_is_one_line_naming_the_extra_to_install(module, call, extra, tiny_models,
                                                                          monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, module, None)  # import now fails, as when not installed
    with pytest.raises(EcditError, match=re.escape(f"pip install -e '{extra}'")):
        call(tiny_models)


def test_the_default_path_trains_and_samples_without_importing_any_optional_library(tmp_path):
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from ecdit_cli.config import resolve_config\n"
        "from ecdit_cli.evaluate.sample import sample_run\n"
        "from ecdit_cli.train.loop import train\n"
        f"train(resolve_config(preset='debug', overrides={BASE + ['train.steps=2']!r}), {str(tmp_path / 'r')!r})\n"
        f"sample_run({str(tmp_path / 'r')!r}, ['a red circle'], n=1, steps=2)\n"
        "print(sorted(m for m in ('diffusers', 'transformers', 'webdataset', 'tokenizers') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
