"""The exact scene detector, GenEval's rules, and the evaluation prompt set and its scores."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
from scipy import ndimage

from ecdit_cli.data import detector, scenes
from ecdit_cli.data.detector import Detection, check, detect, evaluate
from ecdit_cli.data.scenes import SceneSpec, render_batch
from ecdit_cli.errors import EcditError
from ecdit_cli.evaluate import geneval

ACCEPT_TOLERANCE = 0.99  # share of true (image, metadata) pairs the detector must accept
REJECT_TOLERANCE = 0.99  # share of deliberately wrong metadata it must reject
NOISE_TOLERANCE = 0.01  # share of noise, blob or blank images accepted for any default prompt
FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
TURN = {"left of": "above", "right of": "below", "above": "right of", "below": "left of"}
# The mild corruptions the detector is calibrated for: Gaussian noise sigma <= 0.1, blur <= 0.7 px.
CORRUPTIONS = {
    "clean": lambda x, rng: x,
    "noise 0.05": lambda x, rng: x + rng.normal(0, 0.05, x.shape),
    "noise 0.1": lambda x, rng: x + rng.normal(0, 0.1, x.shape),
    "blur 0.5": lambda x, rng: ndimage.gaussian_filter(x, (0.5, 0.5, 0)),
    "blur 0.7": lambda x, rng: ndimage.gaussian_filter(x, (0.7, 0.7, 0)),
}


@pytest.fixture(scope="module")
def oracle_batch():
    images, _, metas, _ = render_batch(SceneSpec(32), 11, "eval", 0, 300)
    return images, metas


@pytest.fixture(scope="module")
def small_batch():
    images, _, metas, _ = render_batch(SceneSpec(16), 5, "val", 0, 300)
    return images, metas


def _accept_rate(images, metas, transform=lambda x: x) -> float:
    return float(np.mean([check(transform(img), meta)[0] for img, meta in zip(images, metas, strict=True)]))


def _corrupt(name: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    return lambda x: CORRUPTIONS[name](x, rng)


def test_detector_accepts_the_renderers_own_images(oracle_batch):
    images, metas = oracle_batch
    assert {m["tag"] for m in metas} == set(scenes.TAGS)
    assert _accept_rate(images, metas) >= ACCEPT_TOLERANCE


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_detector_accepts_true_metadata_on_99_percent_of_mildly_corrupted_32px_scenes(oracle_batch, corruption):
    images, metas = oracle_batch
    assert _accept_rate(images, metas, _corrupt(corruption)) >= ACCEPT_TOLERANCE


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_detector_accepts_true_metadata_on_99_percent_of_mildly_corrupted_16px_scenes(small_batch, corruption):
    images, metas = small_batch
    assert {m["tag"] for m in metas} == set(scenes.TAGS)
    assert _accept_rate(images, metas, _corrupt(corruption)) >= ACCEPT_TOLERANCE


def test_detector_accepts_clean_blurred_and_noisy_64px_scenes_at_99_percent():
    images, _, metas, _ = render_batch(SceneSpec(64), 5, "val", 0, 100)
    for corruption in ("clean", "noise 0.1", "blur 0.7"):
        assert _accept_rate(images, metas, _corrupt(corruption)) >= ACCEPT_TOLERANCE, corruption


def test_detector_finds_each_rendered_object_with_its_box(oracle_batch):
    images, metas = oracle_batch
    for img, meta in zip(images[:100], metas[:100], strict=True):
        found = sorted((d.cls, d.color, d.bbox) for d in detect(img))
        want = [(o["class"], o["color"], o["bbox"]) for o in meta["objects"]]
        assert len(found) == len(want)
        for (fc, fk, fb), (wc, wk, wb) in zip(found, sorted(want), strict=True):
            assert (fc, fk) == (wc, wk)
            assert max(abs(p - q) for p, q in zip(fb, wb, strict=True)) <= 1


def _wrong_variants(meta: dict) -> list[dict]:
    """Metadata that contradicts the scene: changed colour, shape, count or relation."""
    tag, objects = meta["tag"], meta["objects"]
    missing = [s for s in scenes.SHAPES if s not in {o["class"] for o in objects}]
    out = []

    def variant(fn):
        m = copy.deepcopy({k: v for k, v in meta.items() if k != "objects"})
        fn(m)
        out.append(m)

    if missing:
        variant(lambda m: m["include"][0].update({"class": missing[0]}))
    if tag == "counting":
        n = meta["include"][0]["count"]
        for delta in (-1, 1):
            variant(lambda m, d=delta: (m["include"][0].update({"count": n + d}),
                                        m["exclude"][0].update({"count": n + d + 1})))
    for i, clause in enumerate(meta["include"]):
        if "color" in clause:
            other = next(c for c in scenes.COLORS if c != clause["color"])
            variant(lambda m, i=i, c=other: m["include"][i].update({"color": c}))
    if tag == "color_attr":
        a, b = meta["include"][0]["color"], meta["include"][1]["color"]
        variant(lambda m: (m["include"][0].update({"color": b}), m["include"][1].update({"color": a})))
    if tag == "position":
        rel = meta["include"][1]["position"][0]
        variant(lambda m: m["include"][1].update({"position": [FLIP[rel], 0]}))
        variant(lambda m: m["include"][1].update({"position": [TURN[rel], 0]}))
    return out


@pytest.mark.parametrize(("batch", "corruption"), [("oracle_batch", "clean"), ("oracle_batch", "noise 0.1"),
                                                   ("small_batch", "blur 0.7")])
def test_detector_rejects_99_percent_of_deliberately_wrong_metadata(request, batch, corruption):
    images, metas = request.getfixturevalue(batch)
    transform = _corrupt(corruption)
    verdicts, kinds = [], set()
    for img, meta in zip(images, metas, strict=True):
        reading = detector.read_scene(transform(img))
        for wrong in _wrong_variants(meta):
            verdicts.append(reading.verdict(wrong)[0])
            kinds.add(wrong["tag"])
    assert kinds == set(scenes.TAGS) and len(verdicts) > 500
    assert 1 - np.mean(verdicts) >= REJECT_TOLERANCE


# --- noise, blobs and blank images: a real GenEval detector finds nothing in them --------------


def _noise_images(kind: str, n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """n images of one kind: pure noise (clipped to [0, 1]), random-colour blobs, or blank."""
    shape = (size, size, 3)

    def grid(cells: int, order: int) -> np.ndarray:
        return np.clip(ndimage.zoom(rng.uniform(0, 1, (cells, cells, 3)), (size / cells, size / cells, 1),
                                    order=order, mode="nearest"), 0, 1)

    def one() -> np.ndarray:
        if kind == "uniform":
            return rng.uniform(0, 1, shape)
        if kind.startswith("gaussian"):
            return np.clip(rng.normal(0.5, float(kind.split()[1]), shape), 0, 1)
        if kind.startswith("grid"):
            cells, order = int(kind.split()[1]), 1 if "smooth" in kind else 0
            return grid(cells, order)
        if kind.startswith("smoothed"):
            sigma = float(kind.split()[1])
            return np.clip(0.5 + 1.5 * sigma * ndimage.gaussian_filter(rng.normal(0, 1, shape), (sigma, sigma, 0)), 0, 1)
        if kind == "4x4 patches":  # an undertrained model's samples: a third of the patches coloured
            patches = rng.uniform(0, 1, (size // 4, size // 4, 3)) * (rng.uniform(size=(size // 4, size // 4, 1)) < 0.3)
            return np.kron(patches, np.ones((4, 4, 1)))
        assert kind == "blank"
        return np.zeros(shape)

    return [one() for _ in range(n)]


NOISE_KINDS = ["uniform", "gaussian 0.05", "gaussian 0.1", "gaussian 0.3", "gaussian 0.5", "gaussian 1.0",
               "grid 4", "grid 8", "grid 4 smooth", "grid 8 smooth", "smoothed 1", "smoothed 2", "4x4 patches", "blank"]


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_at_most_1_percent_of_noise_blob_or_blank_images_pass_any_default_prompt(kind):
    records = geneval.make_prompt_set()
    rng = np.random.default_rng(NOISE_KINDS.index(kind))
    images = _noise_images(kind, 50, 32, rng) + _noise_images(kind, 50, 16, rng)
    passed = []
    for img in images:
        reading = detector.read_scene(img)
        passed.append(any(reading.verdict(r)[0] for r in records))
    assert np.mean(passed) <= NOISE_TOLERANCE


def test_noise_images_score_at_most_1_percent_overall():
    records = geneval.make_prompt_set()
    rng = np.random.default_rng(0)
    kinds = ["uniform", "gaussian 0.3", "gaussian 0.5", "grid 8", "smoothed 2"]
    noise = [_noise_images(kinds[p % len(kinds)], 2, 32, rng) for p in range(len(records))]
    scores = geneval.score_images(records, noise)
    assert scores["overall"] <= 0.01
    assert all(r["reason"].startswith("unreadable: ") for r in scores["images"])


def test_blank_and_noise_images_hold_no_objects():
    rng = np.random.default_rng(1)
    assert detect(np.zeros((32, 32, 3))) == []
    assert detect(np.clip(rng.normal(0, 0.05, (32, 32, 3)), 0, 1)) == []
    assert detect(np.clip(rng.normal(0.5, 0.5, (32, 32, 3)), 0, 1)) == []
    assert detect(rng.uniform(0, 1, (32, 32, 3))) == []


def _two_object_image() -> np.ndarray:
    """A red circle (side 10 at (3, 3)) and a blue square (side 10 at (19, 19)) on black."""
    img = np.zeros((32, 32, 3), np.float32)
    img += scenes.shape_coverage("circle", 8, 8, 10, 32, 32)[..., None] * np.float32(scenes.PALETTE["red"])
    img += scenes.shape_coverage("square", 24, 24, 10, 32, 32)[..., None] * np.float32(scenes.PALETTE["blue"])
    return img


def test_a_recognisable_extra_object_does_not_fail_an_image_but_unexplained_foreground_does():
    meta = {"tag": "colors", "prompt": "a red circle", "include": [{"class": "circle", "count": 1, "color": "red"}]}
    img = _two_object_image()
    assert [(d.cls, d.color) for d in detect(img)] == [("circle", "red"), ("square", "blue")]
    assert check(img, meta) == (True, "")
    # an 8 x 8 patch of noise (6% of the image) in the free bottom-left corner
    img[22:30, 2:10] = np.random.default_rng(0).uniform(0, 1, (8, 8, 3))
    reading = detector.read_scene(img)
    assert [(d.cls, d.color) for d in reading.detections][:1] == [("circle", "red")]
    assert not reading.readable and reading.unexplained > detector.MAX_UNEXPLAINED
    ok, reason = check(img, meta)
    assert not ok and re.fullmatch(r"unreadable: \d+\.\d% of the image is unexplained foreground", reason)


def test_detections_carry_a_confidence_from_their_template_and_colour_errors():
    dets = detect(_two_object_image())
    assert all(d.confidence > 0.99 and d.shape_error < 1e-3 and d.colour_error < 1e-6 for d in dets)
    noisy = detect(np.clip(_two_object_image() + np.random.default_rng(0).normal(0, 0.1, (32, 32, 3)), 0, 1))
    assert len(noisy) == 2 and all(detector.MIN_CONFIDENCE < d.confidence < 0.99 for d in noisy)
    assert {"confidence", "shape_error", "colour_error", "side"} <= set(noisy[0].to_dict())


def test_the_prefilter_skips_only_components_the_confidence_rule_rejects(oracle_batch):
    rng = np.random.default_rng(3)
    images = [*oracle_batch[0][:30], *_noise_images("smoothed 2", 20, 32, rng), *_noise_images("grid 4", 20, 32, rng)]
    for img in images:
        x = detector.as_float_image(img)
        full = [d for d in detector._candidates(x, 16, prefilter=False) if detector._accepted(d, 32, 32, np.inf)]
        assert detector.read_scene(x).detections == full


def test_detector_reads_uint8_images_and_refuses_other_shapes(oracle_batch):
    images, metas = oracle_batch
    assert check((images[0] * 255).round().astype(np.uint8), metas[0])[0]
    with pytest.raises(EcditError, match=r"\(H, W, 3\)"):
        detect(images[0].transpose(2, 0, 1))


# --- GenEval's rules on hand-made boxes ------------------------------------------------------


def _geneval_relative_position(box_a, box_b) -> set[str]:
    """A literal transcription of GenEval's relative_position with POSITION_THRESHOLD = 0.1."""
    boxes = np.array([box_a, box_b], dtype=float)[:, :4].reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - 0.1 * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def test_position_rule_names_the_dominant_direction_after_the_margin():
    rel = scenes.relations
    assert rel((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}
    assert rel((20, 0, 30, 10), (0, 0, 10, 10)) == {"right of"}
    assert rel((0, 0, 10, 10), (0, 20, 10, 30)) == {"above"}
    assert rel((0, 0, 10, 10), (20, 20, 30, 30)) == {"left of", "above"}  # diagonal: both
    # centres 1.5 px apart, margin 0.1 * (10 + 10) = 2 px: the offset vanishes
    assert rel((0, 0, 10, 10), (1.5, 0, 11.5, 10)) == set()
    # a small horizontal offset beside a large vertical one names only the vertical relation
    assert rel((0, 0, 10, 10), (3, 20, 13, 30)) == {"above"}


def test_position_rule_matches_genevals_formula_on_random_boxes():
    rng = np.random.default_rng(0)
    for _ in range(500):
        xy = rng.uniform(0, 30, (2, 2))
        wh = rng.uniform(1, 12, (2, 2))
        a, b = np.concatenate([xy[0], xy[0] + wh[0]]), np.concatenate([xy[1], xy[1] + wh[1]])
        assert scenes.relations(a, b) == _geneval_relative_position(a, b)


def _det(cls: str, color: str, x: int, y: int, size: int = 8, confidence: float = 1.0) -> Detection:
    return Detection(cls, color, (x, y, x + size, y + size), (x + size / 2, y + size / 2), size * size, confidence)


def test_counting_exclude_clause_makes_the_count_exact():
    meta = {"tag": "counting", "prompt": "two triangles", "include": [{"class": "triangle", "count": 2}],
            "exclude": [{"class": "triangle", "count": 3}]}
    two = [_det("triangle", "red", 0, 0), _det("triangle", "blue", 12, 0)]
    three = [*two, _det("triangle", "red", 0, 12)]
    assert evaluate(two, meta) == (True, "")
    ok, reason = evaluate(three, meta)
    assert not ok and "expected triangle<3, found 3" in reason
    ok, reason = evaluate(two[:1], meta)
    assert not ok and "expected triangle>=2, found 1" in reason


def test_objects_the_prompt_does_not_mention_do_not_fail_an_image():
    meta = {"tag": "colors", "prompt": "a red circle", "include": [{"class": "circle", "count": 1, "color": "red"}]}
    assert evaluate([_det("circle", "red", 0, 0), _det("square", "blue", 20, 20)], meta)[0]


def test_colour_is_checked_on_the_most_confident_detections_only():
    meta = {"tag": "colors", "prompt": "a red circle", "include": [{"class": "circle", "count": 1, "color": "red"}]}
    dets = [_det("circle", "blue", 0, 0, confidence=0.9), _det("circle", "red", 20, 20, confidence=0.8)]
    ok, reason = evaluate(dets, meta)
    assert not ok and "expected red circle>=1, found 1 blue" in reason


def test_a_relation_whose_reference_failed_has_no_target():
    meta = {"tag": "position", "prompt": "a red circle left of a blue square",
            "include": [{"class": "square", "count": 1, "color": "blue"},
                        {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]}]}
    circle, square = _det("circle", "red", 0, 0), _det("square", "blue", 20, 0)
    assert evaluate([circle, square], meta)[0]
    ok, reason = evaluate([circle, _det("square", "green", 20, 0)], meta)
    assert not ok and "no target for circle to be left of" in reason
    ok, reason = evaluate([_det("circle", "red", 20, 0), _det("square", "blue", 0, 0)], meta)
    assert not ok and "expected circle left of target, found right of" in reason


