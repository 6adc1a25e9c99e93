"""``xclr-train``: lightly's ``lightly-ssl-train`` with a choice of loss.

The config (``xclr_train.yaml``) is lightly's own plus ``criterion.name`` (a two-view
loss of :mod:`xclr_plugin.registry`, default ``ntxent``), ``captions.*`` and
``trainer.accelerator`` / ``devices`` / ``strategy``. Training is lightly's, built in
its order from the same seed (``ntxent`` reproduces lightly-ssl-train step for step);
a loss with targets gets the caption embeddings or class labels of each batch. Every
config error is found before training: :mod:`.config` (keys), :mod:`.targets` (loss,
captions), :mod:`.images`, :mod:`.training` (batches, trainer, a trial step).

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
from xclr_plugin.integrations.lightly_train.modules import TargetEmbedding
from xclr_plugin.integrations.lightly_train.targets import prepare_targets
from xclr_plugin.integrations.lightly_train.training import TrainResult, train

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
