"""Rendered scenes: grammar, determinism, held-out captions, layout invariants."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ecdit_cli.data import scenes
from ecdit_cli.data.scenes import SceneSpec, render_batch, sample_scene
from ecdit_cli.errors import EcditError

CAPTION_PATTERNS = {
    "single_object": r"an? (circle|square|triangle)",
    "two_object": r"a (circle|square|triangle) and a (circle|square|triangle)",
    "counting": r"(two|three|four) (circle|square|triangle)s",
    "colors": r"an? (red|green|blue|yellow|purple|white) (circle|square|triangle)",
    "position": r"a \w+ (circle|square|triangle) (left of|right of|above|below) a \w+ (circle|square|triangle)",
    "color_attr": r"a \w+ (circle|square|triangle) and a \w+ (circle|square|triangle)",
}


@pytest.fixture(scope="module")
def val_batch():
    return render_batch(SceneSpec(32), 0, "val", 0, 400)


def test_same_seed_split_and_index_give_identical_scenes():
    spec = SceneSpec(32)
    for i in (0, 7, 123456):
        a, b = sample_scene(spec, 3, "train", i), sample_scene(spec, 3, "train", i)
        assert a.caption == b.caption and a.metadata == b.metadata
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)


def test_a_batch_equals_the_scenes_at_its_indices():
    spec = SceneSpec(32)
    images, captions, _, masks = render_batch(spec, 1, "train", 40, 5)
    for j in range(5):
        scene = sample_scene(spec, 1, "train", 40 + j)
        np.testing.assert_array_equal(images[j], scene.image)
        np.testing.assert_array_equal(masks[j], scene.mask)
        assert captions[j] == scene.caption


def test_train_val_and_eval_streams_differ():
    spec = SceneSpec(32)
    streams = {s: render_batch(spec, 0, s, 0, 50)[0] for s in ("train", "val", "eval")}
    for a, b in (("train", "val"), ("train", "eval"), ("val", "eval")):
        assert not any(np.array_equal(x, y) for x, y in zip(streams[a], streams[b], strict=True))
    assert not np.array_equal(render_batch(spec, 0, "train", 0, 8)[0], render_batch(spec, 1, "train", 0, 8)[0])


def test_train_split_never_yields_a_heldout_caption():
    _, captions, _, _ = render_batch(SceneSpec(32, 1, 4), 0, "train", 0, 3000)
    assert not any(scenes.is_heldout(c) for c in captions)
    # the val split may use them, so the resampling is what keeps them out of train
    _, val_captions, _, _ = render_batch(SceneSpec(32, 1, 4), 0, "val", 0, 600)
    assert any(scenes.is_heldout(c) for c in val_captions)


def test_heldout_captions_are_about_a_tenth_of_each_combinatorial_family():
    held = scenes.heldout_captions()
    for tag in scenes.TAGS:
        prompts = [r["prompt"] for r in scenes.caption_catalog(tag)]
        n_held = sum(p in held for p in prompts)
        if tag in scenes.HELDOUT_TAGS:
            assert n_held == -(-len(prompts) // 10)
        else:
            assert n_held == 0


def test_the_grammar_produces_1080_distinct_captions():
    counts = {tag: len(scenes.caption_catalog(tag)) for tag in scenes.TAGS}
    assert counts == {"single_object": 3, "two_object": 6, "counting": 9, "colors": 18, "position": 864,
                      "color_attr": 180}
    prompts = [r["prompt"] for r in scenes.caption_catalog()]
    assert len(set(prompts)) == len(prompts) == 1080
    assert len(scenes.heldout_captions()) == 107


def test_captions_follow_each_familys_grammar(val_batch):
    _, captions, metas, _ = val_batch
    assert {m["tag"] for m in metas} == set(scenes.TAGS)
    for caption, meta in zip(captions, metas, strict=True):
        assert re.fullmatch(CAPTION_PATTERNS[meta["tag"]], caption), caption
        assert caption == meta["prompt"] and caption == caption.lower()


def test_scenes_hold_exactly_the_objects_the_caption_describes(val_batch):
    _, _, metas, _ = val_batch
    for meta in metas:
        objects = meta["objects"]
        want = sorted((c["class"], c.get("color")) for c in meta["include"] for _ in range(c["count"]))
        got = sorted((o["class"], o["color"] if any("color" in c for c in meta["include"]) else None)
                     for o in objects)
        assert got == want, meta["prompt"]
        if meta["tag"] == "counting":
            assert meta["exclude"] == [{"class": objects[0]["class"], "count": len(objects) + 1}]
        else:
            assert "exclude" not in meta
        if meta["tag"] in ("two_object", "position", "color_attr"):
            assert objects[0]["class"] != objects[1]["class"]


def test_position_scenes_hold_only_the_named_relation(val_batch):
    _, _, metas, _ = val_batch
    positions = [m for m in metas if m["tag"] == "position"]
    assert len(positions) > 30
    for meta in positions:
        relation, target = meta["include"][1]["position"]
        subject, reference = meta["objects"]
        assert target == 0 and meta["include"][0]["class"] == reference["class"]
        assert scenes.relations(subject["bbox"], reference["bbox"]) == {relation}


@pytest.mark.parametrize("size", [16, 32, 64])
def test_objects_stay_inside_the_image_and_keep_a_gap(size):
    spec = SceneSpec(size, 1, 4)
    images, _, metas, masks = render_batch(spec, 2, "train", 0, 150)
    lo, hi = spec.object_sizes
    for meta in metas:
        boxes = [o["bbox"] for o in meta["objects"]]
        for x0, y0, x1, y1 in boxes:
            assert 1 <= x0 and 1 <= y0 and x1 <= size - 1 and y1 <= size - 1
            assert x1 - x0 == y1 - y0 and lo <= x1 - x0 <= hi
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
                assert gap >= spec.gap
    assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 1
    assert masks.dtype == bool
    np.testing.assert_array_equal(masks, images.max(-1) > 0)  # black background, object elsewhere


def test_edges_are_anti_aliased():
    images, _, _, _ = render_batch(SceneSpec(32), 0, "val", 0, 20)
    values = np.unique(images.max(-1))
    assert ((values > 0.05) & (values < 0.95)).sum() > 5


def test_min_and_max_objects_restrict_the_families():
    assert SceneSpec(32, 1, 1).tags() == ["single_object", "colors"]
    assert SceneSpec(32, 3, 4).tags() == ["counting"]
    _, _, metas, _ = render_batch(SceneSpec(32, 3, 4), 0, "train", 0, 40)
    assert {len(m["objects"]) for m in metas} == {3, 4}
    _, _, metas, _ = render_batch(SceneSpec(32, 2, 2), 0, "train", 0, 60)
    assert {len(m["objects"]) for m in metas} == {2}
    assert "counting" in {m["tag"] for m in metas}


@pytest.mark.parametrize(("kwargs", "word"), [({"size": 8}, "size"), ({"size": 128}, "size"),
                                              ({"min_objects": 0}, "min_objects"),
                                              ({"min_objects": 3, "max_objects": 2}, "max_objects"),
                                              ({"max_objects": 5}, "max_objects")])
def test_spec_rejects_out_of_range_values_naming_the_field(kwargs, word):
    with pytest.raises(EcditError, match=word):
        SceneSpec(**kwargs)


def test_unknown_split_suggests_the_closest_name():
    with pytest.raises(EcditError, match="did you mean 'train'"):
        sample_scene(SceneSpec(), 0, "trian", 0)


def test_vocabulary_covers_every_caption_word():
    vocab = scenes.vocabulary()
    words = {w for r in scenes.caption_catalog() for w in r["prompt"].split()}
    assert set(vocab) == words and vocab == sorted(vocab)
    assert {"two", "four", "left", "of", "below", "purple", "triangles"} <= words


def test_a_prompt_record_renders_to_a_matching_scene():
    for record in scenes.caption_catalog()[::97]:
        scene = scenes.scene_for_metadata(SceneSpec(32), record, 0, 5)
        assert scene.caption == record["prompt"]
        assert {k: scene.metadata[k] for k in record} == record
