#!/usr/bin/env python3
"""Generate the upstream patches for lightly and open_clip from this repository's code.

- ``upstream/lightly/xclr.patch`` (against lightly master ``LIGHTLY_COMMIT``): the new
  files are ``upstream/lightly/files/`` as they are (its plain-autograd
  ``lightly/loss/xclr_loss.py`` is tested equal to ``xclr_plugin``'s kernel, values and
  gradients, in ``tests/test_upstream.py``: one definition of the loss); the export in
  ``lightly/loss/__init__.py``, the API docs entry, the examples toctree entry and the
  README row are anchored insertions into master's copies in ``upstream/lightly/base/``.
- ``upstream/open_clip/xclr.patch`` (against open_clip_torch 3.3.0): ``XCLRClipLoss``
  of ``xclr_plugin/clip_loss.py`` and every helper it uses (found by following the
  names it references through ``clip_loss``, ``functional`` and ``loss``), generated:
  appended to ``src/open_clip/loss.py`` in open_clip's conventions (``torch.Tensor``,
  ``Optional``), plus anchored edits of ``factory.py``, ``params.py`` and
  ``open_clip/__init__.py`` read from the installed release; the test is copied from
  ``upstream/open_clip/files/``.

Patches carry full blob ids (as ``git diff --full-index``), so ``git apply --3way``
works on a host that moved on.

Usage: ``python upstream/generate.py`` writes the patches; ``--check`` writes nothing
and exits 1 if a committed patch differs from what the sources give (drift).
"""

from __future__ import annotations

import argparse
import ast
import builtins
import difflib
import hashlib
import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ROOT / "upstream"
PLUGIN = ROOT / "xclr_plugin"

OPEN_CLIP_VERSION = "3.3.0"


class GenerateError(Exception):
    """A source no longer fits a transform (an anchor moved, a new dependency...)."""


@dataclass(frozen=True)
class FileChange:
    path: str  # relative to the host repository's root
    old: str | None  # None: a new file
    new: str


# -- helpers -------------------------------------------------------------------------


def installed_root(package: str) -> Path:
    """The folder holding the installed ``package`` (site-packages), without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise GenerateError(f"{package} is not installed in {sys.executable}.")
    return Path(spec.origin).parent.parent


def require_version(dist: str, version: str) -> None:
    found = importlib.metadata.version(dist)
    if found != version:
        raise GenerateError(
            f"the patches target {dist}=={version}, but {found} is installed."
        )


def insert_after(text: str, anchor: str, addition: str, *, what: str) -> str:
    """Inserts ``addition`` right after the single occurrence of ``anchor``."""
    if text.count(anchor) != 1:
        raise GenerateError(
            f"{what}: anchor {anchor!r} found {text.count(anchor)} times, expected once."
        )
    return text.replace(anchor, anchor + addition)


def replace_once(text: str, old: str, new: str, *, what: str) -> str:
    if text.count(old) != 1:
        raise GenerateError(
            f"{what}: {old!r} found {text.count(old)} times, expected once."
        )
    return text.replace(old, new)


def read_exact(path: Path) -> str:
    """The file's text with its line endings as they are (the blob ids depend on them)."""
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise GenerateError(f"{path} is missing.") from None


def blob_id(text: str) -> str:
    """Git's object id of a file with this content."""
    data = text.encode("utf-8")
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def unified_patch(changes: list[FileChange]) -> str:
    """A ``git apply``-able patch (also ``patch -p1``) of the changes, in order."""
    out: list[str] = []
    for change in changes:
        a_lines = [] if change.old is None else change.old.splitlines(keepends=True)
        b_lines = change.new.splitlines(keepends=True)
        out.append(f"diff --git a/{change.path} b/{change.path}\n")
        # Full blob ids, as `git diff --full-index` writes them: `git apply --3way`
        # can then merge the patch into a host that moved on.
        new_id = blob_id(change.new)
        if change.old is None:
            out.append("new file mode 100644\n")
            out.append(f"index {'0' * 40}..{new_id}\n")
        else:
            out.append(f"index {blob_id(change.old)}..{new_id} 100644\n")
        diff = list(
            difflib.unified_diff(
                a_lines,
                b_lines,
                fromfile="/dev/null" if change.old is None else f"a/{change.path}",
                tofile=f"b/{change.path}",
                n=3,
            )
        )
        if not diff:
            raise GenerateError(f"{change.path}: no change.")
        out.extend(diff)
    return "".join(out)


