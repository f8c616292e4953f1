"""FD-scenes: the Fréchet distance itself, the scene network, its cache, and what the distance ranks."""

import numpy as np
import pytest
import torch

from ecdit_cli.errors import EcditError
from ecdit_cli.evaluate import fd_scenes as fd
from ecdit_cli.evaluate import geneval


def test_frechet_distance_of_a_set_to_itself_is_zero_and_matches_the_closed_form_for_an_affine_map():
    a = np.random.default_rng(0).normal(size=(400, 6)) @ np.random.default_rng(1).normal(size=(6, 6))
    assert fd.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # b = 2a + 3: S_b = 4 S_a and (S_a S_b)^(1/2) = 2 S_a, so FD = |mu_a - mu_b|^2 + Tr(S_a).
    b = 2 * a + 3
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert fd.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert fd.frechet_distance(a, b) == pytest.approx(fd.frechet_distance(b, a), rel=1e-6)


def test_frechet_distance_survives_singular_covariances_and_rejects_bad_shapes():
    a = np.zeros((10, 4))
    a[:, 0] = np.arange(10)  # three constant features
    assert np.isfinite(fd.frechet_distance(a, a + 1.0))
    with pytest.raises(EcditError, match="same D"):
        fd.frechet_distance(a, np.zeros((10, 3)))
    with pytest.raises(EcditError, match="at least 2"):
        fd.frechet_distance(a[:1], a)


@pytest.fixture(scope="module")
def net():
    return fd.load_scene_net(32)  # the session's small network (conftest), trained once and cached


def test_the_scene_network_learns_colours_and_where_they_are(net):
    assert net.val_color_acc > 0.9 and net.val_occupancy_acc > 0.95
    assert fd._cache_path(32).is_file()
    again = fd.load_scene_net(32)  # from the cache: the same weights
    for k, v in net.net.state_dict().items():
        assert (again.net.state_dict()[k] == v).all()


def test_fd_ranks_rendered_scenes_below_noisy_ones_below_blank_images(net):
    records = geneval.make_prompt_set(0, 8)
    rendered = fd.reference_images(records, 2, 32, seed=5)
    noisy = np.clip(rendered + np.random.default_rng(0).normal(0, 0.25, rendered.shape), 0, 1).astype(np.float32)
    scores = {name: fd.fd_scenes(net.net, images, records)
              for name, images in [("rendered", rendered), ("noisy", noisy), ("blank", np.zeros_like(rendered))]}
    assert scores["rendered"]["fd_scenes"] < scores["noisy"]["fd_scenes"] < scores["blank"]["fd_scenes"]
    # Another rendered set is as far from the reference as the floor says rendered sets are.
    assert scores["rendered"]["fd_scenes"] < 2 * scores["rendered"]["fd_scenes_floor"]
    assert scores["blank"]["fd_scenes"] > 5 * scores["blank"]["fd_scenes_floor"]


def test_an_image_side_the_grid_does_not_divide_is_a_clear_error():
    for side in (20, 48, 128):
        with pytest.raises(EcditError, match="16, 32 or 64"):
            fd.train_scene_net(side, images=10, steps=1)


def test_every_supported_side_maps_to_the_same_target_grid():
    # The heads must line up with targets(): one GRID x GRID map whatever the image side.
    from ecdit_cli.data.scenes import COLORS, SHAPES

    for side in (16, 32, 64):
        net = fd.SceneNet(len(COLORS), len(SHAPES), size=side)
        occ, shape, color = net(torch.zeros(2, 3, side, side))
        assert occ.shape[-2:] == shape.shape[-2:] == color.shape[-2:] == (fd.GRID, fd.GRID)
        assert net.features(torch.zeros(2, 3, side, side)).shape == (2, 4 * 2 * fd.WIDTH)
