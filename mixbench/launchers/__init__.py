"""Launchers: ways of running the cells of a grid, all around one unit of work.

- :mod:`~mixbench.launchers.cell`: the unit of work, one cell: train it (resuming from its
  checkpoint) unless it is complete, then run its requested evaluation suites. Every launcher
  calls :func:`~mixbench.launchers.cell.train_and_evaluate`.
- :mod:`~mixbench.launchers.local`: in this process one cell after the other (``run_local``),
  or one worker process per GPU (``run_parallel``).
- :mod:`~mixbench.launchers.data_parallel`: data-parallel cells (``--nproc-per-run N``) on this
  machine (several at once on disjoint groups of GPUs), or as ranks of an external ``torchrun``.
- :mod:`~mixbench.launchers.slurm`: a Slurm job array through submitit, one checkpointable task per cell.
- :mod:`~mixbench.launchers.status`: the state of every cell of a grid (``mixbench status``).
- :mod:`~mixbench.launchers.record`: each run folder's ``launch.json`` (how, where and when it was launched).

The submodules are imported where they are used: torch and submitit stay off the CLI's start-up path.
"""