# --- the evaluation prompt set and its scores ------------------------------------------------


def test_prompt_set_is_deterministic_and_follows_genevals_schema():
    records = geneval.make_prompt_set(seed=0)
    assert records == geneval.make_prompt_set(seed=0)
    assert records != geneval.make_prompt_set(seed=1)
    assert [r["tag"] for r in records] == [t for t in scenes.TAGS for _ in range(geneval.DEFAULT_PER_TAG)]
    for r in records:
        assert set(r) == ({"tag", "prompt", "include", "exclude"} if r["tag"] == "counting"
                          else {"tag", "prompt", "include"})
        for clause in r["include"]:
            assert set(clause) <= {"class", "count", "color", "position"}
            assert clause["class"] in scenes.SHAPES and clause["count"] >= 1
        if r["tag"] == "counting":
            assert r["exclude"] == [{"class": r["include"][0]["class"], "count": r["include"][0]["count"] + 1}]
        if r["tag"] == "position":
            assert r["include"][1]["position"][1] == 0 and r["include"][1]["position"][0] in scenes.RELATIONS
        if r["tag"] in geneval.HELDOUT_EVAL_TAGS:
            assert scenes.is_heldout(r["prompt"])


def test_prompt_set_sizes_follow_per_tag():
    records = geneval.make_prompt_set(seed=0, per_tag={"position": 5, "single_object": 7})
    assert [r["tag"] for r in records] == ["single_object"] * 7 + ["position"] * 5
    assert len({r["prompt"] for r in records if r["tag"] == "single_object"}) == 3  # all, repeated
    with pytest.raises(EcditError, match="did you mean 'counting'"):
        geneval.make_prompt_set(per_tag={"countin": 3})


