"""Typed configuration: YAML + dotted CLI overrides -> dataclasses, validated before any model exists."""

from bft_megatron.config.base import ConfigError, apply_overrides, from_dict, to_dict
from bft_megatron.config.schema import (CheckpointConfig, Config, DataConfig, LoggingConfig, LossConfig, ModelConfig,
                                        ParallelConfig, RopeScaling, TrainConfig, load_config)
from bft_megatron.config.paths import check_paths
from bft_megatron.config.validate import Layout, config_warnings, validate

__all__ = ["ConfigError", "apply_overrides", "from_dict", "to_dict", "Config", "ModelConfig", "ParallelConfig",
           "TrainConfig", "LossConfig", "DataConfig", "CheckpointConfig", "LoggingConfig", "RopeScaling",
           "load_config", "Layout", "validate", "check_paths", "config_warnings"]
