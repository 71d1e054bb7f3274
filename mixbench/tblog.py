"""TensorBoard event files of a training run (the run option ``tensorboard``, ``mixbench run --tensorboard``).

One scalar per number of each epoch's metrics.jsonl line, at global step = the
epoch (0-based, as in metrics.jsonl): ``train_loss``, ``test_top1``,
``test_top5``, ``test_loss``, ``lr``, ``epoch_time_s``, ``epoch_cpu_time_s``,
``train_images_per_s`` and, at the epochs that record it, the filter-usage
numbers (``filter_usage/<stage>/gini``...). The event files go into the run
directory itself, so that ``tensorboard --logdir results/runs`` names each run
by its path: ``<dataset>/<model>/<method>/seed<seed>-<run_id>``.

Exact resume: the writer of a run that starts at epoch ``start`` is opened with
``purge_step=start``, which tells TensorBoard's readers to drop the points at
steps ``start`` and later from the earlier event files (those of epochs trained
after the last checkpoint, before a kill). The writer is flushed at the end of
every epoch, before that epoch's checkpoint can be written, so no point of a
checkpointed epoch is lost to a kill.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional

from mixbench import UsageError


def scalars(record: Dict[str, Any], prefix: str = "") -> Dict[str, float]:
    """The finite numbers of a metrics.jsonl line, nested keys joined by ``/``; ``epoch`` (the step) left out."""
    out: Dict[str, float] = {}
    for key, value in record.items():
        tag = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(scalars(value, tag))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and tag != "epoch":
            if math.isfinite(float(value)):
                out[tag] = float(value)
    return out


class EpochLog:
    """A run's TensorBoard writer: ``log(record)`` once per epoch, ``close()`` at the end; a no-op when off."""

    def __init__(self, run_dir: Path, start_epoch: int, enabled: bool = True):
        self.writer: Optional[Any] = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's writer needs the tensorboard package
            raise UsageError(f"tensorboard event files need the tensorboard package (pip install tensorboard): "
                             f"{exc}") from None
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=int(start_epoch))

    def log(self, record: Dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(record["epoch"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # on disk before this epoch's checkpoint

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
