"""``xclr-demo``: X-CLR next to SimCLR, SupCon and two CLIPs, on a laptop CPU.

Modules top-down: ``config``, ``animals``/``twemoji`` (the built-in data), ``data``,
``models``, ``training``, ``evaluation``, ``report`` and ``cli`` (the command).
"""

from xclr_plugin.demo.cli import (
    RESULTS_JSON,
    RESULTS_PNG,
    RESULTS_TXT,
    build_parser,
    check_output,
    main,
    run_demo,
)
from xclr_plugin.demo.config import (
    DEFAULT_METHODS,
    DEFAULT_TASKS,
    METHODS,
    TASKS,
    DemoConfig,
    MethodSpec,
    config_from_args,
)
from xclr_plugin.demo.data import TaskData, dense_labels, load_task

__all__ = [
    "DEFAULT_METHODS", "DEFAULT_TASKS", "METHODS", "RESULTS_JSON", "RESULTS_PNG",
    "RESULTS_TXT", "TASKS", "DemoConfig", "MethodSpec", "TaskData", "build_parser",
    "check_output", "config_from_args", "dense_labels", "load_task", "main", "run_demo",
]  # fmt: skip
