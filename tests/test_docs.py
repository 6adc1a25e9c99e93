"""Every ```python and ```bash block of README.md and docs/*.md runs, on tiny data.

One test per block (id ``FILE:LINE``). The blocks of a page run in order in one
folder, a copy of the tiny data set below, as a reader would type them: shell blocks
with ``bash -euo pipefail``, Python blocks in one namespace per page. A test runs the
earlier blocks of its page first if they have not run yet. The only blocks not run are
the README's two set-up commands, which CI itself runs (``.ci/run``); each is marked
``<!-- docs-test: skip (CI runs this command) -->`` and
:func:`test_only_the_setup_commands_are_skipped` holds the list to exactly those two.

The console commands run through a fork server (tests/_docs_server.py) that has the
heavy libraries imported already: each command is a fresh process with the reader's
arguments, folder, environment and streams, but without paying ~15 s of imports; a
``python`` on the PATH does the same for ``python SCRIPT`` / ``-m`` / ``-c``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _docs_server import receive, send
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = "<!-- docs-test: skip (CI runs this command) -->"
RUN_LANGUAGES = {"python", "bash"}
# Fences that look like Python or shell but would not run: written as python or bash.
FORBIDDEN_LANGUAGES = {"py", "python3", "pycon", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")
TIMEOUT = 300.0
BASH_STATE = '"$DOCS_ROOT/bash_state.sh"'

# The open_clip model of the docs' commands (`--model "$MODEL"`): a 32-pixel ViT.
TINY_MODEL = "xclr-docs-tiny"
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 32,
        "layers": 2,
        "width": 64,
        "head_width": 32,
        "patch_size": 8,
    },
    "text_cfg": {
        "context_length": 32,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}
COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle", "cross"]
# Imported once by the fork server: what the docs' commands would each import.
PRELOAD = [
    "torch", "torchvision", "numpy", "pandas", "PIL.Image", "lightly.loss",
    "lightly.data", "lightly.transforms", "lightly.models", "hydra", "omegaconf",
    "pytorch_lightning", "open_clip", "open_clip_train.main", "open_clip_train.data",
    "webdataset", "sentence_transformers", "sklearn.linear_model", "matplotlib.pyplot",
    "scipy.stats", "torch.distributed.run", "xclr_plugin", "xclr_plugin.text",
    "xclr_plugin.captions", "xclr_plugin.cache", "xclr_plugin.data",
    "xclr_plugin.clip_loss", "xclr_plugin.demo",
]  # fmt: skip


# -- the blocks ---------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    skip: bool

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT).as_posix()}:{self.line}"


def read_blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` with a language tag, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None or not match["lang"]:
            if match is not None:  # an untagged fence: skip to its end
                i += 1
                while i < len(lines) and not lines[i].strip().startswith("```"):
                    i += 1
            i += 1
            continue
        indent, start = len(match["indent"]), i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:])
            i += 1
        previous = next(
            (line.strip() for line in reversed(lines[:start]) if line.strip()), ""
        )
        code = "\n".join(body) + "\n"
        blocks.append(Block(page, start + 1, match["lang"], code, previous == SKIP))
        i += 1
    return blocks


ALL_BLOCKS = [b for page in PAGES for b in read_blocks(page)]
RUN_BLOCKS = [b for b in ALL_BLOCKS if b.lang in RUN_LANGUAGES]


def test_only_the_setup_commands_are_skipped() -> None:
    """Exactly the README's two set-up commands are skipped; CI runs the test one."""
    skipped = [b for b in ALL_BLOCKS if b.skip]
    assert [b.page.name for b in skipped] == ["README.md", "README.md"], [
        b.id for b in skipped
    ]
    demo, tests = (b.code.strip() for b in skipped)
    assert all(b.lang == "bash" and "\n" not in b.code.strip() for b in skipped)
    assert demo.endswith("&& xclr-demo") and '-e ".[demo]"' in demo
    assert tests.endswith("&& pytest") and '-e ".[test]"' in tests
    assert demo == tests.replace('".[test]"', '".[demo]"').replace(
        "&& pytest", "&& xclr-demo"
    )
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert tests in ci, ".ci/run must run the README's test command verbatim"


