"""Every ```python and ```bash block of README.md and docs/*.md runs, on tiny data.

One test per block (id ``FILE:LINE``). The blocks of a page run in order in one
folder, a copy of the tiny data of tests/_docs_data.py, as a reader would type them: shell blocks
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

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from _docs_data import CHECKPOINT, TINY_MODEL, write_tiny_data
from _docs_server import prelude, receive, send, write_shims
from _openclip_helpers import TINY_CFG

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = "<!-- docs-test: skip (CI runs this command) -->"
RUN_LANGUAGES = {"python", "bash"}
# Fences that look like Python or shell but would not run: written as python or bash.
FORBIDDEN_LANGUAGES = {"py", "python3", "pycon", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")
TIMEOUT = 300.0
BASH_STATE = '"$DOCS_ROOT/bash_state.sh"'

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


LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of the headings of ``page``."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_links_resolve() -> None:
    """Every relative link of README.md, CONTRIBUTING.md and docs/ names a file (and
    heading) that exists."""
    broken = []
    for page in [*PAGES, ROOT / "CONTRIBUTING.md"]:
        for match in LINK.finditer(page.read_text(encoding="utf-8")):
            target = match["target"]
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists() or (anchor and anchor not in _anchors(file)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


REPO_PATH = re.compile(
    r"`((?:\.ci|benchmarks|docs|tests|upstream|xclr_plugin)/[\w./-]*)`"
)


# Paths in the host repositories: the patches' tests (kept in upstream/*/files/) and
# lightly's own NTXentLoss test module (vendored in tests/vendored/).
HOST_PATHS = {"tests/loss/test_ntx_ent_loss.py"}


def test_repository_paths_exist() -> None:
    """Every repository path the pages name in backticks (`tests/test_loss.py`) exists."""
    missing = [
        f"{page.relative_to(ROOT)}: {match[1]}"
        for page in [*PAGES, ROOT / "CONTRIBUTING.md"]
        for match in REPO_PATH.finditer(page.read_text(encoding="utf-8"))
        if not (ROOT / match[1]).exists()
        and not list(ROOT.glob(f"upstream/*/files/{match[1]}"))
        and match[1] not in HOST_PATHS
    ]
    assert not missing, missing


def test_readme_demo_table_is_the_measured_one() -> None:
    """The README's demo table is the committed result file, figure for figure."""
    table = re.compile(r"^X-CLR demo: .*?^SupCon trains.*?$", re.M | re.S)
    readme = table.search((ROOT / "README.md").read_text(encoding="utf-8"))
    results = ROOT / "benchmarks/results/reproduce_runs/seed0/results.txt"
    measured = table.search(results.read_text(encoding="utf-8"))
    assert readme is not None and measured is not None
    assert readme.group() == measured.group()


# -- the workspace: tiny data, the fork server, the shims --------------------------

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


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    root = tmp_path_factory.mktemp("docs")
    configs = root / "open_clip_configs"
    configs.mkdir()
    (configs / f"{TINY_MODEL}.json").write_text(json.dumps(TINY_CFG))
    write_shims(root / "bin")
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
        # One thread: tiny data gains nothing from more, and on a busy machine the
        # threads' spin-waits cost several times the work (measured: 3-4x CPU time).
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    env.pop("PYTHONPATH", None)
    log = open(root / "server.log", "w+")  # noqa: SIM115 - closed at teardown
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "_docs_server.py"), path,
         prelude(configs)],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
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
