"""`ecdit sample`: shapes and ranges, determinism, batch independence, guidance, prompt errors, files."""

import inspect
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ecdit_cli.config import resolve_config
from ecdit_cli.errors import EcditError
from ecdit_cli.evaluate.sample import (
    DEFAULT_CFG_SCALE,
    DEFAULT_SHIFT,
    DEFAULT_STEPS,
    initial_noise,
    sample_images,
    sample_run,
    save_samples,
)
from ecdit_cli.model.load import load_run

PROMPTS = ["a red circle", "two squares", "a blue triangle above a green square"]


@pytest.fixture(scope="module")
def ec(ec_run):
    return load_run(ec_run)


def test_sampled_images_are_prompts_by_n_rgb_images_in_the_unit_range(ec):
    model, cfg = ec
    result = sample_images(model, cfg, PROMPTS[:2], n=3, steps=3)
    assert result.images.shape == (2, 3, 32, 32, 3)
    assert result.images.dtype == np.float32
    assert np.isfinite(result.images).all()
    assert result.images.min() >= 0.0 and result.images.max() <= 1.0
    assert result.prompts == PROMPTS[:2]
    assert result.settings | {"wall_time_s": 0} == {"cfg": DEFAULT_CFG_SCALE, "steps": 3, "seed": 0,
                                                    "shift": DEFAULT_SHIFT, "n": 3, "guidance_max_t": 1.0,
                                                    "wall_time_s": 0}
    assert result.routing is None


def test_sampling_is_deterministic_for_a_seed_and_changes_with_the_seed(ec):
    model, cfg = ec
    a = sample_images(model, cfg, PROMPTS[:1], n=2, steps=3, seed=5).images
    b = sample_images(model, cfg, PROMPTS[:1], n=2, steps=3, seed=5).images
    c = sample_images(model, cfg, PROMPTS[:1], n=2, steps=3, seed=6).images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    assert np.abs(a[0, 0] - a[0, 1]).max() > 1e-3  # images of one prompt differ


def test_initial_noise_depends_only_on_seed_prompt_index_and_image_index():
    shape = (3, 8, 8)
    np.testing.assert_array_equal(initial_noise(1, 2, 3, shape), initial_noise(1, 2, 3, shape))
    others = [initial_noise(0, 2, 3, shape), initial_noise(1, 0, 3, shape), initial_noise(1, 2, 0, shape)]
    assert all(np.abs(o - initial_noise(1, 2, 3, shape)).max() > 0.1 for o in others)


def test_an_image_sampled_alone_equals_the_same_image_sampled_in_a_batch_with_other_prompts(ec):
    model, cfg = ec
    assert cfg.moe.routing == "expert_choice" and cfg.moe.group_size == 0  # per-image routing groups
    alone = sample_images(model, cfg, PROMPTS[:1], n=1, steps=4, seed=3, record_routing=True)
    batch = sample_images(model, cfg, PROMPTS, n=3, steps=4, seed=3, record_routing=True)
    small_batches = sample_images(model, cfg, PROMPTS, n=3, steps=4, seed=3, batch_size=2)
    np.testing.assert_allclose(batch.images[0, 0], alone.images[0, 0], atol=1e-5)
    np.testing.assert_allclose(small_batches.images, batch.images, atol=1e-5)
    np.testing.assert_array_equal(batch.routing.experts_per_token[:, :, 0, 0], alone.routing.experts_per_token[:, :, 0, 0])


def test_the_batched_guidance_pass_equals_separate_conditional_and_unconditional_passes(ec):
    model, cfg = ec
    batched = sample_images(model, cfg, PROMPTS, n=2, steps=3, cfg_scale=3.0)
    separate = sample_images(model, cfg, PROMPTS, n=2, steps=3, cfg_scale=3.0, record_routing=True)
    np.testing.assert_allclose(batched.images, separate.images, atol=1e-5)


def test_guidance_applies_only_at_steps_whose_t_is_at_most_guidance_max_t(ec):
    model, cfg = ec
    rows = []
    hook = model.register_forward_hook(lambda _m, args, _out: rows.append((round(float(args[1][0]), 4), len(args[1]))))
    try:
        half = sample_images(model, cfg, PROMPTS[:2], n=1, steps=4, cfg_scale=3.0, guidance_max_t=0.5)
    finally:
        hook.remove()
    # t = 1 and 0.75: the conditional pass alone (2 rows); t = 0.5 and 0.25: both passes in one forward.
    assert rows == [(1.0, 2), (0.75, 2), (0.5, 4), (0.25, 4)]
    assert half.settings["guidance_max_t"] == 0.5
    unguided = sample_images(model, cfg, PROMPTS[:2], n=1, steps=4, cfg_scale=1.0).images
    guided = sample_images(model, cfg, PROMPTS[:2], n=1, steps=4, cfg_scale=3.0).images
    # No step at or below t = 0 exists, so max t = 0 is no guidance at all, and 1 is guidance everywhere.
    never = sample_images(model, cfg, PROMPTS[:2], n=1, steps=4, cfg_scale=3.0, guidance_max_t=0.0).images
    np.testing.assert_array_equal(never, unguided)
    np.testing.assert_array_equal(sample_images(model, cfg, PROMPTS[:2], n=1, steps=4, cfg_scale=3.0,
                                                guidance_max_t=1.0).images, guided)
    assert np.abs(half.images - unguided).max() > 1e-4 and np.abs(half.images - guided).max() > 1e-4


