"""``xclr-demo``: X-CLR next to SimCLR, SupCon and two CLIPs, on a laptop CPU.

Read it top-down, one module per concern:

1. :mod:`~xclr_plugin.demo.config`: the tasks (the paper's two regimes), the methods,
   and every setting of a run (:class:`DemoConfig`).
2. :mod:`~xclr_plugin.demo.data`: each task's images, descriptions and fixed split
   (Animal-MNIST with class names, Twemoji with emoji names, or your own files).
3. :mod:`~xclr_plugin.demo.models`: the encoder every method trains and each
   method's objective (losses from :mod:`xclr_plugin.registry`).
4. :mod:`~xclr_plugin.demo.training`: one training run, identical for every method.
5. :mod:`~xclr_plugin.demo.evaluation`: linear probe (on all and on few labels), kNN
   and how well the embedding follows the descriptions' similarity structure, on
   held-out images.
6. :mod:`~xclr_plugin.demo.report`: the table and the figure.
7. :mod:`~xclr_plugin.demo.cli`: the command, which runs the steps in this order.
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
)
from xclr_plugin.demo.data import TaskData, dense_labels, load_task

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_TASKS",
    "METHODS",
    "RESULTS_JSON",
    "RESULTS_PNG",
    "RESULTS_TXT",
    "TASKS",
    "DemoConfig",
    "MethodSpec",
    "TaskData",
    "build_parser",
    "check_output",
    "dense_labels",
    "load_task",
    "main",
    "run_demo",
]
