"""Which torch device a run uses: ``--device`` resolved, with a loud warning when ``auto``
falls back to the CPU on a machine that was asked for GPUs."""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch

from mixbench import UsageError


def gpus_requested(environ=None) -> Optional[str]:
    """The environment variable (``NAME=value``) that says GPUs were asked for, or None.

    GPUs are asked for when ``CUDA_VISIBLE_DEVICES`` lists devices, or Slurm allocated GPUs
    (``SLURM_GPUS*``, ``SLURM_JOB_GPUS``, ``SLURM_STEP_GPUS``).
    """
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in ("-1", "NoDevFiles") and not visible.startswith("-"):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    for name in sorted(env):
        value = env[name].strip()
        if name in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):  # GPU indices: any is a GPU
            if value and value.lower() not in ("none", "(null)"):
                return f"{name}={value}"
        elif name.startswith("SLURM_GPUS"):  # counts, possibly typed (a100:2): 0 is none
            if value and value.lower() not in ("0", "none", "(null)") and not value.endswith(":0"):
                return f"{name}={value}"
    return None


_WARNED_CPU_FALLBACK = False


def resolve_device(name: str, *, warn: bool = False) -> torch.device:
    """The torch device of ``--device`` (``auto``: CUDA when available, else the CPU).

    With ``warn``, ``auto`` falling back to the CPU on a machine that was asked for GPUs prints a
    loud warning (once per process): the run would otherwise go on, 50 times slower, unnoticed.
    """
    global _WARNED_CPU_FALLBACK
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        asked = gpus_requested()
        if warn and asked and not _WARNED_CPU_FALLBACK:
            _WARNED_CPU_FALLBACK = True
            bar = "!" * 78
            print(f"{bar}\nmixbench: WARNING: --device auto found no usable CUDA device although {asked}; "
                  "training on the CPU.\nmixbench: check the driver and that this torch build has CUDA "
                  f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda}); pass --device cuda "
                  "to fail instead, or --device cpu to silence this.\n"
                  "mixbench: a run started here cannot be resumed on a GPU (and the reverse).\n"
                  f"{bar}", file=sys.stderr, flush=True)
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; choose from: auto, cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine sees {torch.cuda.device_count()} CUDA device(s) "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return device