def line_offsets(text: str) -> list[int]:
    """Offset of the start of each line (1-based line numbers index offsets[n-1])."""
    offsets = [0]
    for line in text.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    return offsets


# -- lightly ---------------------------------------------------------------------------

LIGHTLY_COMMIT = "e8d317fc5a87f4387a85a35e689869039ec249ee"  # master, 2026-08-21


def colab_badges(name: str) -> str:
    """The README table's two "Open In Colab" cells of an example's notebooks."""
    badge = "[![Open In Colab](https://img.shields.io/badge/Colab-{label}-blue?logo=googlecolab)]"
    link = "(https://colab.research.google.com/github/lightly-ai/lightly/blob/master/examples/notebooks/{kind}/{name}.ipynb)"
    return " | ".join(
        badge.format(label=label) + link.format(kind=kind, name=name)
        for label, kind in (
            ("PyTorch", "pytorch"),
            ("PyTorch_Lightning", "pytorch_lightning"),
        )
    )


AIM_ROW = (
    "| AIM            | 2024 | [paper](https://arxiv.org/abs/2401.08541) | "
    "[docs](https://docs.lightly.ai/self-supervised-learning/examples/aim.html) | "
    + colab_badges("aim")
    + " | <!-- 16/01/2024 -->\n"
)


def lightly_changes() -> list[FileChange]:
    """The pull request against lightly master at ``LIGHTLY_COMMIT``.

    Every new file is ``upstream/lightly/files/`` as is (the loss there is tested equal
    to ``xclr_plugin``'s); the files it edits are master's copies in
    ``upstream/lightly/base/``, changed by anchored insertions.
    """
    base = UPSTREAM / "lightly" / "base"
    files = UPSTREAM / "lightly" / "files"
    edits = {
        "lightly/loss/__init__.py": (
            "from lightly.loss.wmse_loss import Whitening2d, WMSELoss\n",
            "from lightly.loss.xclr_loss import XCLRLoss\n",
        ),
        "docs/source/lightly.loss.rst": (
            ".. autoclass:: lightly.loss.visreg_loss.VISRegLoss\n"
            "   :members:\n"
            "   :special-members: __init__\n",
            "\n.. autoclass:: lightly.loss.xclr_loss.XCLRLoss\n   :members:\n",
        ),
        "docs/source/examples/models.rst": ("    vicregl.rst\n", "    xclr.rst\n"),
        # The model table is ordered by the papers' arXiv dates (the trailing comment).
        "README.md": (
            AIM_ROW,
            "| X-CLR          | 2024 | [paper](https://arxiv.org/abs/2407.18134) | "
            "[docs](https://docs.lightly.ai/self-supervised-learning/examples/xclr.html) | "
            + colab_badges("xclr")
            + " | <!-- 25/07/2024 -->\n",
        ),
    }
    changes = []
    for path, (anchor, addition) in edits.items():
        old = read_exact(base / path)
        changes.append(
            FileChange(path, old, insert_after(old, anchor, addition, what=path))
        )
    for new in sorted(p for p in files.rglob("*") if p.is_file()):
        path = new.relative_to(files).as_posix()
        changes.append(FileChange(path, None, read_exact(new)))
    return sorted(changes, key=lambda change: change.path)  # git diff's order


# -- open_clip -------------------------------------------------------------------------

#: Replacements for helpers whose plugin version uses lightly (open_clip must not).
#: In open_clip's loss.py ``dist`` is ``torch.distributed``.
OPEN_CLIP_OVERRIDES = {
    "gather_without_grad": '''def gather_without_grad(tensor: Tensor) -> Tensor:
    """Concatenates ``tensor`` from all processes along dim 0, without gradient.

    The descriptions (caption embeddings, labels) take no gradient, so a plain
    ``all_gather`` suffices.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts, dim=0)
''',
}

#: Names the generated code may use from open_clip's loss.py namespace (after the
#: import edits below) or from the builtins.
OPEN_CLIP_NAMESPACE = {
    "torch",
    "nn",
    "F",
    "dist",
    "Optional",
    "Union",
    "Tensor",  # rewritten to torch.Tensor
    "ClipLoss",
    "gather_features",
}

PLUGIN_MODULES = ("clip_loss", "functional", "validation", "two_view", "distributed")