def test_prompts_survive_a_jsonl_round_trip(tmp_path):
    records = geneval.make_prompt_set(seed=2, per_tag=3)
    geneval.write_prompts(tmp_path / "prompts.jsonl", records)
    assert geneval.read_prompts(tmp_path / "prompts.jsonl") == records


def test_reading_a_malformed_prompt_file_names_the_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(geneval.make_prompt_set(per_tag=1)[0]) + "\n{not json\n")
    with pytest.raises(EcditError, match=r"prompts.jsonl:2: not valid JSON"):
        geneval.read_prompts(path)
    path.write_text('{"tag": "colours", "prompt": "x", "include": []}\n')
    with pytest.raises(EcditError, match=r":1: unknown tag 'colours' \(did you mean 'colors'\?\)"):
        geneval.read_prompts(path)
    with pytest.raises(EcditError, match="does not exist"):
        geneval.read_prompts(tmp_path / "missing.jsonl")


def test_reference_renders_score_one_and_blank_images_score_zero():
    records = geneval.make_prompt_set(seed=0, per_tag=4)
    spec = SceneSpec(32)
    renders = [[scenes.scene_for_metadata(spec, r, 0, i).image for i in range(2)] for r in records]
    scores = geneval.score_images(records, renders)
    assert scores["overall"] == 1.0 and scores["prompts_with_any_correct"] == 1.0
    assert set(scores["tags"]) == set(scenes.TAGS) and scores["num_images"] == 48 and scores["heldout"] == 1.0
    assert {(r["prompt_index"], r["image_index"]) for r in scores["images"]} == {(p, i) for p in range(24) for i in range(2)}
    blank = [[np.zeros((32, 32, 3), np.float32)] * 2 for _ in records]
    scores = geneval.score_images(records, blank)
    assert scores["overall"] == 0.0 and all(not r["correct"] and r["reason"] for r in scores["images"])


