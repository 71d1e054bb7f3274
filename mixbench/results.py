"""Run directories: atomic writes, the result.json schema, provenance.

A run directory holds

- ``spec.yaml``      the fully resolved RunSpec;
- ``metrics.jsonl``  one JSON object per finished epoch, appended and flushed;
- ``checkpoint.pt``  the latest end-of-epoch training state (removed when the run completes);
- ``model.pt``       the final weights (a state_dict), for later evaluation;
- ``result.json``    written once, atomically, when the run ends (schema below).

See the README's "Result schema" section for every field of result.json.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import yaml

SCHEMA_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def atomic_write_yaml(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, yaml.safe_dump(_plain(obj), sort_keys=False).encode())


def _plain(obj: Any) -> Any:
    """Tuples to lists, recursively, so YAML stays plain."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def append_jsonl(path: Path, record: Dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """Every complete line; a torn last line (a crash mid-write) is dropped."""
    records = []
    if not Path(path).exists():
        return records
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            records.append(json.loads(line))
    return records


def read_result(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = Path(run_dir) / "result.json"
    if not path.exists():
        return None
    with open(path) as f:
        return json.load(f)


def is_complete(run_dir: Path) -> bool:
    result = read_result(run_dir)
    return bool(result) and result.get("status") == "complete"


def find_results(roots: Iterable[Path]) -> List[Path]:
    """Every result.json below the given folders, sorted."""
    found = []
    for root in roots:
        root = Path(root)
        if root.is_file() and root.name == "result.json":
            found.append(root)
        else:
            found.extend(root.rglob("result.json"))
    return sorted(set(found))


def git_commit() -> Optional[str]:
    """The commit of the mixbench source tree (with ``-dirty`` when modified), if it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info(device) -> Dict[str, Any]:
    import timm
    import torch

    import mixbench

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
        device_name = f"cpu ({device_name}, {torch.get_num_threads()} threads)"
    return {
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "timm": timm.__version__,
            "mixbench": mixbench.__version__,
        },
        "device": device_name,
        "hostname": platform.node(),
        "git_commit": git_commit(),
    }