@dataclass
class ModuleInfo:
    source: str
    defs: dict[str, ast.stmt]  # top-level functions, classes, assignments
    imports: dict[str, tuple[str, str]]  # local name -> (module, name)


def read_module(name: str) -> ModuleInfo:
    source = (PLUGIN / f"{name}.py").read_text()
    tree = ast.parse(source)
    defs: dict[str, ast.stmt] = {}
    imports: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defs[node.target.id] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    defs[target.id] = node
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                imports[alias.asname or alias.name] = (node.module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                imports[alias.asname or alias.name] = (alias.name, "")
    return ModuleInfo(source, defs, imports)


def referenced_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def segment_with_comments(module: ModuleInfo, node: ast.stmt) -> str:
    """The definition's source with its decorators and the comment lines above it."""
    lines = module.source.splitlines(keepends=True)
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    while first > 1 and lines[first - 2].lstrip().startswith("#"):
        first -= 1
    assert node.end_lineno is not None
    return "".join(lines[first - 1 : node.end_lineno])


def pep604_to_typing(source: str) -> str:
    """``X | None`` -> ``Optional[X]`` and ``X | Y`` -> ``Union[X, Y]`` in annotations:
    open_clip supports Python 3.9, which evaluates annotations at definition time."""
    tree = ast.parse(source)
    annotations: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for arg in [
                *args.posonlyargs,
                *args.args,
                *args.kwonlyargs,
                *([args.vararg] if args.vararg else []),
                *([args.kwarg] if args.kwarg else []),
            ]:
                if arg.annotation is not None:
                    annotations.append(arg.annotation)
            if node.returns is not None:
                annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
    unions: list[ast.BinOp] = []
    for annotation in annotations:
        for sub in ast.walk(annotation):
            if isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.BitOr):
                unions.append(sub)
    # Outermost unions only; their operands are converted recursively.
    inner = {id(u) for outer in unions for u in ast.walk(outer) if u is not outer}
    offsets = line_offsets(source)

    def span(node: ast.expr) -> tuple[int, int]:
        assert node.end_lineno is not None and node.end_col_offset is not None
        return (
            offsets[node.lineno - 1] + node.col_offset,
            offsets[node.end_lineno - 1] + node.end_col_offset,
        )

    def convert(node: ast.expr) -> str:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            parts: list[ast.expr] = []

            def flatten(n: ast.expr) -> None:
                if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr):
                    flatten(n.left)
                    flatten(n.right)
                else:
                    parts.append(n)

            flatten(node)
            texts = [
                convert(p)
                for p in parts
                if not (isinstance(p, ast.Constant) and p.value is None)
            ]
            inner_text = texts[0] if len(texts) == 1 else f"Union[{', '.join(texts)}]"
            return f"Optional[{inner_text}]" if len(texts) < len(parts) else inner_text
        start, stop = span(node)
        text = source[start:stop]
        # Unions nested in a subscript, e.g. tuple[Tensor | None, ...].
        subs = [
            u
            for u in ast.walk(node)
            if isinstance(u, ast.BinOp) and isinstance(u.op, ast.BitOr)
        ]
        nested = {id(u) for o in subs for u in ast.walk(o) if u is not o}
        subs = [u for u in subs if id(u) not in nested]
        for sub in sorted(subs, key=lambda u: span(u)[0], reverse=True):
            s0, s1 = span(sub)
            text = text[: s0 - start] + convert(sub) + text[s1 - start :]
        return text

    outer = [u for u in unions if id(u) not in inner]
    for union in sorted(outer, key=lambda u: span(u)[0], reverse=True):
        s0, s1 = span(union)
        source = source[:s0] + convert(union) + source[s1:]
    return source


