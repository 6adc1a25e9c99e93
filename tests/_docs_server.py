"""A fork server for tests/test_docs.py: the docs' commands without their import cost.

Usage: ``python -P tests/_docs_server.py SOCKET PRELUDE``. The server runs ``PRELUDE``
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

The server itself starts no thread and runs no torch op, so forking it is safe.
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
    path, prelude = sys.argv[1:]
    exec(compile(prelude, "<prelude>", "exec"), {"__name__": "__prelude__"})
    if threading.active_count() > 1:
        print(f"warning: {threading.active_count()} threads before fork", flush=True)
    serve(path)


if __name__ == "__main__":
    main()