def test_every_example_is_python_or_bash() -> None:
    """No example hides from the docs tests under another language tag."""
    hidden = [b.id for b in ALL_BLOCKS if b.lang in FORBIDDEN_LANGUAGES]
    assert not hidden, f"tag these blocks python or bash: {hidden}"


# -- tiny data ----------------------------------------------------------------------


def _draw(shape: str, color: str, size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    pen = ImageDraw.Draw(image)
    box = (5, 5, size - 5, size - 5)
    if shape == "circle":
        pen.ellipse(box, fill=color)
    elif shape == "square":
        pen.rectangle(box, fill=color)
    elif shape == "triangle":
        pen.polygon([(size // 2, 4), (size - 4, size - 4), (4, size - 4)], fill=color)
    else:
        pen.rectangle((size // 2 - 4, 4, size // 2 + 4, size - 4), fill=color)
        pen.rectangle((4, size // 2 - 4, size - 4, size // 2 + 4), fill=color)
    return image


def _samples() -> list[tuple[Image.Image, str, int]]:
    """16 drawn images with distinct captions and their shape as label."""
    return [
        (_draw(shape, color), f"a {color} {shape} on white", k)
        for k, shape in enumerate(SHAPES)
        for color in COLORS
    ]


def _write_shard(path: Path, rows: list[tuple[str, Image.Image, str]]) -> None:
    """An img2dataset-style shard: KEY.jpg, KEY.txt, KEY.json per sample."""
    with tarfile.open(path, "w") as tar:
        for key, image, caption in rows:
            jpg = io.BytesIO()
            image.save(jpg, format="JPEG", quality=95)
            meta = json.dumps({"key": key, "caption": caption, "status": "success"})
            for ext, data in (("jpg", jpg.getvalue()), ("txt", caption.encode()),
                              ("json", meta.encode())):  # fmt: skip
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))


def write_tiny_data(folder: Path) -> None:
    """The files the docs' examples name, in ``folder``:

    - ``images/``: 16 PNGs (32 px drawn shapes) and a ``captions.csv`` sidecar
      (``filename,caption``);
    - ``train.tsv``: the same images as open_clip reads them (``filepath``, ``title``,
      and an integer ``label``: the shape); ``captions.jsonl`` (``filename``,
      ``caption``);
    - ``classes/<shape>/``: the images in one folder per class;
    - ``shards/00000.tar``, ``shards/00001.tar``: webdataset shards of 8 samples.
    """
    samples = _samples()
    (folder / "images").mkdir(parents=True)
    names = []
    for i, (image, _, label) in enumerate(samples):
        name = f"img{i:02d}.png"
        image.save(folder / "images" / name)
        (folder / "classes" / SHAPES[label]).mkdir(parents=True, exist_ok=True)
        image.save(folder / "classes" / SHAPES[label] / name)
        names.append(name)
    with open(folder / "images" / "captions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "caption"])
        writer.writerows((n, c) for n, (_, c, _) in zip(names, samples, strict=True))
    rows = ["filepath\ttitle\tlabel"] + [
        f"images/{n}\t{c}\t{k}" for n, (_, c, k) in zip(names, samples, strict=True)
    ]
    (folder / "train.tsv").write_text("\n".join(rows) + "\n")
    (folder / "captions.jsonl").write_text(
        "".join(
            json.dumps({"filename": f"images/{n}", "caption": c}) + "\n"
            for n, (_, c, _) in zip(names, samples, strict=True)
        )
    )
    (folder / "shards").mkdir()
    for s in range(2):
        part = samples[8 * s : 8 * s + 8]
        _write_shard(
            folder / "shards" / f"{s:05d}.tar",
            [(f"{s:05d}{i:04d}", image, c) for i, (image, c, _) in enumerate(part)],
        )


# -- the fork server and the shims on the PATH --------------------------------------

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


argv = [TARGET, *sys.argv[1:]] if TARGET else python_argv(sys.argv[1:])
server = os.environ.get("XCLR_DOCS_SERVER")
# The server's modules are imported already: another import path needs a fresh python.
if argv is None or not server or os.environ.get("PYTHONPATH"):
    os.execv(REAL_PYTHON, [REAL_PYTHON, *(argv if TARGET else sys.argv[1:])])
conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
conn.connect(server)
message = {{"kind": "run", "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
           "executable": SELF}}
socket.send_fds(conn, [json.dumps(message).encode()], [0, 1, 2])
reply = conn.recv(1 << 16)
sys.exit(json.loads(reply)["status"] if reply else 1)
'''

CHECKPOINT = """
import os, open_clip, torch
os.makedirs("checkpoints")
model = open_clip.create_model(os.environ["MODEL"])
torch.save({"epoch": 32, "state_dict": model.state_dict()}, "checkpoints/epoch_32.pt")
"""

# Sourced before each shell block: the variables the page's earlier blocks set (as in
# one terminal), and saved again when the block exits.
BASH_STATE_SCRIPT = r"""
__docs_baseline=" $(compgen -v | tr '\n' ' ') "
if [ -f "$DOCS_STATE" ]; then . "$DOCS_STATE"; fi
__docs_save() {
  local name
  for name in $(compgen -v); do
    case "$__docs_baseline" in *" $name "*) continue ;; esac
    case "$name" in __docs_* | name) continue ;; esac
    declare -p "$name"
  done > "$DOCS_STATE.new" 2> /dev/null || true
  mv "$DOCS_STATE.new" "$DOCS_STATE"
}
trap __docs_save EXIT
"""

# Console commands the docs run (looked up in the venv's bin/), and python itself.
COMMANDS = ["xclr-demo", "xclr-train", "xclr-openclip-train", "xclr-embed-captions",
            "torchrun"]  # fmt: skip


def _write_shims(bin_dir: Path) -> None:
    bin_dir.mkdir()
    venv_bin = Path(sys.executable).parent
    for name in [*COMMANDS, "python", "python3"]:
        target = None if name.startswith("python") else str(venv_bin / name)
        path = bin_dir / name
        path.write_text(SHIM.format(python=sys.executable, name=name, target=target))
        path.chmod(0o755)


@dataclass
class Workspace:
    root: Path
    data: Path
    env: dict[str, str]
    server: str
    pages: dict[Path, PageRun] = field(default_factory=dict)

    def page(self, page: Path) -> PageRun:
        if page not in self.pages:
            folder = self.root / "pages" / page.stem
            shutil.copytree(self.data, folder, symlinks=True)
            self.pages[page] = PageRun(self, folder)
        return self.pages[page]


def _prelude(configs: Path) -> str:
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


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    root = tmp_path_factory.mktemp("docs")
    configs = root / "open_clip_configs"
    configs.mkdir()
    (configs / f"{TINY_MODEL}.json").write_text(json.dumps(TINY_CONFIG))
    _write_shims(root / "bin")
    (root / "bash_state.sh").write_text(BASH_STATE_SCRIPT)
    path = str(root / "server.sock")
    env = {
        **os.environ,
        "PATH": os.pathsep.join(
            [str(root / "bin"), str(Path(sys.executable).parent), os.environ["PATH"]]
        ),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "XCLR_DOCS_SERVER": path,
        "DOCS_ROOT": str(root),
        "MODEL": TINY_MODEL,
        "GPUS": "1",
        # The repository, for the pages that show its own files (upstream, benchmarks).
        "XCLR": str(ROOT),
    }
    env.pop("PYTHONPATH", None)
    log = open(root / "server.log", "w+")  # noqa: SIM115 - closed at teardown
    server = subprocess.Popen(
        [sys.executable, "-P", str(Path(__file__).parent / "_docs_server.py"), path,
         _prelude(configs)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    data = root / "data"
    write_tiny_data(data)
    # The repository's own files that pages run: upstream/ is read only; the benchmark
    # scripts are copied, so that they write their results here.
    (data / "upstream").symlink_to(ROOT / "upstream")
    (data / "benchmarks").mkdir()
    for script in (ROOT / "benchmarks").glob("*.py"):
        shutil.copy(script, data / "benchmarks")
    deadline = time.monotonic() + TIMEOUT
    while "ready" not in (root / "server.log").read_text().splitlines():
        if server.poll() is not None or time.monotonic() > deadline:
            pytest.fail(
                f"docs server did not start:\n{(root / 'server.log').read_text()}"
            )
        time.sleep(0.1)
    # checkpoints/epoch_32.pt: "your checkpoint" of $MODEL in the open_clip examples.
    subprocess.run(
        [str(root / "bin" / "python"), "-c", CHECKPOINT], cwd=data, env=env, check=True
    )
    ws = Workspace(root, data, env, path)
    try:
        yield ws
    finally:
        for run in ws.pages.values():
            run.close()
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        log.close()


class PageRun:
    """One page's blocks, run in order in one folder and one Python namespace."""

    def __init__(self, workspace: Workspace, folder: Path) -> None:
        self.workspace, self.folder = workspace, folder
        self.results: dict[int, str | None] = {}  # line -> error (None: passed)
        self.session: socket.socket | None = None

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def run(self, block: Block) -> str | None:
        """Runs ``block`` once (and the page's earlier blocks first); its error."""
        blocks = [
            b for b in read_blocks(block.page) if b.lang in RUN_LANGUAGES and not b.skip
        ]
        for earlier in blocks:
            if earlier.line >= block.line:
                break
            self._once(earlier)
        error = self._once(block)
        if block.line == blocks[-1].line:  # the page is done: end its Python session
            self.close()
        return error

    def _once(self, block: Block) -> str | None:
        if block.line not in self.results:
            runner = self._bash if block.lang == "bash" else self._python
            self.results[block.line] = runner(block)
        return self.results[block.line]

    def _output(self, block: Block) -> Path:
        logs = self.workspace.root / "logs"
        logs.mkdir(exist_ok=True)
        return logs / f"{block.page.stem}-{block.line}.log"

    def _bash(self, block: Block) -> str | None:
        script = self._output(block).with_suffix(".sh")
        script.write_text(block.code)
        state = self.workspace.root / "logs" / f"{block.page.stem}.vars"
        env = {**self.workspace.env, "DOCS_STATE": str(state)}
        try:
            out = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", f". {BASH_STATE}; . {shlex.quote(str(script))}"],
                cwd=self.folder, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                timeout=TIMEOUT, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as err:
            output = (
                err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout
            )
            return f"timed out after {TIMEOUT:.0f} s:\n{output}"
        print(out.stdout)
        return None if out.returncode == 0 else f"exit {out.returncode}:\n{out.stdout}"

    def _python(self, block: Block) -> str | None:
        if self.session is None:
            self.session = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.session.connect(self.workspace.server)
            env = self.workspace.env
            send(self.session, {"kind": "session", "cwd": str(self.folder), "env": env})
        log = self._output(block)
        with open(log, "w") as out:
            message = {"code": block.code, "path": str(block.page), "line": block.line}
            socket.send_fds(
                self.session, [json.dumps(message).encode()], [out.fileno()] * 2
            )
            self.session.settimeout(TIMEOUT)
            try:
                reply, _ = receive(self.session)
            except TimeoutError:
                return f"timed out after {TIMEOUT:.0f} s:\n{log.read_text()}"
        print(log.read_text())
        if reply is None:
            return f"the Python session died:\n{log.read_text()}"
        error: str | None = reply["error"]
        return None if error is None else f"{log.read_text()}\n{error}"


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b.id for b in RUN_BLOCKS])
def test_example_runs(block: Block, workspace: Workspace) -> None:
    if block.skip:
        pytest.skip("CI runs this command (.ci/run)")
    run = workspace.page(block.page)
    error = run.run(block)
    if error is not None:
        failed_before = [
            line for line, err in run.results.items() if err and line < block.line
        ]
        note = (
            f" (earlier blocks failed: lines {failed_before})" if failed_before else ""
        )
        pytest.fail(f"{block.id}{note}:\n{error[-6000:]}", pytrace=False)