def open_clip_loss_block() -> tuple[str, set[str], set[str]]:
    """``XCLRClipLoss`` and its helpers, in open_clip's conventions; and the typing
    names and standard-library modules they need imported."""
    modules = {name: read_module(name) for name in PLUGIN_MODULES}

    def resolve(module: str, name: str) -> tuple[str, str] | None:
        info = modules[module]
        if name in info.defs:
            return module, name
        if name in info.imports:
            source_module, original = info.imports[name]
            if source_module.startswith("xclr_plugin."):
                target = source_module.split(".", 1)[1]
                if target not in modules:
                    raise GenerateError(
                        f"XCLRClipLoss depends on xclr_plugin.{target}.{original}; "
                        "add the module to PLUGIN_MODULES or an override."
                    )
                return resolve(target, original)
        return None

    order: list[tuple[str, str]] = []
    external: set[str] = set()
    todo = [("clip_loss", "XCLRClipLoss")]
    while todo:
        item = todo.pop(0)
        if item in order:
            continue
        module, name = item
        order.append(item)
        if name in OPEN_CLIP_OVERRIDES:
            node: ast.AST = ast.parse(OPEN_CLIP_OVERRIDES[name])
        else:
            node = modules[module].defs[name]
        for ref in sorted(referenced_names(node)):
            found = resolve(module, ref)
            if found is not None:
                if found[1] != ref:
                    raise GenerateError(f"{module}.{ref} is an alias: not supported.")
                todo.append(found)
                continue
            origin = modules[module].imports.get(ref, ("", ""))[0]
            if origin.split(".")[0] == "lightly" and name not in OPEN_CLIP_OVERRIDES:
                raise GenerateError(
                    f"{module}.{name} uses {ref} from lightly: add an override for it "
                    "to OPEN_CLIP_OVERRIDES."
                )
            if ref not in dir(builtins) and ref not in _locals_of(node):
                external.add(ref)
    # Standard-library modules imported whole (math, numbers, ...) become imports.
    stdlib = {
        ref
        for ref in external
        if ref in sys.stdlib_module_names
        and any(m.imports.get(ref) == (ref, "") for m in modules.values())
    }
    # Typing names (typing or collections.abc, for annotations) join the typing import.
    typing_refs = {
        ref
        for ref in external
        if any(
            m.imports.get(ref, ("", ""))[0] in ("typing", "collections.abc")
            for m in modules.values()
        )
    }
    unknown = external - OPEN_CLIP_NAMESPACE - stdlib - typing_refs
    if unknown:
        raise GenerateError(
            f"XCLRClipLoss needs {sorted(unknown)}, which open_clip's loss.py does "
            "not provide: extend the import edits in open_clip_changes()."
        )
    # Class first, then the helpers in the order of their modules and sources.
    key = {m: i for i, m in enumerate(PLUGIN_MODULES)}
    helpers = sorted(
        order[1:],
        key=lambda item: (key[item[0]], modules[item[0]].defs[item[1]].lineno),
    )
    parts = []
    for module, name in [order[0], *helpers]:
        if name in OPEN_CLIP_OVERRIDES:
            parts.append(OPEN_CLIP_OVERRIDES[name])
        else:
            parts.append(
                segment_with_comments(modules[module], modules[module].defs[name])
            )
    block = "\n\n".join(part.rstrip("\n") + "\n" for part in parts)
    block = re.sub(r"  # type: ignore\[[^\]]*\]", "", block)
    block = re.sub(r"(?<![\w.])Tensor\b", "torch.Tensor", block)
    block = pep604_to_typing(block)
    _check_no_pep604(block)
    names = referenced_names(ast.parse(block))
    return block, stdlib & names, ({"Optional", "Union"} | typing_refs) & names


def _locals_of(node: ast.AST) -> set[str]:
    """Names bound inside the definition (arguments, assignments, loops, comprehensions)."""
    bound: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.arg):
            bound.add(sub.arg)
        elif isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
            bound.add(sub.id)
        elif isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
            bound.add(sub.name)
    return bound


def _check_no_pep604(block: str) -> None:
    for node in ast.walk(ast.parse(block)):
        annotations: list[ast.expr | None] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations = [
                a.annotation
                for a in [
                    *node.args.posonlyargs,
                    *node.args.args,
                    *node.args.kwonlyargs,
                ]
            ] + [node.returns]
        for annotation in annotations:
            if annotation is None:
                continue
            for sub in ast.walk(annotation):
                if isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.BitOr):
                    raise GenerateError(
                        f"line {sub.lineno}: a PEP 604 union is left in an annotation."
                    )


#: The flags both open_clip patches add to ``open_clip_train/params.py`` (3.x and main).
OPEN_CLIP_FLAGS = """    parser.add_argument(
        "--xclr",
        default=False,
        action="store_true",
        help='Use X-CLR loss: soft targets from the similarity of the batch\\'s text features.'
    )
    parser.add_argument(
        "--xclr-target-temperature",
        type=float,
        default=0.1,
        help='Temperature of the X-CLR soft targets (smaller values approach the CLIP loss).'
    )
"""


