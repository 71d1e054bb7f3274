"""Where data sets live on disk, and the one in-process cache of what was read from there.

The data folder of a run is its ``data_dir`` or, without one, ``$MIXBENCH_DATA`` or
``~/.cache/mixbench`` (``data_root``): downloads land there and image-file sets are looked
up there. Everything read from it (the file lists of image-file sets, decoded or loaded
arrays, the parametrised data sets' descriptions) is kept once per process in ``CACHE``,
keyed by what it depends on: a grid trains many runs on the same data, and evaluation
reads it again.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, Optional, TypeVar

T = TypeVar("T")


def default_data_dir() -> Path:
    return Path(os.environ.get("MIXBENCH_DATA") or Path.home() / ".cache" / "mixbench")


def data_root(data_dir: Optional[os.PathLike] = None) -> Path:
    """The data folder: ``data_dir`` if given, else ``default_data_dir()``."""
    return Path(data_dir) if data_dir else default_data_dir()


class DataCache:
    """Values made once per process, by key: ``get(key, make)`` calls ``make()`` the first time only."""

    def __init__(self) -> None:
        self._values: Dict[Hashable, Any] = {}

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        if key not in self._values:
            self._values[key] = make()
        return self._values[key]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._values

    def clear(self) -> None:
        self._values.clear()


CACHE = DataCache()
