"""Persistent worker processes that solve independent chunks of a batch (CPU-side per-batch optimisation).

PuzzleMix's graph cuts and Co-Mixup's per-partition label optimisation run on
the CPU, one independent problem per sample or per partition of the batch.
:class:`ChunkPool` solves a list of such chunks in parallel: the first chunk in
the calling process, the others in ``workers`` worker processes that start on
first use and live until :meth:`ChunkPool.close` (the method's ``close()``).

The workers are started with forkserver (spawn where forkserver does not
exist), so they do not inherit the training process's threads; gco's C
wrapper keeps its graphs in a global map, so threads would be unsafe anyway.
Both start methods import the main script again in every worker. A script
that starts training without an ``if __name__ == "__main__":`` guard would
therefore start training again in each worker: the pool checks the main
script before it starts any worker and then solves in the calling process,
with a warning that says so (:func:`unguarded_main_script`). A worker that
is nevertheless asked to start a pool while it imports the main script (the
guard exists but training starts outside it) stops with that explanation
instead of running the script, and the calling process falls back to serial
solving with a warning.

Results never depend on the number of workers: the chunks are solved by the
same function and returned in order.
"""
from __future__ import annotations

import ast
import multiprocessing
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, List, Optional, Sequence

import numpy as np

GUARD_HINT = 'put the script\'s training code under `if __name__ == "__main__":`, or pass workers=0'


def default_workers() -> int:
    """One worker per available core, less the calling process's own.

    The available cores are the process's CPU affinity, capped by ``$MIXBENCH_CPUS`` when set
    (runs that share a node in parallel each get their share, see ``mixbench.launchers.local``).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    try:
        cap = int(os.environ.get("MIXBENCH_CPUS") or 0)
    except ValueError:
        cap = 0
    if cap > 0:
        cores = min(cores, cap)
    return max(0, cores - 1)


def chunk_bounds(n: int, parts: int) -> np.ndarray:
    """Bounds of ``min(n, parts)`` contiguous chunks of ``n`` items, as even as possible."""
    return np.linspace(0, n, max(1, min(n, parts)) + 1).round().astype(int)


def _is_main_test(test: ast.expr) -> bool:
    """Whether ``test`` is ``__name__ == "__main__"`` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(consts) == 1


def unguarded_main_script() -> Optional[str]:
    """The main script's path when worker processes would re-run it and it has no ``__main__`` guard.

    Follows multiprocessing's own rule (``spawn.get_preparation_data``): a main
    module run with ``-m`` is re-imported by name unless it is a package's
    ``__main__``, a script file by path unless it is named ``__main__.py``;
    interactive sessions and ``-c`` have no file and are not re-imported. The
    script is "guarded" when its top level has an ``if __name__ == "__main__":``.
    """
    main = sys.modules.get("__main__")
    if main is None:
        return None
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if spec_name is not None:
        if spec_name == "__main__" or spec_name.endswith(".__main__"):
            return None
        path = getattr(main.__spec__, "origin", None)
    else:
        path = getattr(main, "__file__", None)
        if path is None or os.path.splitext(os.path.basename(path))[0] == "__main__":
            return None
    if not path or not str(path).endswith(".py"):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return None
    if any(isinstance(node, ast.If) and _is_main_test(node.test) for node in tree.body):
        return None
    return str(path)


def _in_bootstrapping_worker() -> bool:
    """True inside a worker process that is still importing the main script (multiprocessing's flag)."""
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def _watch_trainer(pid: int) -> None:
    """Worker initialiser: exit (and end the fork server) once the training process ``pid`` is gone.

    A training process killed without running ``close()`` would otherwise leave the pool behind.
    """
    if os.name != "posix":  # os.kill(pid, 0) only probes on POSIX
        return
    import signal
    import threading
    import time

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                if os.getppid() not in (pid, 1):
                    os.kill(os.getppid(), signal.SIGTERM)
                os._exit(0)
            except PermissionError:
                pass

    threading.Thread(target=watch, daemon=True).start()


class ChunkPool:
    """Worker processes that solve the chunks of a batch in parallel.

    ``workers`` processes plus the calling process: :meth:`run` solves
    ``fn(*chunks[0])`` here and the other chunks in the workers, and returns the
    results in order. ``name`` (the method) prefixes the warnings; ``preload``
    lists modules the fork server imports once (the modules of the functions run).
    The pool starts on first use and lives until :meth:`close`. When it cannot
    start or breaks, it warns once and solves everything in the calling process
    from then on (``workers`` becomes 0).
    """

    def __init__(self, workers: int, *, name: str = "mixbench", preload: Sequence[str] = ()):
        self.workers = max(0, int(workers))
        self.name = name
        self.preload = [__name__, *preload]
        self._executor: Optional[ProcessPoolExecutor] = None

    default_workers = staticmethod(default_workers)

    def _start(self) -> Optional[ProcessPoolExecutor]:
        """The executor, started if needed; None (and ``workers`` 0) when the main script forbids workers."""
        if self._executor is None:
            if _in_bootstrapping_worker():
                raise RuntimeError(
                    f"{self.name}: a worker process re-ran the main script while starting and reached code that "
                    f"starts a worker pool; {GUARD_HINT}"
                )
            script = unguarded_main_script()
            if script is not None:
                warnings.warn(
                    f"{self.name}: the main script {script} has no `if __name__ == \"__main__\":` guard, so every "
                    f"worker process would run it again; solving in the main process instead ({GUARD_HINT})",
                    stacklevel=4,
                )
                self.workers = 0
                return None
            # forkserver/spawn: the workers do not inherit the training process's threads.
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            ctx = multiprocessing.get_context(method)
            if method == "forkserver":
                ctx.set_forkserver_preload(list(self.preload))
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=ctx, initializer=_watch_trainer, initargs=(os.getpid(),)
            )
        return self._executor

    def run(self, fn: Callable[..., Any], chunks: Sequence[tuple]) -> List[Any]:
        """``[fn(*c) for c in chunks]``, the first chunk here and the others in the workers."""
        if self.workers == 0 or len(chunks) < 2:
            return [fn(*c) for c in chunks]
        try:
            executor = self._start()
            if executor is None:
                return [fn(*c) for c in chunks]
            futures = [executor.submit(fn, *c) for c in chunks[1:]]
        except (BrokenProcessPool, OSError) as exc:
            return self._fall_back(exc, fn, chunks)
        except RuntimeError as exc:
            if _in_bootstrapping_worker():
                raise
            return self._fall_back(exc, fn, chunks)
        head = fn(*chunks[0])
        try:
            return [head] + [f.result() for f in futures]
        except BrokenProcessPool as exc:
            return self._fall_back(exc, fn, chunks)

    def _fall_back(self, exc: BaseException, fn, chunks) -> List[Any]:
        hint = ""
        if unguarded_main_script() is None and getattr(sys.modules.get("__main__"), "__file__", None):
            hint = (f"; if the main script starts training outside its `if __name__ == \"__main__\":` block, "
                    f"each worker runs it again and fails: {GUARD_HINT}")
        warnings.warn(f"{self.name}: worker pool failed ({exc}); solving in the main process from now on{hint}")
        self.close()
        self.workers = 0
        return [fn(*c) for c in chunks]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
