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

When a run writes one is decided by :class:`Checkpointer`: at the end of an
epoch once ``every_min`` minutes have passed since its last write (0: every
epoch), always at the last epoch, and on :func:`flush_pending` (the preemption
signal, an interrupt or a failure), which writes the state of the last
finished epoch that was not written yet (kept in memory as a copy).
"""
from __future__ import annotations

import copy
import hashlib
import io
import os
import shutil
import sys
import time
import weakref
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


def checkpoint_device(state: Dict[str, Any]) -> str:
    """The device type (``cpu``, ``cuda``) a checkpoint was written on.

    Checkpoints from before the ``device`` entry tell it by their CUDA RNG state.
    """
    if state.get("device"):
        return str(state["device"])
    rng = state.get("rng") or {}
    return "cuda" if rng.get("cuda") is not None else "cpu"


# ---------------------------------------------------------------------------
# When to write

_clock = time.monotonic  # the interval's clock (tests replace it)
_ACTIVE: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


class Checkpointer:
    """Decides when a training run writes its checkpoint, and keeps what it did not write yet.

    ``epoch_end(make_state, last)`` writes ``make_state()`` when ``last``, when ``every_min`` is
    0, or when ``every_min`` minutes have passed since the previous write (or since the start);
    otherwise it keeps an in-memory copy (on the training device), which :meth:`flush` writes. So a
    resume always starts at the end of an epoch, exactly as if the run had not stopped, and a
    preemption loses at most the epoch in progress. ``save`` is the write itself
    (``save_checkpoint(run_dir, state)``). Used as a context manager, the checkpointer is
    registered for :func:`flush_pending` while training.
    """

    def __init__(self, run_dir: Path, every_min: float, save: Callable[[Path, Dict[str, Any]], Any] = None):
        self.run_dir = Path(run_dir)
        self.every_s = max(0.0, float(every_min)) * 60.0
        self._save = save or save_checkpoint
        self.last_write = _clock()
        self.pending: Optional[Dict[str, Any]] = None
        self._writing: Optional[Dict[str, Any]] = None
        self.writes = 0

    def due(self) -> bool:
        return self.every_s <= 0 or _clock() - self.last_write >= self.every_s

    def epoch_end(self, make_state: Callable[[], Dict[str, Any]], last: bool = False) -> bool:
        """Write the state now (True) or keep a copy of it for :meth:`flush` (False)."""
        if last or self.due():
            self.pending = None
            self._write(make_state())
            return True
        self.pending = copy.deepcopy(make_state())
        return False

    def flush(self) -> bool:
        """Write the kept state, if any (also one whose write was interrupted by the caller's signal)."""
        state = self.pending if self.pending is not None else self._writing
        if state is None:
            return False
        self._write(state)
        return True

    def _write(self, state: Dict[str, Any]) -> None:
        self._writing = state
        try:
            self._save(self.run_dir, state)
        finally:
            self._writing = None
        self.pending = None
        self.last_write = _clock()
        self.writes += 1

    def __enter__(self) -> "Checkpointer":
        _ACTIVE.add(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.discard(self)


def flush_pending(log: Callable[[str], None] = _stderr) -> int:
    """Write the kept state of every run training in this process (the preemption signal's handler
    calls this); returns how many checkpoints were written."""
    written = 0
    for checkpointer in list(_ACTIVE):
        try:
            if checkpointer.flush():
                written += 1
                log(f"{checkpointer.run_dir}: checkpoint of the last finished epoch written")
        except Exception as exc:  # a signal handler must not fail; the previous checkpoint stays
            log(f"{checkpointer.run_dir}: could not write the pending checkpoint ({exc})")
    return written
