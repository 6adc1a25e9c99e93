"""A fork server for tests/test_docs.py: the docs' commands without their import cost.

Usage: ``python tests/_docs_server.py SOCKET PRELUDE``. The server runs ``PRELUDE``
(Python code: the imports every docs command pays for, torch, lightly, open_clip,
sentence-transformers, Lightning, ...) once, then serves requests on the Unix socket
``SOCKET``, each answered by a child forked from that warm process:

- ``{"kind": "run", "argv", "cwd", "env", "executable"}`` with the caller's stdin,
  stdout and stderr attached: the child runs ``argv`` as ``python ARGV...`` would
  (``SCRIPT ARGS``, ``-m MODULE ARGS`` or ``-c CODE ARGS``; a console command is its
  script in the venv's ``bin/``) in that folder and environment, with those files as
  its standard streams; the server replies ``{"status": N}`` (the exit status,
  ``128 + signal`` if it was killed). ``sys.executable`` is ``executable`` (the
  docs' ``python`` shim), so the processes a command starts are served here too.
- ``{"kind": "session", "cwd", "env"}``: a child that runs the ``{"code", "path",
  "line"}`` blocks it is sent, in order, in one namespace (one docs page), each with
  the stdout and stderr sent along with it, and replies ``{"error": TRACEBACK}`` or
  ``{"error": null}``.

The server itself starts no thread and runs no torch op, so forking it is safe. The
client side is here too: :func:`write_shims` writes the commands the docs run (and
``python``) as tiny scripts that send their request and exit with its status;
:func:`prelude` is what the server imports.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import runpy
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

MAX_MESSAGE = 1 << 20


def receive(conn: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the file descriptors sent with it (None: the peer closed)."""
    data, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 8)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    message: dict[str, Any] = json.loads(data)
    return message, fds


def send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode())


def _attach(fds: list[int]) -> None:
    """Makes ``fds`` (stdin, stdout, stderr or stdout, stderr) this process's streams."""
    targets = [0, 1, 2] if len(fds) == 3 else [1, 2]
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, target in zip(fds, targets, strict=True):
        os.dup2(fd, target)
        os.close(fd)


def _enter(message: dict[str, Any]) -> None:
    """Folder and environment of the request, default signal handlers."""
    for number in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_DFL)
    os.chdir(message["cwd"])
    os.environ.clear()
    os.environ.update(message["env"])


def _exit_code(err: SystemExit) -> int:
    if err.code is None:
        return 0
    if isinstance(err.code, int):
        return err.code
    print(err.code, file=sys.stderr)
    return 1


