"""The ``animals`` task's data: Animal-MNIST 0.4, 10,000 28x28 silhouettes of 10 animals.

Its metadata requires tensorflow, so it is installed with ``--no-deps``; the demo never
imports it and reads its gzip-pickled arrays with an unpickler that builds arrays only.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path
from typing import Any

import numpy as np

#: Animal-MNIST's classes, in label order (0 = bear, ..., 9 = zebra).
ANIMAL_CLASSES = (
    "bear bird cat cow dog elephant giraffe horse sheep zebra".split()  # noqa: SIM905
)
ANIMALS_CREDIT = "Animal-MNIST 0.4 by Sina Mohammadi (MIT), PyPI package animal-mnist."
_HINT = "pip install --no-deps animal-mnist==0.4"


class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays and nothing else: a data file cannot run code."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Animal-MNIST's images ``(10000, 28, 28) uint8`` and labels ``(10000,) int64``.

    Raises:
        ImportError: If the ``animal-mnist`` package is not installed.
        ValueError: If its files are unreadable or not what 0.4 ships.
    """
    spec = importlib.util.find_spec("animal_mnist")  # locates it without importing
    if spec is None or spec.origin is None:
        raise ImportError(
            f"The 'animals' task needs the Animal-MNIST package: {_HINT} "
            "(--no-deps: its metadata asks for tensorflow, which the demo does not use)."
        )
    folder = Path(spec.origin).parent / "data" / "Animal_MNIST"
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        try:
            with gzip.open(folder / name, "rb") as handle:
                arrays.append(np.asarray(_ArrayUnpickler(handle).load()))
        except (OSError, EOFError, pickle.UnpicklingError) as err:
            raise ValueError(
                f"{folder / name}: cannot read Animal-MNIST ({err}); reinstall: {_HINT}"
            ) from err
    images, labels = arrays
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(
            f"{folder}: expected (N, 28, 28) images and N labels, got "
            f"{images.shape} and {labels.shape}; reinstall: {_HINT}"
        )
    return images.astype(np.uint8), labels.astype(np.int64)
