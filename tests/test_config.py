"""Run configs: resolution order, type checks, and one clear error per bad value."""

import pytest

from ecdit_cli.config import (
    config_from_dict,
    load_run_config,
    overrides_to_dict,
    parse_override,
    resolve_config,
    save_config,
)
from ecdit_cli.errors import ConfigError


def test_resolution_order_is_defaults_then_preset_then_file_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: small\nmodel: {depth: 3}\ntrain: {lr: 0.01}\n")
    cfg = resolve_config(file=f, overrides=["train.lr=2e-3"])
    assert cfg.preset == "small"
    assert cfg.model.hidden_size == 96  # from the preset
    assert cfg.model.depth == 3  # the file wins over the preset
    assert cfg.train.lr == 2e-3  # the override wins over the file
    assert cfg.train.batch_size == 32  # a default


def test_a_saved_config_reads_back_identically(tmp_path):
    cfg = resolve_config(preset="tiny", overrides=["moe.routing=token_choice", "moe.top_k=1"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_run_config(tmp_path) == cfg


def test_override_values_are_parsed_as_yaml():
    assert parse_override("moe.top_k=2") == (["moe", "top_k"], 2)
    assert parse_override("train.lr=1e-3")[1] in ("1e-3", 1e-3)
    assert overrides_to_dict(["a.b=true", "a.c=x"]) == {"a": {"b": True, "c": "x"}}
    assert resolve_config(overrides=["train.lr=1e-3"]).train.lr == 1e-3


@pytest.mark.parametrize("overrides,message", [
    (["moe.top_kk=2"], "unknown config key 'moe.top_kk' (did you mean 'top_k'?)"),
    (["modle.depth=2"], "unknown config key 'modle' (did you mean 'model'?)"),
    (["model.depth=two"], "model.depth='two' is invalid: expected an integer"),
    (["model.depth=2.5"], "model.depth=2.5 is invalid: expected an integer"),
    (["train.lr=fast"], "train.lr='fast' is invalid: expected a number"),
    (["moe.routing=expert"], "moe.routing='expert' is invalid: allowed: dense, token_choice, expert_choice"),
    (["model.num_heads=5"], "model.num_heads=5 is invalid: must divide model.hidden_size=128"),
    (["model.num_kv_heads=3"], "model.num_kv_heads=3 is invalid: must divide model.num_heads=4"),
    (["moe.routing=expert_choice", "moe.num_experts=6", "moe.ep_size=4"], "moe.ep_size=4 is invalid: must divide moe.num_experts=6"),
    (["moe.capacity_factor=0"], "moe.capacity_factor=0.0 is invalid: must be > 0"),
    (["moe.routing=token_choice", "moe.top_k=9"], "moe.top_k=9 is invalid: must be <= moe.num_experts=8"),
    (["model.patch_size=5"], "model.patch_size=5 is invalid: must divide model.input_size=32"),
    (["moe.routing=expert_choice", "moe.group_size=100"], "moe.group_size=100 is invalid: must be a multiple of the tokens per image (64)"),
    (["train.zero_stage=3"], "train.zero_stage=3 is invalid"),
    (["moe.routing=expert_choice", "moe.dense_width_mult=1.5"], "moe.dense_width_mult=1.5 is invalid: only applies to routing=dense"),
    (["preset=smal"], "unknown preset 'smal' (did you mean 'small'?)"),
    (["moe.top_k"], "expected KEY=VALUE"),
    (["train.eval_fd=true"], "train.eval_fd=True is invalid: needs train.eval_every > 0"),
    (["train.eval_guidance_max_t=2"], "train.eval_guidance_max_t=2.0 is invalid: must be in [0, 1]"),
    (["train.eval_seed=-1"], "train.eval_seed=-1 is invalid: must be >= 0"),
])
def test_a_bad_value_gets_one_line_naming_the_key_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError) as err:
        resolve_config(overrides=overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_and_missing_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {depth: 2\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        resolve_config(file=bad)
    with pytest.raises(ConfigError, match="config file not found"):
        resolve_config(file=tmp_path / "nope.yaml")
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        resolve_config(file=lst)


def test_a_run_directory_of_another_format_version_is_refused(tmp_path):
    cfg = resolve_config(preset="debug")
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text().replace("format_version: 1", "format_version: 99")
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match="run format version 99"):
        load_run_config(tmp_path)


def test_scenes_need_rgb_and_a_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="data.source=scenes renders RGB"):
        resolve_config(overrides=["model.in_channels=4"])
    with pytest.raises(ConfigError, match="model must be a mapping"):
        config_from_dict({"model": 3})
