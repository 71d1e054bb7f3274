"""``mixbench evaluate``: run evaluation suites on finished runs.

``evaluate_run(run_dir, suites)`` loads a finished run (``spec.yaml``, ``model.pt``), puts its test
split (or a fixed random subset of it) through the requested suites (:mod:`mixbench.evaluations`,
one module each) and merges their numbers into the run's ``result.json`` under ``eval`` (one atomic
rewrite; other suites already there are kept). Timing and the options used go to ``eval_meta``.

The test set comes through the run's data loaders (``mixbench.data.make_loaders``, at the run's image
size): in-memory data sets are held whole on the device, image-file data sets that the run streamed
are decoded a batch at a time (the evaluation's subsets with the test-time resize and centre crop).

Suites (keyword options in brackets, set from the CLI with ``--set SUITE.KEY=VALUE``): adversarial
[eps, pgd_steps, pgd_step_size], corruption [corruptions, severities], deformation [rotation, scale,
elastic], feature_removal [ks], filter_usage, calibration [bins], loss_landscape [directions, radius,
span, points, split, contour, contour_points]; see each module's docstring.
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import yaml

from mixbench import UsageError, data, plugins
from mixbench.devices import resolve_device
from mixbench.evaluations import SUITES, EvalContext, ImageSet, PixelModel, get_suite, register_suite  # noqa: F401
from mixbench.evaluations.base import generator
from mixbench.models import create_model
from mixbench.results import atomic_write_json, git_commit, is_complete, read_result
from mixbench.spec import RunSpec


def parse_suites(text: str) -> List[str]:
    """``all`` or a comma-separated list of suite names."""
    plugins.load_entry_points()
    names = list(SUITES) if text.strip() == "all" else [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise UsageError("--suite is empty; give 'all' or a comma-separated list")
    for name in names:
        if name not in SUITES:
            raise UsageError(f"unknown evaluation suite {name!r}; choose from: all, {', '.join(SUITES)}")
    return list(dict.fromkeys(names))


def parse_options(items: Iterable[str]) -> Dict[str, Dict[str, Any]]:
    """``["adversarial.eps=0.03", "corruption.corruptions=[contrast]"]`` -> per-suite keyword options."""
    options: Dict[str, Dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        suite, dot, name = key.partition(".")
        if not sep or not dot:
            raise UsageError(f"--set {item!r}: expected SUITE.KEY=VALUE")
        if suite not in SUITES:
            raise UsageError(f"--set {item!r}: unknown suite {suite!r}; choose from: {', '.join(SUITES)}")
        valid = SUITES[suite].options()
        if name not in valid:
            raise UsageError(
                f"--set {item!r}: unknown option {name!r} for {suite}; valid: {', '.join(valid) or '(none)'}"
            )
        options.setdefault(suite, {})[name] = _check_option(item, yaml.safe_load(value), valid[name])
    return options


def _check_option(item: str, value: Any, default: Any) -> Any:
    """``value`` if it has the kind of ``default`` (numbers for numbers, lists of them for lists), else a usage error."""
    def number(v: Any, kind: type) -> bool:
        return isinstance(v, (int, float) if kind is float else kind) and not isinstance(v, bool)

    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = number(value, type(default))
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:  # a list (of numbers or of names), or None meaning a list of integers
        kind = type(default[0]) if default else int
        items = value if isinstance(value, list) else [value]
        ok = bool(items) and all(number(v, kind) if kind in (int, float) else isinstance(v, kind) for v in items)
    if not ok:
        raise UsageError(f"--set {item!r}: expected a value like {default!r}")
    return value


def check_options(suite: str, options: Dict[str, Any]) -> None:
    """Values a suite cannot use, reported before any run is loaded."""
    get_suite(suite).check(options)


def finished_run_dirs(paths: Iterable[Path]) -> List[Path]:
    """Run directories (a result.json beside a model.pt) at or below each path."""
    found: List[Path] = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise UsageError(f"{str(path)!r} does not exist; give a run directory or a results folder")
        if (path / "result.json").exists():
            found.append(path)  # named explicitly: an unfinished run is an error (in load_run)
            continue
        for result in sorted(path.rglob("result.json")):
            if is_complete(result.parent) and (result.parent / "model.pt").exists():
                found.append(result.parent)
            else:
                print(f"mixbench: skipping {result.parent}: not a finished run", file=sys.stderr)
    if not found:
        raise UsageError(f"no finished runs (result.json with model.pt) under {', '.join(map(str, paths))}")
    return list(dict.fromkeys(found))


def _subset(n: int, limit: Optional[int], seed: int, salt: str) -> torch.Tensor:
    if limit is None or limit >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=generator(seed, "subset", salt))[:limit].sort().values


def check_finished(run_dir: Path) -> None:
    """A one-line error unless ``run_dir`` holds a complete result.json and its model.pt."""
    result = read_result(run_dir)
    if not result or result.get("status") != "complete" or not (Path(run_dir) / "model.pt").exists():
        raise UsageError(f"{run_dir} is not a finished run (needs result.json with status complete and model.pt)")


def load_run(run_dir: Path, device: torch.device):
    """(resolved RunSpec, PixelModel in eval mode on ``device``, (train loader, test loader)) of a finished run."""
    run_dir = Path(run_dir)
    check_finished(run_dir)
    spec = RunSpec.from_dict(yaml.safe_load((run_dir / "spec.yaml").read_text()))
    loaders = data.make_loaders(spec, torch.device("cpu"))
    info = loaders[1].info
    model = create_model(spec.model, num_classes=info.num_classes, in_chans=info.in_chans,
                         image_size=info.image_size, stem=spec.stem, **spec.model_kwargs)
    model.load_state_dict(torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True))
    wrapped = PixelModel(model, info.mean, info.std).to(device).eval()
    for p in wrapped.parameters():
        p.requires_grad_(False)
    return spec, wrapped, loaders


def image_sets(loaders: Tuple[Any, Any], max_samples: Optional[int], seed: int, batch_size: int,
               device: torch.device) -> Tuple[ImageSet, ImageSet]:
    """(test, train) ImageSets: a fixed random subset of ``max_samples`` of each split (all of the test
    split; as many training images), without augmentation. In memory for in-memory loaders, else
    streamed from the image files (test-time resize and centre crop for both splits)."""
    train, test = loaders
    info = test.info
    if test.mode == "memory":
        test_idx = _subset(len(test.labels), max_samples, seed, "test")
        train_idx = _subset(len(train.labels), max_samples, seed, "train")
        return (ImageSet(test.labels[test_idx], device, images=test.images[test_idx]),
                ImageSet(train.labels[train_idx], device, images=train.images[train_idx]))
    sets = []
    for samples, salt in ((test.samples, "test"), (train.samples, "train")):
        idx = _subset(len(samples), max_samples, seed, salt).tolist()
        chosen = [samples[i] for i in idx]
        loader = data.StreamLoader(chosen, image_size=info.image_size, batch_size=batch_size, mean=info.mean,
                                   std=info.std, device=device, train=False)
        labels = torch.tensor([label for _, label in chosen], dtype=torch.long)
        sets.append(ImageSet(labels, device, loader=loader, mean=info.mean, std=info.std))
    return sets[0], sets[1]


def evaluate_run(
    run_dir: Path,
    suites: Sequence[str],
    *,
    max_samples: Optional[int] = None,
    batch_size: int = 256,
    device: str = "auto",
    seed: int = 0,
    options: Optional[Dict[str, Dict[str, Any]]] = None,
    cache_dir: Optional[Path] = None,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> Dict[str, Any]:
    """Run ``suites`` on a finished run and merge them into its result.json (atomically); return it."""
    run_dir = Path(run_dir)
    options = options or {}
    for name in suites:
        check_options(name, options.get(name, {}))
    dev = resolve_device(device)
    spec, model, loaders = load_run(run_dir, dev)
    test, train = image_sets(loaders, max_samples, seed, batch_size, dev)
    if cache_dir is None:
        cache_dir = Path(spec.data_dir or data.default_data_dir()) / "corrupted" / spec.dataset
    ctx = EvalContext(model=model, test=test, train=train, batch_size=batch_size, seed=seed, device=dev,
                      run_dir=run_dir, cache_dir=cache_dir)
    new, meta = {}, {}
    commit = git_commit()  # the evaluation code, as a run's git_commit is the training code's
    for name in suites:
        t0 = time.perf_counter()
        new[name] = SUITES[name](ctx, **options.get(name, {}))
        elapsed = time.perf_counter() - t0
        meta[name] = {"time_s": round(elapsed, 3), "samples": len(ctx.test), "train_samples": len(ctx.train),
                      "seed": seed, "options": options.get(name, {}),
                      "device": str(dev), "git_commit": commit,
                      "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        log(f"{run_dir}: {name} {SUITES[name].summary(new[name])} ({elapsed:.1f} s)")
    result = read_result(run_dir)  # re-read just before the write: keep whatever else is there
    result["eval"] = {**result.get("eval", {}), **new}
    result["eval_meta"] = {**result.get("eval_meta", {}), **meta}
    atomic_write_json(run_dir / "result.json", result)
    return result


def ensure_evaluated(run_dir: Path, suites: Sequence[str], **kwargs: Any) -> Dict[str, Any]:
    """Run only the suites of ``suites`` that the run's result.json does not hold yet."""
    result = read_result(run_dir) or {}
    missing = [s for s in suites if s not in result.get("eval", {})]
    return evaluate_run(run_dir, missing, **kwargs) if missing else result


def run_cli(args: argparse.Namespace) -> int:
    """``mixbench evaluate``."""
    suites = parse_suites(args.suite)
    options = parse_options(args.set or [])
    for suite in options:
        if suite not in suites:
            raise UsageError(f"--set gives options for {suite!r}, which is not among --suite {args.suite!r}")
    run_dirs = finished_run_dirs(args.paths)
    for run_dir in run_dirs:  # every input and every option checked before the first run is evaluated
        check_finished(run_dir)
    for suite in suites:
        check_options(suite, options.get(suite, {}))
    for run_dir in run_dirs:
        evaluate_run(run_dir, suites, max_samples=args.max_samples, batch_size=args.batch_size,
                     device=args.device, seed=args.seed, options=options, cache_dir=args.cache_dir)
    print(f"evaluated {len(run_dirs)} run(s): {', '.join(suites)}")
    return 0
