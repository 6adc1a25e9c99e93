"""``xclr-train``: lightly's ``lightly-ssl-train`` with a choice of loss.

:mod:`.config` types and checks the config, :mod:`.targets` the images, the loss and
its targets (caption embeddings or class labels), :mod:`.training` builds the run in
lightly-ssl-train's order and fits it.

Examples:
    >>> result = train(load_config(["input_dir=images/", "criterion.name=supcon"]))
"""

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