def test_overall_is_the_unweighted_mean_of_the_tag_scores():
    records = geneval.make_prompt_set(seed=0, per_tag={"single_object": 1, "colors": 3})
    spec = SceneSpec(32)
    good = [scenes.scene_for_metadata(spec, r, 0, 0).image for r in records]
    blank = np.zeros((32, 32, 3), np.float32)
    # single_object 1/1 correct, colors 1/3 correct: overall (1 + 1/3) / 2, not 2/4
    scores = geneval.score_images(records, [[good[0]], [good[1]], [blank], [blank]])
    assert scores["tags"] == {"single_object": 1.0, "colors": pytest.approx(1 / 3)}
    assert scores["overall"] == pytest.approx(2 / 3)
    assert scores["missing_tags"] == ["two_object", "counting", "position", "color_attr"]


def test_scoring_refuses_mismatched_prompt_and_image_lists():
    with pytest.raises(EcditError, match="images for 1 prompts but 2 prompt records"):
        geneval.score_images(geneval.make_prompt_set(per_tag={"colors": 2}), [[np.zeros((32, 32, 3))]])


def test_model_outputs_map_to_images_for_scoring():
    x = np.stack([np.full((3, 4, 4), -1.0), np.full((3, 4, 4), 1.0)])
    images = geneval.images_from_model(x)
    assert images.shape == (2, 4, 4, 3) and images[0].max() == 0.0 and images[1].min() == 1.0
    assert detector.detect(images[0]) == []
