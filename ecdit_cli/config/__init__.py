"""The run config: its typed schema, overrides and presets, and reading and writing it.

- `schema`: one dataclass per owner (model, moe, text, data, train) and `RunConfig`, validated
  on construction;
- `overrides`: `--set key=value` parsing, merging, type-checked building from dicts;
- `presets`: the paper's sizes and the CPU sizes, as functions returning overrides;
- `load`: defaults -> preset -> file -> overrides, and `config.yaml` in and out.

The names below are the package's interface; import them from `ecdit_cli.config`.
"""

from ecdit_cli.config.load import (
    config_changes,
    load_run_config,
    load_yaml,
    resolve_config,
    resolve_named_config,
    save_config,
)
from ecdit_cli.config.overrides import config_from_dict, deep_merge, nest, overrides_to_dict, parse_override
from ecdit_cli.config.presets import PRESETS, preset_overrides
from ecdit_cli.config.schema import (
    ROUTING_ABBREV,
    ROUTINGS,
    VARIANT_DEFAULTS,
    DataConfig,
    ModelConfig,
    MoEConfig,
    RunConfig,
    TextConfig,
    TrainConfig,
)

__all__ = [
    "PRESETS", "ROUTINGS", "ROUTING_ABBREV", "DataConfig", "ModelConfig", "MoEConfig", "RunConfig", "TextConfig",
    "TrainConfig", "VARIANT_DEFAULTS", "config_changes", "config_from_dict", "deep_merge", "load_run_config", "load_yaml", "nest", "overrides_to_dict",
    "parse_override", "preset_overrides", "resolve_config", "resolve_named_config", "save_config",
]
