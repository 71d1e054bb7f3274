"""Training checkpoints: atomic, verified, and the previous one kept until the new one is complete.

A run directory holds up to two checkpoints, each with a sidecar that records
its sha256 and size:

- ``checkpoint.pt`` (+ ``checkpoint.pt.sha256``): the latest end-of-epoch state;
- ``checkpoint.prev.pt`` (+ ``checkpoint.prev.pt.sha256``): the one before it.

Saving goes (1) current pair -> previous pair (hard links, or copies where the
file system has none; each file replaced atomically), (2) the new payload over
``checkpoint.pt`` (temp file + rename), (3) its sidecar. A kill at any moment
leaves at least one pair whose checksum matches, so ``load_checkpoint`` always
finds the newest complete state. A file that fails its check (truncated,
corrupted, missing sidecar, not a safe ``weights_only`` pickle) is reported,
renamed to ``*.corrupt`` so that it can never be rotated over a good one, and
the loader falls back to the previous checkpoint, or to none (a fresh start).

Checkpoints are only ever loaded with ``torch.load(..., weights_only=True)``:
tensors, numbers, strings and plain containers, never arbitrary objects.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from mixbench.results import atomic_write_bytes

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
SIDECAR = ".sha256"
FORMAT = 1  # bumped when the layout of the state dict changes


class CorruptCheckpoint(RuntimeError):
    """A checkpoint file that fails its checksum, size or safe-load check."""


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR)


def _sidecar_text(data: bytes) -> bytes:
    return f"sha256 {hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n".encode()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_with_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` an identical file to ``src``, atomically (hard link if possible, else a copy)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save_checkpoint(run_dir: Path, state: Dict[str, Any]) -> Path:
    """Write ``state`` as the new ``checkpoint.pt``; the current one becomes ``checkpoint.prev.pt``."""
    run_dir = Path(run_dir)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    data = buf.getvalue()
    path, prev = run_dir / CHECKPOINT, run_dir / PREVIOUS
    if path.exists() and _sidecar(path).exists():
        # Current -> previous; while this runs, checkpoint.pt is still a good pair.
        _replace_with_copy(path, prev)
        _replace_with_copy(_sidecar(path), _sidecar(prev))
    # New payload, then its sidecar; until the sidecar lands, checkpoint.prev.pt is the good pair.
    atomic_write_bytes(path, data)
    atomic_write_bytes(_sidecar(path), _sidecar_text(data))
    _fsync_dir(run_dir)
    return path


def read_checkpoint(path: Path, map_location="cpu") -> Dict[str, Any]:
    """Verify ``path`` against its sidecar and load it safely; raise CorruptCheckpoint if anything is off."""
    path = Path(path)
    data = path.read_bytes()
    sidecar = _sidecar(path)
    if not sidecar.exists():
        raise CorruptCheckpoint(f"{path.name}: no {sidecar.name} beside it (the write did not finish)")
    fields = dict(line.split(" ", 1) for line in sidecar.read_text().splitlines() if " " in line)
    size = int(fields.get("size", -1))
    if size >= 0 and len(data) != size:
        raise CorruptCheckpoint(f"{path.name}: truncated or overwritten ({len(data)} bytes, expected {size})")
    if fields.get("sha256") != hashlib.sha256(data).hexdigest():
        raise CorruptCheckpoint(f"{path.name}: sha256 does not match {sidecar.name}")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # passed the checksum but is not a safe weights-only pickle
        raise CorruptCheckpoint(f"{path.name}: not a safe weights-only checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CorruptCheckpoint(f"{path.name}: checkpoint format {found!r}, this mixbench reads {FORMAT}")
    return state


def _stderr(message: str) -> None:
    print(f"mixbench: {message}", file=sys.stderr)


def load_checkpoint(
    run_dir: Path, map_location="cpu", log: Callable[[str], None] = _stderr
) -> Optional[Dict[str, Any]]:
    """The newest good checkpoint of ``run_dir`` (latest, else previous), or None if there is none.

    Bad files are reported through ``log`` and renamed to ``*.corrupt``.
    """
    run_dir = Path(run_dir)
    bad = False
    for name in (CHECKPOINT, PREVIOUS):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            state = read_checkpoint(path, map_location)
        except CorruptCheckpoint as exc:
            bad = True
            log(f"{run_dir}: unusable checkpoint: {exc}; moved aside as {name}.corrupt")
            for p in (path, _sidecar(path)):
                if p.exists():
                    os.replace(p, p.with_name(p.name + ".corrupt"))
            continue
        if bad:
            log(f"{run_dir}: falling back to {name} (epoch {state.get('epoch')})")
        return state
    if bad:
        log(f"{run_dir}: no usable checkpoint left; the run restarts from epoch 0")
    return None


def remove_partial_writes(run_dir: Path) -> None:
    """Delete temp files left by a write that was killed (call only while holding the run's lock)."""
    for p in Path(run_dir).glob(".*.tmp"):
        p.unlink(missing_ok=True)


def remove_checkpoint(run_dir: Path) -> None:
    """Delete every checkpoint file of a finished run."""
    run_dir = Path(run_dir)
    for name in (CHECKPOINT, PREVIOUS):
        for p in (run_dir / name, _sidecar(run_dir / name)):
            p.unlink(missing_ok=True)
            p.with_name(p.name + ".corrupt").unlink(missing_ok=True)
