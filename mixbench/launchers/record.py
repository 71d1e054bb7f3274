"""A run folder's ``launch.json``: how, where and when the run was launched (and why it stopped)."""
from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

from mixbench.spec import RunSpec

LAUNCH_FILE = "launch.json"


def record_launch(run_dir: Path, info: Dict[str, Any]) -> None:
    from mixbench.results import atomic_write_json

    atomic_write_json(Path(run_dir) / LAUNCH_FILE, info)


def read_launch(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = Path(run_dir) / LAUNCH_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def local_launch_info(spec: RunSpec, device: str) -> Dict[str, Any]:
    """The record of a run launched on this machine, by this process."""
    return {"executor": "local", "pid": os.getpid(), "host": socket.gethostname(), "device": device,
            "started_at": now(), "spec": spec.to_dict()}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record_ranks(run_dir: Path) -> None:
    """Add every rank's host and pid to a data-parallel run's launch.json (``ranks``), written by rank 0."""
    import torch.distributed as dist

    mine = {"rank": dist.get_rank(), "host": socket.gethostname(), "pid": os.getpid()}
    ranks: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if dist.get_rank() == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        record_launch(run_dir, {**(read_launch(run_dir) or {}), "ranks": ranks})