def test_guidance_scale_zero_samples_from_the_null_caption_whatever_the_prompt(ec):
    model, cfg = ec
    a = sample_images(model, cfg, ["a red circle"], n=1, steps=3, cfg_scale=0.0).images
    b = sample_images(model, cfg, ["four triangles"], n=1, steps=3, cfg_scale=0.0).images
    c = sample_images(model, cfg, ["four triangles"], n=1, steps=3, cfg_scale=4.0).images
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.abs(b - c).max() > 1e-4


def test_recorded_expert_choice_routing_gives_capacity_factor_experts_per_token(ec):
    model, cfg = ec
    result = sample_images(model, cfg, PROMPTS[:2], n=2, steps=3, record_routing=True)
    rec = result.routing
    grid = cfg.model.input_size // cfg.model.patch_size
    L = sum(cfg.moe.is_moe_block(i) for i in range(cfg.model.depth))
    assert rec.experts_per_token.shape == (3, L, 2, 2, grid, grid)
    per_image = rec.experts_per_token.reshape(3, L, 4, -1).mean(-1)
    np.testing.assert_allclose(per_image, cfg.moe.capacity_factor)
    capacity = round(grid * grid * cfg.moe.capacity_factor / cfg.moe.num_experts)
    assert (rec.kept_per_expert == 4 * capacity).all()
    np.testing.assert_allclose(rec.t, np.linspace(1, 0, 4)[:-1])


def test_unknown_words_raise_one_error_listing_them_and_the_known_words(ec):
    model, cfg = ec
    with pytest.raises(EcditError, match=r"unknown word\(s\).*: cat, dog; this model knows: a, above, and") as err:
        sample_images(model, cfg, ["a red dog", "a cat"], n=1, steps=1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps must be >= 1"), ({"n": 0}, "images per prompt"), ({"cfg_scale": -1.0}, "cfg scale"),
    ({"shift": 0.0}, "shift"), ({"seed": -1}, "seed"), ({"guidance_max_t": 1.5}, r"guidance max t must be in \[0, 1\]"),
])
def test_bad_sampling_settings_are_rejected_with_a_message(ec, kwargs, match):
    model, cfg = ec
    with pytest.raises(EcditError, match=match):
        sample_images(model, cfg, PROMPTS[:1], **({"n": 1, "steps": 1} | kwargs))


def test_save_samples_writes_a_png_grid_and_the_raw_images_beside_it(ec, tmp_path):
    model, cfg = ec
    result = sample_images(model, cfg, PROMPTS[:2], n=2, steps=2)
    files = save_samples(result, tmp_path / "grid.png")
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = np.load(files["npz"])
    np.testing.assert_array_equal(data["images"], result.images)
    assert list(data["prompts"]) == PROMPTS[:2]
    assert json.loads(str(data["settings"]))["steps"] == 2
    with pytest.raises(EcditError, match=".png"):
        save_samples(result, tmp_path / "grid.jpg")


@pytest.mark.parametrize("command", ["sample", "eval", "analyze"])
def test_every_sampling_command_defaults_to_the_librarys_sampler_settings(command):
    # The commands show these defaults in --help; they must be the ones the library uses.
    import typer.main

    from ecdit_cli.cli import _register, app

    _register()
    params = {p.name: p.default for p in typer.main.get_command(app).commands[command].params}
    assert (params["cfg"], params["steps"], params["shift"]) == (DEFAULT_CFG_SCALE, DEFAULT_STEPS, DEFAULT_SHIFT)
    assert params["guidance_max_t"] == inspect.signature(sample_images).parameters["guidance_max_t"].default == 1.0
    assert inspect.signature(sample_run).parameters["cfg_scale"].default == DEFAULT_CFG_SCALE


@pytest.fixture(scope="module")
def cli():
    from ecdit_cli.cli import _register, app

    _register()
    return app


