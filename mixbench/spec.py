"""Run specifications: one RunSpec per grid cell, fully resolved before training.

A RunSpec holds every option that can change a run's numbers. Its ``run_id``
is a hash of those options, so the same grid always maps to the same run
directories (which makes re-running a grid idempotent) and a changed option
never silently reuses an old result. A method from a plugin (:mod:`mixbench.plugins`)
adds the hash of its source file to the identity (``method_source``), so an edited
method is a new run; built-in methods add nothing, which keeps their run ids.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mixbench import UsageError, plugins
from mixbench.data import DECODE_CHOICES, check_data_options, dataset_slug, get_dataset_info
from mixbench.losses import get_loss
from mixbench.methods import get_method, list_methods
from mixbench.models import STEMS

# Options that change where and how fast a run goes, not its numbers.
_NOT_IN_ID = ("device", "data_dir", "download", "compile", "eval", "filter_usage_every", "checkpoint_every_min",
              "tensorboard", "plugins")
_DATA_DEFAULTS = {"train_subset": None, "data_mode": "auto", "image_size": None, "nproc": 1, "sync_bn": False,
                  "decode": "cpu"}


@dataclass
class RunSpec:
    method: str
    dataset: str
    seed: int = 0
    method_params: Dict[str, Any] = field(default_factory=dict)
    model: Optional[str] = None  # None: the data set's default
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    stem: Optional[str] = None  # None: the data set's default, else auto (see mixbench.models.STEMS)
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: Optional[float] = None
    schedule: str = "cosine"  # cosine | multistep
    milestones: List[float] = field(default_factory=lambda: [0.5, 0.75])  # multistep: fractions (<1) or epochs
    gamma: float = 0.1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    loss: Optional[str] = None  # None: the data set's (bce on CIFAR, Tiny-ImageNet and digits, else ce); mixbench.losses
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  # on CUDA (ignored on CPU)
    compile: Optional[bool] = None  # torch.compile the model; None: on CUDA yes, on the CPU no
    device: str = "auto"
    data_dir: Optional[str] = None
    download: bool = False
    train_subset: Optional[int] = None  # a stratified subset of the training split (seeded by `seed`)
    data_mode: str = "auto"  # image-file sets: auto | memory | stream
    image_size: Optional[int] = None  # None: the data set's declared size
    # Streamed image files: decoded by PIL in the loader's workers (cpu), or JPEGs batch-decoded on the run's
    # device with torchvision (gpu; mixbench.data.jpeg). Crops and flips are the same draws; pixels differ slightly.
    decode: str = "cpu"
    eval: List[str] = field(default_factory=list)  # evaluation suites to run after training
    filter_usage_every: int = 0  # per-stage filter usage into metrics.jsonl every N epochs (0: off)
    # A checkpoint at the end of the first epoch this many minutes after the previous one (0: every epoch);
    # the last epoch and a preemption signal always write one. Resume stays exact (epoch boundaries).
    checkpoint_every_min: float = 10.0
    tensorboard: bool = False  # TensorBoard event files of the per-epoch metrics in the run folder (mixbench.tblog)
    # Plugin files (absolute paths) or modules that define this run's method or evaluation suites: a worker
    # imports them before it trains (RunSpec.from_record). Filled by `resolved`; not part of the run id.
    plugins: List[str] = field(default_factory=list)
    # The hash of a plugin method's source file, part of the run id (None, and left out of it, for built-ins).
    method_source: Optional[str] = None
    # Data parallel (mixbench.distributed): processes of the run (the global batch stays batch_size), and
    # batch norm over the global batch instead of each process's shard.
    nproc: int = 1
    sync_bn: bool = False

    # -- construction ---------------------------------------------------
    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RunSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise UsageError(f"unknown run option(s) {', '.join(bad)}; valid: {', '.join(sorted(names))}")
        return cls(**d)

    @classmethod
    def from_record(cls, d: Dict[str, Any]) -> "RunSpec":
        """A recorded spec (launch record, Slurm task, spec.yaml) in a worker process: the plugins it
        names are imported first, so that its method and suites are registered there too.

        Every entry point that trains or evaluates a recorded spec in a new process goes through
        here (local parallel workers, Slurm array tasks; data-parallel ranks must too).
        """
        plugins.load_plugins(d.get("plugins") or [])
        return cls.from_dict(dict(d))

    def resolved(self) -> "RunSpec":
        """Fill unset options from the data set's defaults and check every value."""
        info = get_dataset_info(self.dataset)
        given = plugins.load_plugins(self.plugins)
        get_method(self.method)
        spec = dataclasses.replace(self)
        for key, value in info.defaults.items():
            if getattr(spec, key) is None:
                setattr(spec, key, value)
        if spec.stem is None:
            spec.stem = "auto"
        if spec.loss is None:
            spec.loss = "ce"
        spec.method_params = {**get_method(self.method).default_params(), **self.method_params}
        needed = [("method", self.method)] + [("suite", str(s)) for s in (self.eval or [])]
        spec.plugins = list(dict.fromkeys(given + plugins.refs_for(needed)))
        source = plugins.source_hash("method", self.method)
        if self.method_source is not None and source is not None and source != self.method_source:
            raise UsageError(f"method {self.method!r}: its source ({plugins.origin('method', self.method)}) changed "
                             f"since this run was planned (hash {self.method_source}, now {source}); run the grid "
                             "again to plan the edited method as a new run")
        spec.method_source = source
        spec.validate()
        return spec

    def validate(self) -> None:
        def positive(name: str, value, kind=int):
            if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"{name} must be a positive {kind.__name__}, got {value!r}")

        positive("epochs", self.epochs)
        positive("batch_size", self.batch_size)
        positive("lr", float(self.lr), float)
        if self.weight_decay < 0:
            raise UsageError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        get_loss(self.loss)
        if self.stem not in STEMS:
            raise UsageError(f"unknown stem {self.stem!r}; choose from: {', '.join(STEMS)}")
        if self.schedule not in ("cosine", "multistep"):
            raise UsageError(f"unknown schedule {self.schedule!r}; choose from: cosine, multistep")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UsageError(f"unknown device {self.device!r}; choose from: auto, cpu, cuda, cuda:N")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise UsageError(f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs!r}")
        if not isinstance(self.filter_usage_every, int) or self.filter_usage_every < 0:
            raise UsageError(f"filter_usage_every must be an integer >= 0 (0: off), got {self.filter_usage_every!r}")
        every = self.checkpoint_every_min
        if isinstance(every, bool) or not isinstance(every, (int, float)) or not every >= 0:
            raise UsageError(f"checkpoint_every_min must be a number of minutes >= 0 (0: every epoch), got {every!r}")
        if not isinstance(self.tensorboard, bool):
            raise UsageError(f"tensorboard must be true or false, got {self.tensorboard!r}")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise UsageError(f"compile must be true, false or unset (unset: on CUDA only), got {self.compile!r}")
        check_data_options(self.train_subset, self.data_mode, self.image_size)
        if self.decode not in DECODE_CHOICES:
            raise UsageError(f"unknown decode {self.decode!r}; choose from: {', '.join(DECODE_CHOICES)}")
        positive("nproc", self.nproc)
        if self.nproc > 1 and self.batch_size % self.nproc:
            raise UsageError(f"batch_size {self.batch_size} must be divisible by nproc {self.nproc}")
        if not isinstance(self.sync_bn, bool):
            raise UsageError(f"sync_bn must be true or false, got {self.sync_bn!r}")

    # -- identity -------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> Dict[str, Any]:
        # Data and data-parallel options at their defaults stay out, so that adding them kept earlier run ids;
        # sync_bn changes nothing in one process. So does a built-in method's empty method_source, which kept
        # the run ids of built-in methods.
        return {k: v for k, v in self.to_dict().items()
                if k not in _NOT_IN_ID and not (k in _DATA_DEFAULTS and v == _DATA_DEFAULTS[k])
                and not (k == "method_source" and v is None) and not (k == "sync_bn" and self.nproc == 1)}

    @property
    def run_id(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:8]

    def run_dir(self, out: Path) -> Path:
        """``OUT/<dataset>/<model>/<method>/seed<seed>-<run_id>``."""
        return Path(out) / dataset_slug(self.dataset) / str(self.model) / self.method / f"seed{self.seed}-{self.run_id}"


def parse_methods(text: str) -> List[str]:
    """``all`` or a comma-separated list of registered names."""
    if text.strip() == "all":  # every method whose dependencies are installed
        names = []
        for name in list_methods():
            if get_method(name).available():
                names.append(name)
            else:
                print(f"mixbench: skipping {name}: {get_method(name).unavailable_reason()}", file=sys.stderr)
        return names
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise UsageError("--methods is empty; give 'all' or a comma-separated list")
    for name in names:
        get_method(name)  # an unknown name is a usage error; availability is checked with the run's parameters
    return names


def parse_seeds(text: str) -> List[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise UsageError(f"--seeds must be non-negative integers, got {text!r}")
    return seeds


def expand_grid(methods: Sequence[str], seeds: Sequence[int], **options: Any) -> List[RunSpec]:
    """Methods x seeds, every cell resolved."""
    return [RunSpec.from_dict({"method": m, "seed": s, **options}).resolved() for m in methods for s in seeds]
