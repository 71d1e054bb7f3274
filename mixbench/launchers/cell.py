"""The unit of work of every launcher: one cell of a grid, trained and then evaluated.

``run_local`` (in this process), the workers of ``run_parallel`` (one per GPU), the Slurm array
tasks, and the ranks of a data-parallel run (local, torchrun or Slurm) all call
:func:`train_and_evaluate`; they differ only in where it runs and how its outcome is recorded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from mixbench.results import is_complete, read_result
from mixbench.spec import RunSpec


def train_and_evaluate(spec: RunSpec, run_dir: Path, *, progress: bool, desc: str) -> Dict[str, Any]:
    """Train one cell unless its result is complete, then run the evaluation suites it asks for
    (``spec.eval``) that its result.json does not hold yet. Returns its result.json.

    In a data-parallel run every rank trains; the writer (rank 0) alone evaluates, as it alone writes
    result.json (the suites run in one process on the writer's device).

    Training resumes from the run's last good checkpoint and holds the run's lock
    (:func:`mixbench.train.train_run`: ``RunLocked`` if another live process trains it, ``RunFailed``
    after a failed run wrote its result.json, which skips the evaluations).
    """
    if is_complete(run_dir):
        result = read_result(run_dir)
    else:
        from mixbench.train import train_run  # torch-heavy import kept off the CLI's start-up path

        result = train_run(spec, run_dir, progress=progress, desc=desc)
    if spec.eval:
        from mixbench.distributed import Parallel
        from mixbench.evaluate import ensure_evaluated

        if not Parallel.current().writer:
            return result

        result = ensure_evaluated(run_dir, spec.eval, device=spec.device)
    return result