def test_sample_command_writes_the_grid_and_npz(cli, ec_run, tmp_path):
    out = tmp_path / "s.png"
    res = CliRunner().invoke(cli, ["sample", str(ec_run), "-p", "a red circle", "-p", "two squares", "-n", "2",
                                   "--steps", "2", "--device", "cpu", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.exists() and out.with_suffix(".npz").exists()
    assert np.load(out.with_suffix(".npz"))["images"].shape == (2, 2, 32, 32, 3)
    assert "s/image" in res.output


def test_sample_command_defaults_to_a_file_in_the_run_directory(cli, ec_run):
    res = CliRunner().invoke(cli, ["sample", str(ec_run), "-p", "a circle", "-n", "1", "--steps", "1", "--seed", "9"])
    assert res.exit_code == 0, res.output
    assert (ec_run / "samples" / "seed9.png").exists()


@pytest.mark.parametrize("args, message", [
    (["-p", "a purple dragon"], "dragon"), ([], "--prompt"), (["-p", "a circle", "--steps", "0"], "steps"),
])
def test_sample_command_reports_user_errors_in_one_line_and_exits_2(cli, ec_run, args, message, capsys):
    from ecdit_cli.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["sample", str(ec_run), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


class PointMassModel(torch.nn.Module):
    """A stub whose velocity is exact for data at one point: (x - a) / t, a = A for captions, B for
    the null caption. Euler then lands exactly on a, and guidance on (1 - s) B + s A."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b
        self.text_encoder = None
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def tokenize(self, captions, strict=False):
        return torch.ones(len(captions), 2, dtype=torch.long), torch.ones(len(captions), 2, dtype=torch.bool)

    def forward(self, x, t, text, mask, drop=None):
        from ecdit_cli.model.dit import DiTOutput

        drop = torch.zeros(len(x), dtype=torch.bool) if drop is None else drop
        target = torch.where(drop.view(-1, 1, 1, 1), self.b, self.a)
        return DiTOutput((x - target) / t.view(-1, 1, 1, 1))


@pytest.mark.parametrize("scale", [0.0, 1.0, 1.5])
def test_euler_sampling_with_guidance_lands_on_the_guided_target_of_an_exact_velocity(scale):
    cfg = resolve_config(preset="debug")
    a = torch.full((3, 32, 32), 0.5)
    b = torch.full((3, 32, 32), -0.5)
    images = sample_images(PointMassModel(a, b), cfg, ["x", "y"], n=2, steps=5, cfg_scale=scale).images
    expected = ((1 - scale) * -0.5 + scale * 0.5 + 1) / 2
    np.testing.assert_allclose(images, expected, atol=1e-5)


def test_inference_capacity_sets_the_expert_slots_and_at_the_trained_value_changes_nothing(ec_run):
    from ecdit_cli.model.accounting import count, vocab_size

    model, cfg = load_run(ec_run)
    trained = cfg.moe.capacity_factor
    base = sample_run(ec_run, PROMPTS[:2], n=2, steps=2)
    same = sample_run(ec_run, PROMPTS[:2], n=2, steps=2, capacity_factor=trained)
    np.testing.assert_array_equal(base.images, same.images)
    assert same.settings["flops_per_image"] == base.settings["flops_per_image"] == count(cfg, vocab_size(cfg)).flops_per_image

    wide = sample_run(ec_run, PROMPTS[:2], n=2, steps=2, capacity_factor=2 * trained, record_routing=True)
    per_image = wide.routing.experts_per_token.reshape(2, -1, 4, wide.routing.experts_per_token.shape[-1] ** 2)
    np.testing.assert_allclose(per_image.mean(-1), 2 * trained)  # every expert keeps twice the tokens
    assert wide.settings["capacity_factor"] == 2 * trained
    assert wide.settings["flops_per_image"] > base.settings["flops_per_image"]
    assert np.abs(wide.images - base.images).max() > 1e-4


def test_inference_capacity_is_refused_for_token_choice_and_for_a_bad_value(ec_run, tc_run):
    with pytest.raises(EcditError, match="applies to expert-choice runs; .* is a token_choice run"):
        load_run(tc_run, capacity_factor=2.0)
    with pytest.raises(EcditError, match="moe.capacity_factor"):
        load_run(ec_run, capacity_factor=-1.0)


def test_sample_command_at_another_capacity_writes_beside_the_default_and_reports_flops(cli, ec_run):
    res = CliRunner().invoke(cli, ["sample", str(ec_run), "-p", "a circle", "-n", "1", "--steps", "1", "--seed", "5",
                                   "--capacity-factor", "1"])
    assert res.exit_code == 0, res.output
    assert (ec_run / "samples" / "seed5-f1.png").exists()
    assert "at capacity factor 1:" in res.output and "per denoiser pass" in res.output
