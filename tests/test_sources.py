"""Data sources: scenes, Fashion-MNIST from (synthetic) idx files, and an image folder."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ecdit_cli.data import sources
from ecdit_cli.data.sources import FASHION_MNIST_CAPTIONS, make_source
from ecdit_cli.errors import EcditError


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(folder: Path, gz: bool, n_train: int = 30, n_test: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10,
    }
    for name, arr in arrays.items():
        data = _idx_bytes(arr)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def _write_folder(folder: Path, n: int = 6, size: tuple[int, int] = (40, 30)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    captions = [f"a picture number {i}" for i in range(n)]
    lines = []
    for i, caption in enumerate(captions):
        arr = np.full((size[1], size[0], 3), i * 40, dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")
        lines.append(json.dumps({"path": f"img{i}.png", "caption": caption}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return captions


# --- scenes ----------------------------------------------------------------------------------


def test_scene_source_gives_chw_images_in_model_range():
    src = make_source("scenes", image_size=32, channels=3, min_objects=1, max_objects=3, seed=0)
    images, captions = src.batch("train", 0, 8)
    assert images.shape == (8, 3, 32, 32) and images.dtype == np.float32 and len(captions) == 8
    assert images.min() == -1.0 and images.max() <= 1.0
    masks = src.object_masks("train", 0, 8)
    assert masks.shape == (8, 32, 32) and masks.dtype == bool
    np.testing.assert_array_equal(masks, images.max(axis=1) > -1)
    val_a, val_caps = src.val_set(4)
    val_b, _ = src.val_set(4)
    np.testing.assert_array_equal(val_a, val_b)
    assert "triangle" in src.vocabulary()


def test_scenes_refuse_a_channel_count_other_than_three():
    with pytest.raises(EcditError, match="in_channels must be 3"):
        make_source("scenes", image_size=32, channels=1)


def test_unknown_source_suggests_the_closest_kind():
    with pytest.raises(EcditError, match="did you mean 'fashion_mnist'"):
        make_source("fashion-mnist")


# --- Fashion-MNIST ---------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_gzipped_and_plain_idx_files(tmp_path, gz):
    arrays = _write_fashion(tmp_path, gz)
    src = make_source("fashion_mnist", image_size=28, channels=1, path=tmp_path, seed=0)
    images, captions = src.batch("train", 0, 30)
    assert images.shape == (30, 1, 28, 28) and images.dtype == np.float32
    # one epoch is a permutation of the training set: every image exactly once
    got = np.sort(np.round((images[:, 0] + 1) * 127.5).astype(np.int64).reshape(30, -1), axis=0)
    want = np.sort(arrays["train-images-idx3-ubyte"].reshape(30, -1), axis=0)
    np.testing.assert_array_equal(got, want)
    assert sorted(captions) == sorted(FASHION_MNIST_CAPTIONS[k] for k in arrays["train-labels-idx1-ubyte"])


def test_fashion_mnist_resizes_and_replicates_grey_to_rgb(tmp_path):
    _write_fashion(tmp_path, gz=True)
    src = make_source("fashion_mnist", image_size=32, channels=3, path=tmp_path)
    images, _ = src.batch("train", 0, 4)
    assert images.shape == (4, 3, 32, 32) and -1 <= images.min() and images.max() <= 1
    np.testing.assert_array_equal(images[:, 0], images[:, 2])
    small, _ = make_source("fashion_mnist", image_size=16, channels=1, path=tmp_path).batch("train", 0, 4)
    assert small.shape == (4, 1, 16, 16)


def test_fashion_mnist_stream_is_deterministic_and_reshuffles_each_epoch(tmp_path):
    _write_fashion(tmp_path, gz=True)
    src = make_source("fashion_mnist", image_size=28, channels=1, path=tmp_path, seed=3)
    a, caps_a = src.batch("train", 5, 10)
    b, caps_b = make_source("fashion_mnist", image_size=28, channels=1, path=tmp_path, seed=3).batch("train", 5, 10)
    np.testing.assert_array_equal(a, b)
    assert caps_a == caps_b
    epoch0, _ = src.batch("train", 0, 30)
    epoch1, _ = src.batch("train", 30, 30)
    assert not np.array_equal(epoch0, epoch1)
    np.testing.assert_array_equal(np.sort(epoch0.reshape(30, -1), 0), np.sort(epoch1.reshape(30, -1), 0))


def test_fashion_mnist_validation_comes_from_the_test_file(tmp_path):
    arrays = _write_fashion(tmp_path, gz=False)
    src = make_source("fashion_mnist", image_size=28, channels=1, path=tmp_path)
    val, val_caps = src.val_set(5)
    evl, _ = src.batch("eval", 0, 5)
    test = arrays["t10k-images-idx3-ubyte"].reshape(10, -1)
    val_rows = np.round((val[:, 0] + 1) * 127.5).astype(np.int64).reshape(5, -1)
    eval_rows = np.round((evl[:, 0] + 1) * 127.5).astype(np.int64).reshape(5, -1)
    for row in (*val_rows, *eval_rows):
        assert (test == row).all(axis=1).any()
    assert not any((val_rows == row).all(axis=1).any() for row in eval_rows)  # halves are disjoint
    assert src.vocabulary() == sorted({w for c in FASHION_MNIST_CAPTIONS for w in sources.caption_words(c)})
    assert "t-shirt" in src.vocabulary()


def test_missing_fashion_mnist_files_say_how_to_install_them(tmp_path):
    with pytest.raises(EcditError, match=r"apt-get install -y dataset-fashion-mnist.*data\.path"):
        make_source("fashion_mnist", image_size=28, channels=1, path=tmp_path)


def test_a_corrupt_idx_file_is_named(tmp_path):
    _write_fashion(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01garbage")
    with pytest.raises(EcditError, match="t10k-labels-idx1-ubyte is not an unsigned-byte idx file"):
        make_source("fashion_mnist", image_size=28, channels=1, path=tmp_path)


# --- image folder ----------------------------------------------------------------------------


def test_folder_source_loads_crops_and_captions_images(tmp_path):
    captions = _write_folder(tmp_path)
    src = make_source("folder", image_size=16, channels=3, path=tmp_path, seed=0)
    images, caps = src.batch("train", 0, 5)
    assert images.shape == (5, 3, 16, 16) and images.dtype == np.float32
    assert -1 <= images.min() and images.max() <= 1
    # each image is one flat grey level i * 40 and its caption names i
    for img, cap in zip(images, caps, strict=True):
        i = int(cap.split()[-1])
        np.testing.assert_allclose(img, i * 40 / 127.5 - 1, atol=1e-5)
    val, val_caps = src.val_set(3)
    assert set(val_caps).isdisjoint(src.batch("train", 0, 50)[1])
    assert set(val_caps) | set(src.batch("train", 0, 50)[1]) == set(captions)
    grey, _ = make_source("folder", image_size=8, channels=1, path=tmp_path).batch("val", 0, 2)
    assert grey.shape == (2, 1, 8, 8)
    assert src.vocabulary() == sorted({"a", "picture", "number", *map(str, range(6))})


def test_folder_source_with_one_image_trains_and_validates_on_it(tmp_path):
    _write_folder(tmp_path, n=1)
    src = make_source("folder", image_size=8, channels=3, path=tmp_path)
    assert src.batch("train", 0, 2)[1] == src.val_set(2)[1] == ["a picture number 0"] * 2


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "captions.jsonl not found"),
        (lambda p: (p.mkdir(), (p / "captions.jsonl").write_text("\n\n")), "lists no images"),
        (lambda p: (_write_folder(p), (p / "captions.jsonl").write_text(
            (p / "captions.jsonl").read_text() + "{oops\n")), r"captions.jsonl:7: not valid JSON"),
        (lambda p: (_write_folder(p), (p / "captions.jsonl").write_text(
            '{"path": "img0.png"}\n')), r"captions.jsonl:1: expected"),
        (lambda p: (_write_folder(p), (p / "img3.png").unlink()), r"captions.jsonl:4: image .*img3.png not found"),
    ],
    ids=["missing-folder", "missing-captions", "empty", "malformed-line", "missing-caption-key", "missing-image"],
)
def test_folder_source_errors_name_the_problem(tmp_path, setup, message):
    folder = tmp_path / "imgs"
    setup(folder)
    with pytest.raises(EcditError, match=message):
        make_source("folder", image_size=16, channels=3, path=folder)


def test_folder_source_needs_a_path():
    with pytest.raises(EcditError, match="needs data.path"):
        make_source("folder", image_size=16, channels=3, path="")


def test_prefetched_scene_batches_are_the_arrays_the_source_renders_itself():
    from ecdit_cli.data.prefetch import PrefetchingSource

    plain = make_source("scenes", image_size=16, seed=3)
    # A run's requests: stride 4 (two micro-batches of 2 images... of one rank), a resume jump, a
    # validation set in between, then the stride again.
    requests = [("train", s, 4) for s in (0, 4, 8, 12)] + [("val", 0, 6)] + [("train", s, 4) for s in (40, 44, 48, 52)]
    with PrefetchingSource(make_source("scenes", image_size=16, seed=3)) as fetched:
        for split, start, count in requests:
            images, captions = fetched.batch(split, start, count)
            want_images, want_captions = plain.batch(split, start, count)
            assert images.dtype == want_images.dtype and np.array_equal(images, want_images)
            assert captions == want_captions
        assert fetched.hits >= 4  # predicted from the stride, rendered by the worker
        assert fetched.misses >= 2  # the first request and the one after the jump
        assert fetched.vocabulary() == plain.vocabulary()


def test_prefetch_auto_asks_for_a_free_core_beside_torchs_threads(monkeypatch):
    import torch

    from ecdit_cli.data import prefetch

    assert prefetch.wanted("on") and not prefetch.wanted("off")
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert not prefetch.wanted("auto")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert prefetch.wanted("auto")
