"""`ecdit prepare` and `data.source=prepared`: formats, exact round trips, skips, resuming."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from fixtures_own_data import folder_items, png_bytes, write_manifests, write_shards

from ecdit_cli.data.collection import decode, open_collection
from ecdit_cli.data.prepare import PrepareOptions, prepare
from ecdit_cli.data.prepared import PreparedSource
from ecdit_cli.errors import EcditError

pytest.importorskip("webdataset")


def files_of(cache):
    return {p.name: p.read_bytes() for p in sorted(cache.iterdir()) if p.is_file()}


def test_a_prepared_folder_round_trips_exactly_pixels_captions_and_text_states(scenes_dir, tiny_models, tmp_path):
    from ecdit_cli.model.text import load_text_encoder

    t5 = load_text_encoder(tiny_models["t5"], 16)
    summary = prepare(scenes_dir, tmp_path / "c", PrepareOptions(shard_size=16), text_encoder=t5)
    assert (summary.written, summary.shards, sum(summary.skipped.values())) == (40, 3, 0)
    src = PreparedSource(tmp_path / "c")
    items = folder_items(scenes_dir)
    assert src.keys == [f"{stem}.png" for stem, _, _ in items]
    assert src.captions == [c for _, _, c in items]
    for i, (stem, _, _) in enumerate(items):
        expected, _, _ = decode(next(open_collection(scenes_dir).items(i)), 32, 3, 32)
        assert np.array_equal(src.gather("x", np.array([i]))[0], expected), stem
    states, mask = t5.encode_numpy([c for _, _, c in items])
    assert np.array_equal(src.gather("text", np.arange(40)), states.astype(np.float16))
    assert np.array_equal(src.gather("mask", np.arange(40)), mask)
    # Train and val partition the cache; batches come back in the model's range.
    assert sorted(np.concatenate([src.train_indices, src.val_indices]).tolist()) == list(range(40))
    x, caps = src.batch("train", 0, 8)
    assert x.shape == (8, 3, 32, 32) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
    idx = src.indices("train", 0, 8)
    assert caps == [src.captions[i] for i in idx]


def test_manifests_and_webdataset_shards_give_the_same_images_and_captions_as_the_folder(scenes_dir, tmp_path):
    jsonl, csv_path = write_manifests(scenes_dir, scenes_dir.parent)
    write_shards(scenes_dir, tmp_path / "wds", per_shard=15)
    ref = PreparedSource(prepare(scenes_dir, tmp_path / "folder").cache)
    for source in (jsonl, csv_path, tmp_path / "wds", str(tmp_path / "wds" / "shard-{000..002}.tar")):
        out = tmp_path / f"c{abs(hash(str(source)))}"
        summary = prepare(source, out, PrepareOptions(shard_size=7))
        got = PreparedSource(out)
        assert summary.written == 40 and got.captions == ref.captions, source
        assert np.array_equal(got.gather("x", np.arange(40)), ref.gather("x", np.arange(40))), source


def test_corrupt_small_and_uncaptioned_images_are_skipped_and_counted_never_fatal(scenes_dir, tmp_path):
    import shutil

    src = tmp_path / "mixed"
    shutil.copytree(scenes_dir, src)
    (src / "000001.png").write_bytes(b"not an image at all")
    good = (src / "000002.png").read_bytes()
    (src / "000002.png").write_bytes(good[: len(good) // 2])  # truncated
    (src / "000003.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))  # too small
    (src / "000004.txt").write_text("   \n")  # empty caption
    (src / "000005.txt").unlink()  # no caption at all
    summary = prepare(src, tmp_path / "c", PrepareOptions(shard_size=16))
    assert summary.skipped == {"unreadable": 2, "too small": 1, "empty caption": 2}
    assert summary.written == 35
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["totals"]["skipped"] == summary.skipped and manifest["complete"]
    # --min-size 0 keeps the small one (upscaled).
    kept = prepare(src, tmp_path / "c0", PrepareOptions(shard_size=16, min_size=0))
    assert kept.skipped["too small"] == 0 and kept.written == 36


def test_an_interrupted_prepare_resumes_to_the_same_files_as_an_uninterrupted_one(scenes_dir, tiny_models, tmp_path):
    from ecdit_cli.model.vae import load_vae

    vae = load_vae(tiny_models["vae"])
    opts = PrepareOptions(shard_size=8, batch_size=4)
    prepare(scenes_dir, tmp_path / "ref", opts, image_encoder=vae)

    class Stop(Exception):
        pass

    def stop_after_two(k, n):
        if k == 1:
            raise Stop

    with pytest.raises(Stop):
        prepare(scenes_dir, tmp_path / "cut", opts, image_encoder=vae, on_shard=stop_after_two)
    with pytest.raises(EcditError, match="incomplete"):
        PreparedSource(tmp_path / "cut")
    summary = prepare(scenes_dir, tmp_path / "cut", opts, image_encoder=vae)
    assert summary.resumed_shards == 2 and summary.written == 40
    assert files_of(tmp_path / "cut") == files_of(tmp_path / "ref")


def test_a_prepare_killed_mid_shard_resumes_to_the_same_files(scenes_dir, tmp_path):
    opts = "PrepareOptions(shard_size=8, batch_size=2)"
    prepare(scenes_dir, tmp_path / "ref", PrepareOptions(shard_size=8, batch_size=2))
    code = (
        "import os, signal\n"
        "from ecdit_cli.data.prepare import PrepareOptions, prepare\n"
        "def kill(done, total):\n"
        "    if done >= 21:\n"  # inside the third shard (items 16..23)
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"prepare({str(scenes_dir)!r}, {str(tmp_path / 'cut')!r}, {opts}, on_progress=kill)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (tmp_path / "cut").glob("*.json")) == [
        "manifest.json", "shard-000000.json", "shard-000001.json"]
    summary = prepare(scenes_dir, tmp_path / "cut", PrepareOptions(shard_size=8, batch_size=2))
    assert summary.resumed_shards == 2
    assert files_of(tmp_path / "cut") == files_of(tmp_path / "ref")


def test_a_rerun_with_other_settings_is_refused_and_names_the_difference(scenes_dir, tmp_path):
    prepare(scenes_dir, tmp_path / "c", PrepareOptions(shard_size=16))
    before = files_of(tmp_path / "c")
    with pytest.raises(EcditError, match="image_size 32 -> 16"):
        prepare(scenes_dir, tmp_path / "c", PrepareOptions(shard_size=16, image_size=16))
    assert files_of(tmp_path / "c") == before
    again = prepare(scenes_dir, tmp_path / "c", PrepareOptions(shard_size=16))  # same settings: nothing to do
    assert again.resumed_shards == 3 and files_of(tmp_path / "c") == before


@pytest.mark.parametrize("name,message", [
    ("notes.yaml", "is a '.yaml' file; give a folder of images with same-named .txt captions"),
    ("empty", "holds no images"),
    ("missing", "not found"),
])
def test_an_unknown_source_format_names_what_is_accepted(name, message, tmp_path):
    (tmp_path / "notes.yaml").write_text("a: 1\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EcditError, match=message):
        prepare(tmp_path / name, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_latent_cache_holds_the_vae_latents_to_float16(scenes_dir, tiny_models, tmp_path):
    from ecdit_cli.model.vae import load_vae

    vae = load_vae(tiny_models["vae"])
    prepare(scenes_dir, tmp_path / "c", PrepareOptions(shard_size=16), image_encoder=vae)
    src = PreparedSource(tmp_path / "c")
    assert (src.space, src.channels, src.image_size) == ("latent", 4, 16)
    pixels = PreparedSource(prepare(scenes_dir, tmp_path / "p", PrepareOptions(shard_size=16)).cache)
    x, _ = pixels.batch("val", 0, 2)
    z, _ = src.batch("val", 0, 2)
    expected = vae.encode(torch.from_numpy(x)).numpy()
    # float16 storage: within half an ulp of fp16 (plus float32 noise: the cache encoded a batch of 16)
    assert np.allclose(z, expected, rtol=2**-10, atol=1e-4)
    assert not np.allclose(z, expected[::-1], rtol=2**-10, atol=1e-4)