def open_clip_changes() -> list[FileChange]:
    require_version("open_clip_torch", OPEN_CLIP_VERSION)
    site = installed_root("open_clip")
    block, stdlib_used, typing_used = open_clip_loss_block()

    loss_path = "open_clip/loss.py"
    loss_old = read_exact(site / loss_path)
    typing_names = ", ".join(sorted({"Optional"} | typing_used))
    header = (
        "".join(f"import {m}\n" for m in sorted(stdlib_used))
        + f"from typing import {typing_names}\n"
    )
    loss_new = replace_once(
        loss_old, "from typing import Optional\n", header, what=loss_path
    )
    loss_new = loss_new.rstrip("\n") + "\n\n\n" + block

    factory_path = "open_clip/factory.py"
    factory_old = read_exact(site / factory_path)
    factory_new = replace_once(
        factory_old,
        "from .loss import ClipLoss, DistillClipLoss, CoCaLoss, SigLipLoss\n",
        "from .loss import ClipLoss, DistillClipLoss, CoCaLoss, SigLipLoss, XCLRClipLoss\n",
        what=factory_path,
    )
    factory_new = insert_after(
        factory_new,
        "            dist_impl=args.loss_dist_impl,  # siglip has multiple distributed "
        "implementations to choose from\n        )\n",
        """    elif getattr(args, "xclr", False):
        # X-CLR soft targets from the similarity of the batch's own (detached) text
        # features; with identical targets ("captions" mode, no targets) it is ClipLoss.
        return XCLRClipLoss(
            local_loss=args.local_loss,
            gather_with_grad=args.gather_with_grad,
            cache_labels=True,
            rank=args.rank,
            world_size=args.world_size,
            target_temperature=args.xclr_target_temperature,
            target_mode="clip-text",
            use_horovod=args.horovod,
        )
""",
        what=factory_path,
    )

    init_path = "open_clip/__init__.py"
    init_old = read_exact(site / init_path)
    init_new = replace_once(
        init_old,
        "from .loss import ClipLoss, DistillClipLoss, CoCaLoss\n",
        "from .loss import ClipLoss, DistillClipLoss, CoCaLoss, XCLRClipLoss\n",
        what=init_path,
    )

    params_path = "open_clip_train/params.py"
    params_old = read_exact(site / params_path)
    params_new = insert_after(
        params_old,
        """        "--siglip",
        default=False,
        action="store_true",
        help='Use SigLip (sigmoid) loss.'
    )
""",
        OPEN_CLIP_FLAGS,
        what=params_path,
    )
    test_path = "tests/test_xclr_loss.py"
    return [
        FileChange(f"src/{loss_path}", loss_old, loss_new),
        FileChange(f"src/{factory_path}", factory_old, factory_new),
        FileChange(f"src/{init_path}", init_old, init_new),
        FileChange(f"src/{params_path}", params_old, params_new),
        FileChange(
            test_path,
            None,
            read_exact(UPSTREAM / "open_clip" / "files" / test_path),
        ),
    ]


# -- main ------------------------------------------------------------------------------

TARGETS: dict[str, Callable[[], list[FileChange]]] = {
    "lightly": lightly_changes,
    "open_clip": open_clip_changes,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="upstream/generate.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if a committed patch differs from the sources",
    )
    parser.add_argument(
        "--tree",
        metavar="DIR",
        help="also write the patched files (new versions) under DIR/<host>/",
    )
    args = parser.parse_args(argv)
    drift = []
    for host, changes_of in TARGETS.items():
        try:
            changes = changes_of()
        except GenerateError as err:
            print(f"upstream/generate.py: error: {host}: {err}", file=sys.stderr)
            return 2
        patch = unified_patch(changes)
        path = UPSTREAM / host / "xclr.patch"
        current = path.read_text() if path.exists() else None
        if args.check:
            if current != patch:
                drift.append(path.relative_to(ROOT))
        elif current != patch:
            path.write_text(patch)
            print(f"wrote {path.relative_to(ROOT)}")
        if args.tree:
            for change in changes:
                out = Path(args.tree) / host / change.path
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(change.new)
    if drift:
        print(
            "upstream/generate.py: error: out of date (run python upstream/generate.py): "
            + ", ".join(map(str, drift)),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
