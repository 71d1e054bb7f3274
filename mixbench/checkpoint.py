"""Training checkpoints: written atomically, verified by a checksum, loaded with weights_only=True."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from mixbench.results import atomic_write_bytes

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(run_dir: Path, state: Dict[str, Any]) -> Path:
    """Serialise ``state``, write it atomically, then its sha256 beside it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = Path(run_dir) / CHECKPOINT
    atomic_write_bytes(path, data)
    atomic_write_bytes(path.with_name(CHECKPOINT + ".sha256"), hashlib.sha256(data).hexdigest().encode() + b"\n")
    return path


class CorruptCheckpoint(RuntimeError):
    pass


def load_checkpoint(run_dir: Path, map_location="cpu") -> Optional[Dict[str, Any]]:
    """The checkpoint of ``run_dir``, or None if there is none. Raises CorruptCheckpoint on a bad file."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    data = path.read_bytes()
    sha = path.with_name(CHECKPOINT + ".sha256")
    if not sha.exists() or sha.read_text().strip() != hashlib.sha256(data).hexdigest():
        raise CorruptCheckpoint(f"{path}: checksum missing or does not match")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # a file that passed the checksum but does not unpickle safely
        raise CorruptCheckpoint(f"{path}: {exc}") from exc


def remove_checkpoint(run_dir: Path) -> None:
    for name in (CHECKPOINT, CHECKPOINT + ".sha256"):
        (Path(run_dir) / name).unlink(missing_ok=True)
