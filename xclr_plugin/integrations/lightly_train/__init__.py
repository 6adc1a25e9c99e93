"""``xclr-train``, lightly-ssl-train with a choice of loss: :mod:`.config` types the
config, :mod:`.targets` checks images, loss and targets, :mod:`.training` runs it."""

from xclr_plugin.integrations.lightly_train.config import (
    CONFIG_DIR,
    CONFIG_NAME,
    TrainConfig,
    load_config,
    parse_config,
)
from xclr_plugin.integrations.lightly_train.targets import prepare_targets
from xclr_plugin.integrations.lightly_train.training import (
    TargetEmbedding,
    TrainResult,
    train,
)

__all__ = [
    "CONFIG_DIR",
    "CONFIG_NAME",
    "TargetEmbedding",
    "TrainConfig",
    "TrainResult",
    "load_config",
    "parse_config",
    "prepare_targets",
    "train",
]
