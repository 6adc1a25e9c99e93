"""Builds upstream/open_clip/main.patch: XCLRClipLoss on open_clip ``main`` (task API).

Usage: python upstream/open_clip/main_patch.py CHECKOUT [--check]

CHECKOUT is a clean git checkout of open_clip at MAIN_COMMIT. The loss code is the
generator's open_clip block (upstream/generate.py, from xclr_plugin: one definition);
the rest are anchored edits. The patch is ``git diff --full-index`` of the edited
checkout, so ``git apply --3way`` works. The checkout is left edited (run its tests).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import generate  # noqa: E402  (upstream/generate.py)

MAIN_COMMIT = "89fb801f1e6087880e951fc8354b8a2077b79c6d"


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        raise SystemExit(
            f"main_patch.py: error: {path}: anchor found {text.count(old)} times, expected 1: {old[:60]!r}"
        )
    path.write_text(text.replace(old, new))


def apply(root: Path) -> None:
    block, stdlib_used, typing_used = generate.open_clip_loss_block()
    loss = root / "src/open_clip/loss.py"
    header = "".join(f"import {m}\n" for m in sorted(stdlib_used))
    header += f"from typing import {', '.join(sorted({'Optional'} | typing_used))}\n"
    edit(loss, "from typing import Optional\n", header)
    loss.write_text(loss.read_text().rstrip("\n") + "\n\n\n" + block)

    factory = root / "src/open_clip/factory.py"
    edit(
        factory,
        "from .loss import ClipLoss, DistillClipLoss, CoCaLoss, SigLipLoss, GenLipLoss\n",
        "from .loss import ClipLoss, DistillClipLoss, CoCaLoss, SigLipLoss, GenLipLoss, XCLRClipLoss\n",
    )
    xclr_loss = """XCLRClipLoss(
            local_loss=args.local_loss,
            gather_with_grad=args.gather_with_grad,
            cache_labels=cache_labels,
            rank=args.rank,
            world_size=args.world_size,
            target_temperature=args.xclr_target_temperature,
            target_mode="clip-text",
            chunk_size=args.xclr_chunk_size or None,  # 0 = no chunking, as SigLipLoss
        )"""
    edit(
        factory,
        """            dist_impl=args.loss_dist_impl,
        )

    return ClipLoss(""",
        f"""            dist_impl=args.loss_dist_impl,
        )
    elif getattr(args, "xclr", False):
        return {xclr_loss}

    return ClipLoss(""",
    )
    edit(
        factory,
        """            dist_impl=args.loss_dist_impl,
            **shared,
        )
    else:""",
        f"""            dist_impl=args.loss_dist_impl,
            **shared,
        )
    elif getattr(args, "xclr", False):
        # X-CLR: soft targets from the similarity of the batch's own (detached) text
        # features; CLIPTask's forward, checkpointing and eval are unchanged.
        task = CLIPTask(
            model,
            loss={xclr_loss.replace(chr(10), chr(10) + "    ")},
        )
    else:""",
    )

    init = root / "src/open_clip/__init__.py"
    text = init.read_text()
    old = next(
        line
        for line in text.splitlines(keepends=True)
        if line.startswith("from .loss import")
    )
    edit(init, old, old.rstrip("\n") + ", XCLRClipLoss\n")

    params = root / "src/open_clip_train/params.py"
    edit(
        params,
        """        help='Use SigLip (sigmoid) loss.'
    )
""",
        """        help='Use SigLip (sigmoid) loss.'
    )
"""
        + generate.OPEN_CLIP_FLAGS
        + """    parser.add_argument(
        "--xclr-chunk-size",
        type=int,
        default=0,
        help='Rows of the X-CLR loss computed at a time (memory linear in the batch). 0 = no chunking.'
    )
""",
    )
    for name in ("test_factory_task.py", "test_params.py", "test_training_simple.py"):
        extra = (HERE / "main_tests" / name).read_text()
        path = root / "tests" / name
        path.write_text(path.read_text().rstrip("\n") + "\n\n\n" + extra)
    new_test = root / "tests" / "test_xclr_loss.py"
    new_test.write_text((HERE / "files" / "tests" / "test_xclr_loss.py").read_text())
    subprocess.run(
        ["git", "-C", str(root), "add", "-N", "tests/test_xclr_loss.py"], check=True
    )
    readme = root / "README.md"
    anchor = "### Training with pre-trained language models as text encoder:"
    edit(readme, anchor, (HERE / "main_readme.md").read_text() + "\n" + anchor)


def main(argv: list[str]) -> int:
    root = Path(argv[0])
    head = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if head != MAIN_COMMIT:
        print(
            f"main_patch.py: error: CHECKOUT must be at {MAIN_COMMIT}, got {head}",
            file=sys.stderr,
        )
        return 2
    apply(root)
    diff = subprocess.run(
        [
            "git",
            "-C",
            str(root),
            "diff",
            "--full-index",
            "--",
            "src",
            "tests",
            "README.md",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    out = HERE / "main.patch"
    if "--check" in argv:
        return 0 if out.exists() and out.read_text() == diff else 1
    out.write_text(diff)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
