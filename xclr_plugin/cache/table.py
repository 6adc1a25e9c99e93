"""Caption embeddings looked up by row or by file name; :class:`CaptionTable` in memory."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeAlias, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from xclr_plugin.captions.records import CaptionRecord
from xclr_plugin.text import SupportsEncode

Index: TypeAlias = int | slice | Sequence[int] | np.ndarray | torch.Tensor


@runtime_checkable
class CaptionLookup(Protocol):
    """File names to caption embeddings, as :class:`xclr_plugin.data.XCLRCollate` uses."""

    @property
    def dim(self) -> int: ...

    def lookup(self, filenames: Sequence[str]) -> torch.Tensor: ...


def _to_rows(index: Index, count: int) -> np.ndarray | slice | int:
    if isinstance(index, slice):
        return index
    if isinstance(index, (bool, np.bool_)):
        raise TypeError(f"Row index must be an integer, got {index!r}.")
    if isinstance(index, torch.Tensor):
        index = index.detach().cpu().numpy()
    if isinstance(index, (int, np.integer)):
        if not -count <= index < count:
            raise IndexError(f"Row {index} is out of range for {count} captions.")
        return int(index) % count
    rows = np.asarray(index)
    if rows.size == 0:
        return rows.astype(np.int64)
    if rows.dtype == bool or not np.issubdtype(rows.dtype, np.integer):
        raise TypeError(f"Row indices must be integers, got dtype {rows.dtype}.")
    if rows.min() < -count or rows.max() >= count:
        raise IndexError(f"Row indices out of range for {count} captions.")
    return rows % count


class Rows:
    """Lookups by row and by file name, shared by the table and the cache."""

    _index: dict[str, int] | None = None

    @property
    def filenames(self) -> list[str]:
        raise NotImplementedError

    def _rows(self, rows: np.ndarray | slice | int) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.filenames)

    def __getitem__(self, index: Index) -> torch.Tensor:
        return self._rows(_to_rows(index, len(self)))

    def __contains__(self, filename: object) -> bool:
        if self._index is None:
            self._index = {}
            for i, name in enumerate(self.filenames):
                # A name given twice (captions of one image) has no one row.
                self._index[name] = -1 if name in self._index else i
        return isinstance(filename, str) and self._index.get(filename, -1) >= 0

    def index_of(self, filename: str) -> int:
        """Row of a file name; ValueError if it has none (or several)."""
        if filename not in self:
            path = getattr(self, "path", None)
            where = "" if path is None else f" in the cache {path}"
            several = filename in self._index  # type: ignore[operator]
            raise ValueError(
                f"No caption embedding for image {filename!r}{where}"
                + (" (it has several: look its rows up by index)." if several else ".")
            )
        return self._index[filename]  # type: ignore[index]

    def lookup(self, filenames: Sequence[str]) -> torch.Tensor:
        if isinstance(filenames, (str, bytes)):
            raise TypeError(
                f"filenames must be a sequence of file names, got the string "
                f"{filenames!r} (wrap one name in a list)."
            )
        return self[[self.index_of(name) for name in filenames]]


class CaptionTable(Rows):
    """In-memory caption embeddings, one row per ``filenames`` entry; picklable."""

    def __init__(self, embeddings: torch.Tensor, filenames: Sequence[str]) -> None:
        if not isinstance(embeddings, torch.Tensor):
            raise TypeError(
                f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}."
            )
        if embeddings.ndim != 2 or embeddings.shape[0] != len(filenames):
            raise ValueError(
                f"embeddings must have shape (len(filenames), dim) = ({len(filenames)}, "
                f"dim), got {tuple(embeddings.shape)}."
            )
        if not embeddings.is_floating_point():
            raise ValueError(
                f"embeddings must be a floating-point tensor, got {embeddings.dtype}."
            )
        bad = torch.nonzero(~torch.isfinite(embeddings.detach()).all(dim=1)).flatten()
        if bad.numel():
            raise ValueError(
                f"embeddings hold {bad.numel()} row(s) with NaN or infinite values, "
                f"the first at row {int(bad[0])} (key {filenames[int(bad[0])]!r})."
            )
        rows = embeddings.detach().float().cpu()
        # Rows the encoder already normalised stay bit for bit: renormalising moves
        # them by an ulp, which training amplifies (the demo's scores would change).
        norms = rows.norm(dim=1, keepdim=True)
        unit = (norms - 1).abs() <= 1e-6
        self.embeddings = torch.where(unit, rows, F.normalize(rows, dim=-1))
        self._names = list(filenames)

    @property
    def filenames(self) -> list[str]:
        return self._names

    @classmethod
    def from_records(
        cls,
        records: Sequence[CaptionRecord],
        encoder: SupportsEncode,
        *,
        distinct: bool = False,
    ) -> CaptionTable:
        """Embeds the records' captions now (``distinct``: each distinct caption once)."""
        captions = [r.caption for r in records]
        if not distinct:
            return cls(encoder.encode(captions), [r.filename for r in records])
        unique = sorted(set(captions))
        row = {caption: i for i, caption in enumerate(unique)}
        embeddings = encoder.encode(unique)[[row[c] for c in captions]]
        return cls(embeddings, [r.filename for r in records])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def _rows(self, rows: np.ndarray | slice | int) -> torch.Tensor:
        if isinstance(rows, np.ndarray):
            return self.embeddings[torch.from_numpy(rows.astype(np.int64))]
        return self.embeddings[rows]
