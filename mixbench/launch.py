"""Running a grid of RunSpecs: skip what is done, train the rest, collect the results."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

from mixbench.results import is_complete, read_result
from mixbench.spec import RunSpec


def run_local(specs: Sequence[RunSpec], out: Path, *, progress: bool = True) -> List[Dict[str, Any]]:
    """Train every cell of ``specs`` in this process, one after the other; return their results."""
    from mixbench.train import train_run  # torch-heavy import kept off the CLI's start-up path

    results = []
    for i, spec in enumerate(specs, 1):
        run_dir = spec.run_dir(out)
        label = f"[{i}/{len(specs)}] {spec.method} seed {spec.seed}"
        if is_complete(run_dir):
            print(f"{label}: already complete in {run_dir}, skipped", file=sys.stderr)
            results.append(read_result(run_dir))
        else:
            results.append(train_run(spec, run_dir, progress=progress, desc=label))
        if spec.eval:  # suites requested with the run (--eval); only those not yet in result.json run
            from mixbench.evaluate import ensure_evaluated

            results[-1] = ensure_evaluated(run_dir, spec.eval, device=spec.device)
    return results
