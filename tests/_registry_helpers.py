"""Writes real, minimal installed distributions (a ``*.dist-info`` folder) for tests."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path


def write_distribution(
    root: Path,
    dist_name: str,
    modules: Mapping[str, str],
    entry_points: Mapping[str, str],
    *,
    group: str = "xclr_plugin.losses",
    version: str = "0.1.0",
) -> Path:
    """Installs a tiny package into ``root`` the way pip lays it out.

    Writes each module as ``root/<module>.py`` and a ``<dist>-<version>.dist-info``
    folder with ``METADATA``, ``entry_points.txt`` and ``RECORD``, so that
    ``importlib.metadata`` finds it once ``root`` is on ``sys.path``.

    Args:
        root: The folder that goes on ``sys.path`` (like site-packages).
        dist_name: Distribution name, e.g. ``"tiny-losses"``.
        modules: Module name -> source code.
        entry_points: Entry-point name -> value (``"module:attr"``).
        group: Entry-point group.
        version: Distribution version.

    Returns:
        The dist-info folder.
    """
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for module, source in modules.items():
        path = root / f"{module}.py"
        path.write_text(textwrap.dedent(source))
        files.append(path.name)
    dist_info = root / f"{dist_name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n"
    )
    lines = [
        f"[{group}]",
        *(f"{name} = {value}" for name, value in entry_points.items()),
    ]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    record = [
        *files,
        *(f"{dist_info.name}/{n}" for n in ("METADATA", "entry_points.txt")),
    ]
    (dist_info / "RECORD").write_text("".join(f"{f},,\n" for f in record))
    return dist_info