def _run_argv(argv: list[str]) -> int:
    """Runs ``argv`` as ``python ARGV`` would and returns its exit status."""
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path.insert(0, "")
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as err:
        return _exit_code(err)
    except KeyboardInterrupt:
        traceback.print_exc()
        return 130
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _finish(code: int) -> None:
    """Exits the child as the interpreter would: atexit handlers, flushed streams."""
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    with contextlib.suppress(BaseException):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _session(conn: socket.socket) -> None:
    """Runs the blocks of one page in one namespace until the peer closes."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    sys.path.insert(0, "")
    while True:
        message, fds = receive(conn)
        if message is None:
            return
        _attach(fds)
        # Blank lines in front: tracebacks name the line of the page itself.
        source = "\n" * message["line"] + message["code"]
        error = None
        try:
            exec(compile(source, message["path"], "exec"), namespace)
        except BaseException:
            error = traceback.format_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        send(conn, {"error": error})


def _child(conn: socket.socket, others: list[int], message: dict[str, Any]) -> None:
    for fd in others:
        with contextlib.suppress(OSError):
            os.close(fd)
    _enter(message)
    if message["kind"] == "session":
        try:
            _session(conn)
        finally:
            _finish(0)
    sys.executable = message["executable"]
    code = _run_argv(message["argv"])
    _finish(code)


def serve(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    # pid -> (connection awaiting its status, what it runs, when it started)
    waiting: dict[int, tuple[socket.socket | None, str, float]] = {}
    parent = os.getppid()
    print("ready", flush=True)
    while os.getppid() == parent:
        for _ in selector.select(timeout=0.05):
            conn, _ = listener.accept()
            message, fds = receive(conn)
            if message is None:
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                others = [listener.fileno()]
                others += [c.fileno() for c, _, _ in waiting.values() if c is not None]
                if message["kind"] == "run":
                    _attach(fds)
                _child(conn, others, message)
            for fd in fds:
                os.close(fd)
            if message["kind"] == "run":
                what = " ".join(message["argv"])[:100]
                waiting[pid] = (conn, what, time.monotonic())
            else:
                conn.close()
                waiting[pid] = (
                    None,
                    f"python session in {message['cwd']}",
                    time.monotonic(),
                )
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in waiting:
                client, what, start = waiting.pop(pid)
                code = os.waitstatus_to_exitcode(status)
                code = code if code >= 0 else 128 - code
                if client is not None:
                    with contextlib.suppress(OSError):
                        send(client, {"status": code})
                    client.close()
                cpu = usage.ru_utime + usage.ru_stime
                wall = time.monotonic() - start
                print(f"[{wall:5.1f} s wall {cpu:5.1f} s cpu] exit {code}: {what}")
                sys.stdout.flush()


def main() -> None:
    # Not this file's folder: each request puts its own first on the path.
    here = os.path.dirname(os.path.realpath(__file__))
    if sys.path and os.path.realpath(sys.path[0]) == here:
        del sys.path[0]
    path, prelude = sys.argv[1:]
    exec(compile(prelude, "<prelude>", "exec"), {"__name__": "__prelude__"})
    if threading.active_count() > 1:
        print(f"warning: {threading.active_count()} threads before fork", flush=True)
    serve(path)


# -- the client side: shims on the PATH, the server's prelude ------------------------

# Imported once by the fork server: what the docs' commands would each import.
PRELOAD = [
    "torch", "torchvision", "numpy", "pandas", "PIL.Image", "lightly.loss",
    "lightly.data", "lightly.transforms", "lightly.models", "hydra", "omegaconf",
    "pytorch_lightning", "open_clip", "open_clip_train.main", "open_clip_train.data",
    "webdataset", "sentence_transformers", "sklearn.linear_model", "matplotlib.pyplot",
    "scipy.stats", "torch.distributed.run", "xclr_plugin", "xclr_plugin.text",
    "xclr_plugin.captions", "xclr_plugin.cache", "xclr_plugin.data",
    "xclr_plugin.clip_loss", "xclr_plugin.demo", "timm", "efficientnet_lite_pytorch",
    "xclr_plugin.integrations.open_clip_train.pretrained",
]  # fmt: skip


def prelude(configs: Path) -> str:
    """The code the server runs first: imports, and the tiny open_clip model."""
    return (
        "import importlib, sys, importlib.metadata as md\n"
        f"names = {PRELOAD!r}\n"
        "names += [ep.module for ep in md.entry_points(group='console_scripts')\n"
        "          if ep.dist is not None and ep.dist.name == 'xclr-plugin']\n"
        "for name in names:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        print(f'preload {name}: {err!r}', file=sys.stderr)\n"
        "import open_clip\n"
        f"open_clip.add_model_config({str(configs)!r})\n"
    )


SHIM = '''#!{python} -S
"""Docs tests: runs `{name}` in the warm fork server (tests/_docs_server.py)."""
import json, os, socket, sys

REAL_PYTHON = {python!r}
TARGET = {target!r}  # a console script; None: this is `python`
SELF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python")
BARE = {{"-u", "-B", "-s", "-S", "-E", "-O", "-OO", "-q", "-I", "-P"}}


def python_argv(args):
    """`python ARGS` as SCRIPT/-m/-c ARGS, or None for what the server does not do."""
    i = 0
    while i < len(args):
        if args[i] in BARE:
            i += 1
        elif args[i] in ("-W", "-X"):
            i += 2
        elif args[i] in ("-m", "-c"):
            return args[i:] if i + 1 < len(args) else None
        elif args[i] == "-":
            return ["-c", sys.stdin.read(), *args[i + 1:]]
        elif args[i].startswith("-"):
            return None
        else:
            return args[i:]
    return None


server = os.environ.get("XCLR_DOCS_SERVER")
# The server's modules are imported already: another import path needs a fresh python.
fresh = not server or os.environ.get("PYTHONPATH")
argv = None if fresh else [TARGET, *sys.argv[1:]] if TARGET else python_argv(sys.argv[1:])
if argv is None:
    os.execv(REAL_PYTHON, [REAL_PYTHON, *([TARGET] if TARGET else []), *sys.argv[1:]])
conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
conn.connect(server)
message = {{"kind": "run", "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
           "executable": SELF}}
socket.send_fds(conn, [json.dumps(message).encode()], [0, 1, 2])
reply = conn.recv(1 << 16)
sys.exit(json.loads(reply)["status"] if reply else 1)
'''

# Console commands the docs run (looked up in the venv's bin/), and python itself.
COMMANDS = ["xclr-demo", "xclr-train", "xclr-openclip-train", "xclr-embed-captions",
            "xclr-build-pretrained", "xclr-wise-ft", "torchrun"]  # fmt: skip


def write_shims(bin_dir: Path) -> None:
    bin_dir.mkdir()
    venv_bin = Path(sys.executable).parent
    for name in [*COMMANDS, "python", "python3"]:
        target = None if name.startswith("python") else str(venv_bin / name)
        path = bin_dir / name
        path.write_text(SHIM.format(python=sys.executable, name=name, target=target))
        path.chmod(0o755)


if __name__ == "__main__":
    main()
