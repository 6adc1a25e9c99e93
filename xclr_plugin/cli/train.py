"""``xclr-train``, a hydra command: a config error prints one line ``xclr-train: error:
...`` and exits with status 2 before training; a non-finite loss exits with 1."""

import sys
from functools import partial

import hydra
from lightly.cli._helpers import fix_hydra_arguments
from omegaconf import DictConfig

from xclr_plugin.errors import run_command
from xclr_plugin.integrations.lightly_train.config import CONFIG_DIR, CONFIG_NAME
from xclr_plugin.integrations.lightly_train.training import fit, prepare


def _run(cfg: DictConfig) -> None:
    plan = run_command("xclr-train", partial(prepare, cfg, is_cli_call=True))
    if isinstance(plan, int):
        sys.exit(plan)
    if isinstance(status := run_command("xclr-train", partial(fit, plan), ()), int):
        sys.exit(status)


# An absolute config path: a file-based config source (no __init__.py needed there).
main = hydra.main(
    **fix_hydra_arguments(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME)
)(_run)

if __name__ == "__main__":
    main()
