"""Shared fixtures: tiny trained runs of the debug preset (sample / eval / analyze tests)."""

import pytest
import torch

TRAIN_OVERRIDES = ["train.steps=12", "train.batch_size=8", "data.val_size=8", "train.val_every=12",
                   "train.ckpt_every=12", "train.log_every=6", "train.val_timesteps=2", "train.warmup_steps=2",
                   "train.lr=3e-3"]


def train_debug_run(run_dir, routing: str, *extra: str):
    """Train a debug-preset run into `run_dir` (a few seconds on a CPU); returns run_dir."""
    from ecdit_cli.config import resolve_config
    from ecdit_cli.train.loop import train

    cfg = resolve_config(preset="debug", overrides=[f"moe.routing={routing}", *TRAIN_OVERRIDES, *extra])
    threads = torch.get_num_threads()
    try:
        train(cfg, run_dir)
    finally:
        torch.set_num_threads(threads)
    return run_dir


@pytest.fixture(scope="session")
def ec_run(tmp_path_factory):
    """A finished expert-choice run (8 experts, f = 2, per-image routing groups)."""
    return train_debug_run(tmp_path_factory.mktemp("runs") / "ec", "expert_choice")


@pytest.fixture(scope="session")
def tc_run(tmp_path_factory):
    """A finished token-choice run (8 experts, top-2, f = 2)."""
    return train_debug_run(tmp_path_factory.mktemp("runs") / "tc", "token_choice")


@pytest.fixture(scope="session", autouse=True)
def small_fd_network(tmp_path_factory):
    """FD-scenes trains its network on first use (about a minute): the tests train a small one,
    once per session, into a temporary cache instead of the user's."""
    from ecdit_cli.evaluate import fd_scenes as fd

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ECDIT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(fd, "TRAIN_IMAGES", 3000)
        mp.setattr(fd, "TRAIN_STEPS", 300)
        yield


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random stand-ins for pretrained weights (scripts/tiny_pretrained.py): vae/, t5/, clip/."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from fixtures_own_data import tiny_pretrained

    root = tmp_path_factory.mktemp("pretrained")
    return {name: build(root / name) for name, build in (("vae", tiny_pretrained.tiny_vae),
                                                          ("t5", tiny_pretrained.tiny_t5),
                                                          ("clip", tiny_pretrained.tiny_clip))}


@pytest.fixture(scope="session")
def scenes_dir(tmp_path_factory):
    """40 rendered scenes as 000000.png + 000000.txt, ... (scripts/scenes_folder.py)."""
    from fixtures_own_data import scenes_folder

    out = tmp_path_factory.mktemp("own") / "scenes"
    scenes_folder.write_scenes(out, 40)
    return out
