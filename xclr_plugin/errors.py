"""The errors of xclr-plugin's commands and the one way they reach the user.

Library code raises ``ValueError`` / ``TypeError`` (or :class:`UsageError`, a
``ValueError``) with a message that names the argument, what was expected and what
came. A console command turns any of them into one line, ``prog: error: ...``, on
stderr and exit status 2; a training run stopped by a non-finite loss exits with 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

T = TypeVar("T")

#: Exit status of a configuration or input error (as argparse's).
USAGE_ERROR = 2
#: Exit status of a run stopped by a non-finite loss.
TRAINING_ERROR = 1


class UsageError(ValueError):
    """Bad input to a command, found before long work starts."""


class NonFiniteLossError(RuntimeError):
    """The loss of a training step is NaN or infinite; training stopped before its update."""


def one_line(err: BaseException) -> str:
    """``err``'s message on one line (some messages, e.g. torchvision's, span several).

    An error re-raised from a DataLoader worker carries the worker's traceback: its
    last line holds the original message.
    """
    message = str(err)
    if "\nOriginal Traceback" in message:
        message = message.rsplit(f"{type(err).__name__}: ", 1)[-1]
    return " ".join(message.split()) or type(err).__name__


def print_error(prog: str, err: BaseException | str) -> None:
    """Prints ``prog: error: <message>`` on stderr."""
    message = err if isinstance(err, str) else one_line(err)
    print(f"{prog}: error: {message}", file=sys.stderr)


def exit_status(err: BaseException) -> int:
    """The exit status of a command that stopped with ``err``."""
    return TRAINING_ERROR if isinstance(err, NonFiniteLossError) else USAGE_ERROR


def run_command(
    prog: str,
    body: Callable[[], T],
    errors: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError),
) -> T | int:
    """Runs a command's ``body``; an error of ``errors`` is printed as one line.

    Returns:
        What ``body`` returned, or the exit status after printing the error
        (:data:`TRAINING_ERROR` for :class:`NonFiniteLossError`, else
        :data:`USAGE_ERROR`).
    """
    caught: tuple[type[BaseException], ...] = (*errors, NonFiniteLossError)
    try:
        return body()
    except caught as err:
        print_error(prog, err)
        return exit_status(err)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``prog: error: ... (see prog --help)``."""

    def error(self, message: str) -> NoReturn:
        """Prints the one-line error and exits with :data:`USAGE_ERROR`."""
        self.exit(
            USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n"
        )
