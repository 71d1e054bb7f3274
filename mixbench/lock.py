"""Per-run lock files, so that two launchers on one output folder never train the same cell at once.

``RunLock(run_dir)`` creates ``run_dir/run.lock`` with ``O_CREAT | O_EXCL`` (atomic
on local file systems and NFSv3+) and writes its owner into it: host, pid, the
process start time, the Slurm job if any, and a random token. While held, a
daemon thread refreshes the file's mtime every ``heartbeat_s`` seconds.

A lock that already exists is *stale*, and is taken over, when

- its owner ran on this host and that process is gone (or the pid now belongs to
  a different process, which its start time tells);
- its owner was an earlier incarnation of this same Slurm job (a requeue after
  preemption or a node failure, possibly on another host);
- its heartbeat is older than ``stale_after_s`` (default 600 s, environment
  variable ``MIXBENCH_LOCK_STALE_S``): the owner's host died or lost the file system.

Otherwise ``acquire`` raises ``RunLocked``, which names the owner. Within one
process the lock is re-entrant: a launcher that holds a run's lock can call
code that locks the same run again.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional

LOCK_NAME = "run.lock"
_HELD: Dict[str, int] = {}  # lock path -> nesting depth, for the locks this process holds
_HELD_GUARD = threading.Lock()


def _proc_start(pid: int) -> Optional[str]:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def _slurm_job() -> Optional[Dict[str, str]]:
    env = os.environ
    job = env.get("SLURM_ARRAY_JOB_ID") and f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    job = job or env.get("SLURM_JOB_ID")
    if not job:
        return None
    return {"job": job, "procid": env.get("SLURM_PROCID", "0"), "restart": env.get("SLURM_RESTART_COUNT", "0")}


def describe_owner(owner: Dict[str, Any]) -> str:
    text = f"pid {owner.get('pid')} on {owner.get('host')}"
    if owner.get("slurm"):
        text += f" (Slurm job {owner['slurm'].get('job')})"
    if owner.get("started_at"):
        text += f" since {owner['started_at']}"
    return text


class RunLocked(RuntimeError):
    """The run directory is locked by a live process (this host) or a fresh heartbeat (elsewhere)."""

    def __init__(self, path: Path, owner: Optional[Dict[str, Any]]):
        self.path = Path(path)
        self.owner = owner or {}
        who = describe_owner(self.owner) if owner else "a process that is still writing its lock"
        super().__init__(f"{self.path.parent} is locked by {who}; delete {self.path} if that process is gone")


class RunLock:
    """An exclusive lock on one run directory; use as a context manager or acquire()/release()."""

    def __init__(
        self,
        run_dir: Path,
        *,
        heartbeat_s: float = 30.0,
        stale_after_s: Optional[float] = None,
        log=None,
    ):
        self.path = Path(run_dir) / LOCK_NAME
        self.heartbeat_s = heartbeat_s
        if stale_after_s is None:
            stale_after_s = float(os.environ.get("MIXBENCH_LOCK_STALE_S", 600))
        self.stale_after_s = stale_after_s
        self.log = log or (lambda msg: print(f"mixbench: {msg}", file=sys.stderr))
        self.token: Optional[str] = None
        self._nested = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- public -----------------------------------------------------------
    def acquire(self) -> "RunLock":
        key = str(self.path.absolute())
        with _HELD_GUARD:
            if key in _HELD:  # this process holds it already
                _HELD[key] += 1
                self._nested = True
                return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                with _HELD_GUARD:
                    _HELD[key] = 1
                self._start_heartbeat()
                return self
            raw = self._read()
            if raw is None:
                continue  # vanished between our create and read: try again
            owner = self._parse(raw)
            reason = self.stale_reason(owner)
            if reason is None:
                raise RunLocked(self.path, owner)
            if self._take_over(raw):
                self.log(f"taking over the stale lock {self.path} ({reason})")
        raise RunLocked(self.path, self._parse(self._read() or b""))

    def release(self) -> None:
        key = str(self.path.absolute())
        with _HELD_GUARD:
            if self._nested:
                _HELD[key] -= 1
                self._nested = False
                return
            if self.token is None:  # not acquired
                return
            _HELD.pop(key, None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.token is not None and self.held():
            self.path.unlink(missing_ok=True)
        self.token = None

    def held(self) -> bool:
        """Whether the lock file on disk is still ours."""
        raw = self._read()
        return raw is not None and self.token is not None and self._parse(raw).get("token") == self.token

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def stale_reason(self, owner: Dict[str, Any]) -> Optional[str]:
        """Why the lock described by ``owner`` is stale, or None if it may still be held."""
        if not owner:
            age = self._age()
            # An empty or torn file: its creator died between open and write (or is writing now).
            return f"unreadable lock file, {age:.0f} s old" if age is not None and age > 10 else None
        mine, theirs = _slurm_job(), owner.get("slurm")
        if mine and theirs and (mine["job"], mine["procid"]) == (theirs.get("job"), theirs.get("procid")) \
                and mine["restart"] != theirs.get("restart"):
            # Slurm runs one incarnation of a job at a time: the earlier one is being replaced.
            return f"left by an earlier run of Slurm job {mine['job']}"
        pid = owner.get("pid")
        if owner.get("host") == socket.gethostname() and isinstance(pid, int):
            if not process_alive(pid):
                return f"pid {pid} is no longer running on this host"
            start = owner.get("proc_start")
            if start is not None and _proc_start(pid) not in (None, start):
                return f"pid {pid} now belongs to another process"
            return None
        age = self._age()
        if age is not None and age > self.stale_after_s:
            return f"no heartbeat from {describe_owner(owner)} for {age:.0f} s"
        return None

    # -- internals -----------------------------------------------------------
    def _create(self) -> bool:
        token = secrets.token_hex(8)
        owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "proc_start": _proc_start(os.getpid()),
            "slurm": _slurm_job(),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "token": token,
        }
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(owner) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        self.token = token
        return True

    def _read(self) -> Optional[bytes]:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    @staticmethod
    def _parse(raw: bytes) -> Dict[str, Any]:
        try:
            owner = json.loads(raw)
        except ValueError:
            return {}
        return owner if isinstance(owner, dict) else {}

    def _age(self) -> Optional[float]:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def _take_over(self, expected: bytes) -> bool:
        """Remove the stale lock whose content is ``expected``; False if someone else's fresh lock was there."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)  # atomic: of several contenders, one moves any given file
        except FileNotFoundError:
            return True  # another contender removed it first
        if aside.read_bytes() == expected:
            aside.unlink()
            return True
        # Between our read and rename another contender replaced the stale lock with its own: put it back.
        try:
            os.link(aside, self.path)
        except OSError:
            pass
        aside.unlink(missing_ok=True)
        return False

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        if self.heartbeat_s <= 0:
            return

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        self._thread = threading.Thread(target=beat, name=f"mixbench-lock-{self.path.parent.name}", daemon=True)
        self._thread.start()


def ensure_writable_dir(folder: Path) -> None:
    """Create ``folder`` and check that files can be created in it; raise the OSError otherwise."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".mixbench-write-test.")
    except OSError as exc:  # name the folder, not the probe file
        raise type(exc)(exc.errno, exc.strerror, str(folder)) from None
    try:
        os.write(fd, b"ok")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(probe)
