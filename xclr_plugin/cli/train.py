"""``xclr-train``: ``lightly-ssl-train`` plus ``criterion.name``, a hydra command.

    xclr-train input_dir=images/ pre_trained=False            # as lightly-ssl-train
    xclr-train input_dir=images/ criterion.name=xclr          # images/captions.csv
    xclr-train input_dir=train/ criterion.name=supcon trainer.accelerator=cpu \\
        trainer.devices=2 trainer.strategy=ddp criterion.gather_distributed=true

A config error prints one line ``xclr-train: error: ...`` and exits with status 2
before training; a non-finite loss exits with status 1.
"""

from __future__ import annotations

import sys

import hydra
from lightly.cli._helpers import fix_hydra_arguments
from omegaconf import DictConfig

from xclr_plugin.errors import run_command
from xclr_plugin.integrations.lightly_train.config import CONFIG_DIR, CONFIG_NAME
from xclr_plugin.integrations.lightly_train.training import fit, prepare


def _run(cfg: DictConfig) -> None:
    """Config errors before training (status 2), then only a non-finite loss (1)."""
    plan = run_command("xclr-train", lambda: prepare(cfg, is_cli_call=True))
    if isinstance(plan, int) or isinstance(
        plan := run_command("xclr-train", lambda: fit(plan), errors=()), int
    ):
        sys.exit(plan)


# An absolute config path: a file-based config source (no __init__.py needed there).
main = hydra.main(
    **fix_hydra_arguments(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME)
)(_run)

if __name__ == "__main__":
    main()
