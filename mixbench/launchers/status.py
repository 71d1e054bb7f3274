"""The state of every cell of a grid (``mixbench status``): done, running, pending or failed, from
each run folder (result.json, launch.json, metrics.jsonl) and, for Slurm cells, Slurm's queue."""
from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mixbench.launchers.record import LAUNCH_FILE, read_launch
from mixbench.launchers.slurm import ACTIVE_STATES, slurm_queue
from mixbench.lock import process_alive
from mixbench.results import read_result
from mixbench.spec import RunSpec


@dataclasses.dataclass
class CellStatus:
    state: str  # done | running | pending | failed
    spec: Dict[str, Any]
    run_dir: Path
    detail: str = ""
    log: Optional[str] = None


def find_run_dirs(root: Path) -> List[Path]:
    """Run directories below ``root``: those with a result.json, spec.yaml or launch.json."""
    root = Path(root)
    found = set()
    for name in ("result.json", "spec.yaml", LAUNCH_FILE):
        for p in root.rglob(name):
            found.add(p.parent)
    return sorted(found)


def _epochs_done(run_dir: Path) -> int:
    try:
        with open(run_dir / "metrics.jsonl") as f:
            return sum(1 for line in f if line.endswith("\n"))
    except OSError:
        return 0


def cell_status(run_dir: Path, spec: Optional[Dict[str, Any]] = None,
                queue: Optional[Dict[str, str]] = None) -> CellStatus:
    """The state of one grid cell from its run directory (and Slurm's queue for submitted cells)."""
    import yaml

    run_dir = Path(run_dir)
    launch = read_launch(run_dir)
    if spec is None:
        spec = (launch or {}).get("spec")
        if spec is None and (run_dir / "spec.yaml").exists():
            spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
        spec = spec or {}
    result = read_result(run_dir) if (run_dir / "result.json").exists() else None
    if result and result.get("status") == "complete":
        return CellStatus("done", spec, run_dir, f"top1 {result.get('final_top1', float('nan')):.2f}")
    epochs = spec.get("epochs")
    progress = f"epoch {_epochs_done(run_dir)}/{epochs}" if epochs else f"{_epochs_done(run_dir)} epochs"
    queued = launch and launch.get("executor") == "slurm" and (queue or {}).get(str(launch.get("job_id")))
    if result and result.get("status") == "failed" and queued not in ACTIVE_STATES:
        return CellStatus("failed", spec, run_dir, f"{result.get('error', 'failed')} at {progress}",
                          (launch or {}).get("stderr"))
    if launch is None:
        if (run_dir / "checkpoint.pt").exists() or _epochs_done(run_dir):
            return CellStatus("pending", spec, run_dir, f"stopped at {progress}; rerun to resume")
        return CellStatus("pending", spec, run_dir, "not started")
    if launch.get("executor") == "slurm":
        job = str(launch.get("job_id"))
        log = launch.get("stderr")
        if queue is None:
            return CellStatus("pending", spec, run_dir, f"job {job}, state unknown (squeue unavailable)", log)
        state = queue.get(job)
        if state in ("RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT"):
            return CellStatus("running", spec, run_dir, f"job {job}, {progress}", log)
        if state in ACTIVE_STATES:
            return CellStatus("pending", spec, run_dir, f"job {job} {state.lower()}, {progress}", log)
        why = f"job {job} {state.lower()}" if state else f"job {job} left the queue"
        return CellStatus("failed", spec, run_dir, f"{why} without a result at {progress}", log)
    # local
    if launch.get("error"):
        return CellStatus("failed", spec, run_dir, f"{launch['error']} at {progress}")
    if launch.get("host") == socket.gethostname() and _recorded_pid_alive(launch.get("pid")):
        return CellStatus("running", spec, run_dir, f"pid {launch['pid']}, {progress}")
    return CellStatus("pending", spec, run_dir, f"stopped at {progress}; rerun to resume")


def _recorded_pid_alive(pid: Any) -> bool:
    """Whether a pid read from a launch record names a live process (a missing or bad value does not)."""
    try:
        return process_alive(int(pid))
    except (TypeError, ValueError):
        return False


def grid_status(specs: Optional[Sequence[RunSpec]], out: Path) -> List[CellStatus]:
    """Every cell of ``specs`` (or every run directory found under ``out`` when ``specs`` is None)."""
    out = Path(out)
    if specs is not None:
        cells = [(s.run_dir(out), s.to_dict()) for s in specs]
    else:
        cells = [(d, None) for d in find_run_dirs(out)]
    launches = [read_launch(d) for d, _ in cells]
    queue = slurm_queue() if any(la and la.get("executor") == "slurm" for la in launches) else {}
    return [cell_status(d, s, queue) for d, s in cells]


def format_status(cells: Sequence[CellStatus], out: Path) -> str:
    out = Path(out)
    lines = []
    for c in cells:
        s = c.spec
        try:
            where = c.run_dir.relative_to(out)
        except ValueError:
            where = c.run_dir
        line = (f"{c.state:8s} {s.get('method', '?'):16s} {s.get('dataset', '?'):10s} {str(s.get('model', '?')):20s} "
                f"seed {s.get('seed', '?')!s:3s} {c.detail}")
        if c.state in ("failed",) and c.log:
            line += f"  log: {c.log}"
        lines.append(f"{line}  [{where}]")
    counts = {k: sum(c.state == k for c in cells) for k in ("done", "running", "pending", "failed")}
    lines.append(f"{len(cells)} cells: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(lines)
