"""The ``mixbench`` command line."""
from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import List, Optional

from mixbench import UsageError, __version__

DEFAULT_OUT = Path("results") / "runs"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid positive integer {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid positive number {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def _add_plugins(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugins", action="append", metavar="FILE.py|MODULE",
                   help="methods or evaluation suites of your own: a Python file or an importable module "
                        "(comma-separated or repeated; see `mixbench new-method`)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixbench", description="Benchmark mixup-family augmentations on timm CNNs."
    )
    parser.add_argument("--version", action="version", version=f"mixbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list registered methods (and where each comes from), data sets or models")
    p.add_argument("what", choices=["methods", "datasets", "models"])
    _add_plugins(p)

    p = sub.add_parser("run", help="train a grid of runs (here, or as a Slurm job array)")
    p.add_argument("--config", type=Path, metavar="BENCHMARK.yaml",
                   help="benchmark (a YAML grid, e.g. benchmarks/digits.yaml); the flags below override it")
    _add_plugins(p)
    p.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="local: train here (one run per GPU in parallel); slurm: submit one job array and return")
    p.add_argument("--profile", type=Path, metavar="PROFILE.yaml",
                   help="Slurm profile (partition, GPUs, time...; e.g. slurm/example.yaml); with --executor slurm")
    p.add_argument("--dry-run", action="store_true",
                   help="print the grid (and the sbatch script with --executor slurm) without running anything")
    p.add_argument("--methods", help="'all' or a comma-separated list (default: the benchmark's, else all)")
    p.add_argument("--dataset", help="data set name (default: the benchmark's, else digits; see `mixbench list datasets`)")
    p.add_argument("--model", help="timm model name or alias (default: the data set's)")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr", type=_positive_float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=["cosine", "multistep"])
    p.add_argument("--loss", choices=["ce", "bce"],
                   help="ce: soft-target cross-entropy; bce: BCELoss(softmax), the PuzzleMix code's "
                        "(default: the data set's: bce on CIFAR, Tiny-ImageNet and digits, else ce)")
    p.add_argument("--stem", choices=["auto", "cifar", "cifar-s2", "imagenet"],
                   help="first layers: cifar (3x3 stride 1), cifar-s2 (3x3 stride 2), imagenet (timm's); "
                        "default: the data set's, else auto (cifar at 64 px or less)")
    p.add_argument("--metric", choices=["final", "best", "last10"],
                   help="top-1 rule of the summary printed at the end (default: the benchmark's `metric`, else final)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the benchmark's, else 0)")
    p.add_argument("--out", type=Path, help=f"results folder (default: the benchmark's `out`, else {DEFAULT_OUT})")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--data-dir", help="data folder (default: $MIXBENCH_DATA or ~/.cache/mixbench)")
    p.add_argument("--download", action="store_true", help="download the data set if it is missing")
    p.add_argument("--train-subset", type=_positive_int, metavar="N",
                   help="train on a stratified subset of N images (seeded by each run's seed)")
    p.add_argument("--data-mode", choices=["auto", "memory", "stream"],
                   help="image-file data sets: decode once into memory, or stream from disk (default: auto)")
    p.add_argument("--image-size", type=_positive_int, help="resize to this size (default: the data set's)")
    p.add_argument("--decode", choices=["cpu", "gpu"],
                   help="streamed image files: decode with PIL in the loader's workers (cpu, the default), or JPEGs "
                        "in batches on the run's GPU with torchvision (gpu; other files still decode in the workers)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on CUDA yes, on the CPU no)")
    p.add_argument("--checkpoint-every-min", type=_non_negative_float, metavar="MIN",
                   help="write the training checkpoint at the end of the first epoch MIN minutes after the "
                        "previous one; 0: every epoch (default: 10; the last epoch and a preemption signal "
                        "always checkpoint)")
    p.add_argument("--nproc-per-run", dest="nproc", type=_positive_int, metavar="N",
                   help="data-parallel: train each run in N processes (torch.distributed: NCCL on GPUs, one GPU "
                        "each; Gloo on CPUs); the global batch stays --batch-size (default: 1)")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="with --nproc-per-run: batch norm over the global batch (synchronised BatchNorm)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--tensorboard", action="store_true", default=None,
                   help="write TensorBoard event files of every epoch's metrics into each run folder "
                        "(`tensorboard --logdir OUT` shows every run of the grid; the benchmark option `tensorboard`)")
    p.add_argument("--eval", help="evaluation suites to run after training: 'all' or a comma-separated list "
                   "(see `mixbench evaluate`)")
    p.add_argument("--filter-usage-every", type=_positive_int, metavar="N",
                   help="record per-stage filter usage in metrics.jsonl every N epochs")

    p = sub.add_parser("report", help="Markdown/LaTeX/CSV tables, plots and an HTML page from run directories")
    p.add_argument("results", nargs="*", type=Path, metavar="RESULTS_DIR",
                   help=f"folders searched for result.json (default: {DEFAULT_OUT})")
    p.add_argument("--out", type=Path, help="report folder (default: FIRST_RESULTS_DIR/report)")
    p.add_argument("--metric", default="final", help="top-1 rule: final, best or last10 (default: final)")
    p.add_argument("--format", default="md,latex,csv,html",
                   help="comma-separated: md, latex, csv, html (index.html) (default: all)")
    p.add_argument("--no-plots", action="store_true", help="tables only")

    p = sub.add_parser("evaluate", help="run evaluation suites on finished runs (merged into result.json 'eval')")
    p.add_argument("paths", nargs="+", type=Path, metavar="RUN_DIR|RESULTS_DIR")
    p.add_argument("--suite", default="all", help="'all' or a comma-separated list of: adversarial, corruption, "
                   "deformation, feature_removal, filter_usage, calibration, loss_landscape (default: all)")
    p.add_argument("--max-samples", type=_positive_int, help="a fixed random subset of this many test "
                   "(and, for loss_landscape, training) images (default: all)")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw of the suites (default: 0)")
    p.add_argument("--set", action="append", metavar="SUITE.KEY=VALUE",
                   help="a suite option, e.g. adversarial.eps=0.0157 or corruption.severities=[3] (repeatable)")
    p.add_argument("--cache-dir", type=Path, help="corrupted-image cache (default: DATA_DIR/corrupted/DATASET)")
    _add_plugins(p)

    p = sub.add_parser("status", help="state of every cell of a grid: done / running / pending / failed")
    p.add_argument("results", nargs="?", type=Path, metavar="RESULTS_DIR",
                   help=f"results folder (default: the benchmark's `out` with --config, else {DEFAULT_OUT})")
    p.add_argument("--config", type=Path, metavar="BENCHMARK.yaml",
                   help="list every cell of this benchmark, including those not started")
    p.add_argument("--methods", help="with --config: the same override as given to `run`")
    p.add_argument("--seeds", help="with --config: the same override as given to `run`")
    p.add_argument("--epochs", type=_positive_int, help="with --config: the same override as given to `run`")
    _add_plugins(p)

    p = sub.add_parser("new-method", help="write a documented starting file for a method of your own, and its test")
    p.add_argument("name", help="the method's name (lower case, digits and _), as used in --methods")
    p.add_argument("--dir", type=Path, default=Path("."), help="folder to write NAME.py and test_NAME.py in "
                   "(default: here)")
    return parser


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        from mixbench.methods import get_method, list_methods
        from mixbench.plugins import load_plugins, origin

        load_plugins(args.plugins)
        for name in list_methods():
            params = ", ".join(f"{k}={v!r}" for k, v in get_method(name).default_params().items())
            print(f"{name:16s} {params}  [{origin('method', name)}]")
    elif args.what == "datasets":
        from mixbench.data import dataset_descriptions

        for name, text in dataset_descriptions().items():
            print(f"{name:16s} {text}")
    else:
        from mixbench.models import ALIASES, list_model_names

        for alias, (target, kwargs, _) in ALIASES.items():
            extra = f" {kwargs}" if kwargs else ""
            print(f"{alias:24s} -> {target}{extra}")
        for name in list_model_names()[len(ALIASES):]:
            print(name)
    return 0


def _grid_from_args(args: argparse.Namespace):
    """The grid of `run` / `status`: the --config benchmark (if any) with the command-line flags over it."""
    from mixbench.benchmark import benchmark_out, check_models, expand_benchmark, load_benchmark
    from mixbench.plugins import load_plugins

    load_plugins(getattr(args, "plugins", None))  # before the method names are read
    benchmark = load_benchmark(args.config) if getattr(args, "config", None) else {}
    specs = expand_benchmark(benchmark, _run_overrides(args) if hasattr(args, "methods") else {})
    check_models(specs)
    return specs, (getattr(args, "out", None) or benchmark_out(benchmark, DEFAULT_OUT))


def _run_overrides(args: argparse.Namespace) -> dict:
    """Run options given on the command line (they override a benchmark)."""
    from mixbench.spec import parse_methods, parse_seeds

    # `status` has fewer flags; False is a value only for --no-compile (store_true flags default to False)
    given = {k: v for k, v in vars(args).items() if v is not None and (v is not False or k == "compile")}
    data_dir = given.get("data_dir")
    if data_dir and not Path(data_dir).is_dir() and not given.get("download"):
        raise UsageError(f"--data-dir {data_dir!r} is not a folder (pass --download to create and fill it)")
    options = {k: given[k] for k in _RUN_OPTION_FLAGS if k in given}
    if "methods" in given:
        options["methods"] = parse_methods(given["methods"])
    if "seeds" in given:
        options["seeds"] = parse_seeds(given["seeds"])
    if "eval" in given:
        from mixbench.evaluate import parse_suites

        options["eval"] = parse_suites(given["eval"])
    return options


# Flags of `run` that are RunSpec options of the same name.
_RUN_OPTION_FLAGS = (
    "dataset", "device", "data_dir", "download", "compile", "model", "epochs", "batch_size", "lr", "weight_decay",
    "schedule", "train_subset", "data_mode", "image_size", "filter_usage_every", "loss", "stem",
    "checkpoint_every_min", "tensorboard", "nproc", "sync_bn", "decode",
)


def _check_decode_device(specs) -> None:
    """--decode gpu trains here: it needs CUDA, unless the run asked for the CPU (the same code path there)."""
    import torch

    if any(s.decode == "gpu" and s.device != "cpu" for s in specs) and not torch.cuda.is_available():
        raise UsageError("--decode gpu needs a CUDA device and this machine has none; leave --decode at cpu, or "
                         "pass --device cpu to run the same code path with the CPU's JPEG decoder")


def cmd_run(args: argparse.Namespace) -> int:
    from mixbench.benchmark import describe
    from mixbench.launchers import slurm

    if args.profile and args.executor != "slurm":
        raise UsageError(f"--profile {str(args.profile)!r} needs --executor slurm")
    specs, out = _grid_from_args(args)
    profile = slurm.load_profile(args.profile) if args.executor == "slurm" else None
    if args.dry_run:
        for s in specs:
            print(f"{s.method:16s} {s.dataset:10s} {str(s.model):20s} seed {s.seed}  {s.run_dir(out)}")
        if profile is None:
            print(f"# {describe(specs)}")
        else:
            folder = Path(profile.get("log_dir") or Path(out).resolve() / "slurm-logs")
            print(f"\n# {describe(specs)}; sbatch script:\n")
            print(slurm.sbatch_script(profile, folder, len(specs), max(s.nproc for s in specs)))
        return 0
    if profile is not None:
        slurm.submit_slurm(specs, out, profile)
        return 0
    _check_decode_device(specs)
    from mixbench.benchmark import load_benchmark
    from mixbench.report import METRICS, summary_table

    metric = args.metric or (load_benchmark(args.config).get("metric") if args.config else None) or "final"
    from mixbench.launchers import data_parallel, local

    devices = [] if any(s.nproc > 1 for s in specs) else local.local_devices(specs)
    if data_parallel.under_external_launcher():  # one rank of torchrun: train the grid with the other ranks
        results = data_parallel.run_grid_as_rank(specs, out, progress=not args.no_progress)
        if int(os.environ.get("RANK", 0)) != 0:
            return 0
    elif any(s.nproc > 1 for s in specs):
        results = data_parallel.run_grid_local(specs, out, progress=not args.no_progress)
    elif devices:
        results = local.run_parallel(specs, out, devices, progress=not args.no_progress)
    else:
        results = local.run_local(specs, out, progress=not args.no_progress)
    print()
    print(summary_table(results, metric=METRICS[metric][0]))
    print(f"\nresults in {out}")
    failed = sum(1 for r in results if r and r.get("status") == "failed")
    if failed:
        print(f"mixbench: {failed} run(s) failed (see result.json); rerun to retry them", file=sys.stderr)
    return 1 if failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    from mixbench.launchers.status import format_status, grid_status

    if args.config and args.results:
        out = args.results
    elif args.config:
        out = None
    else:
        out = args.results or DEFAULT_OUT
    if args.config:
        specs, benchmark_out = _grid_from_args(args)
        out = out or benchmark_out
    else:
        specs = None
        if not Path(out).is_dir():
            raise UsageError(f"results folder {str(out)!r} does not exist")
    cells = grid_status(specs, out)
    print(format_status(cells, out))
    return 1 if any(c.state == "failed" for c in cells) else 0


def cmd_report(args: argparse.Namespace) -> int:
    from mixbench.report import parse_formats, parse_metric, write_report

    metric, formats = parse_metric(args.metric), parse_formats(args.format)
    roots = args.results or [DEFAULT_OUT]
    out = args.out or (roots[0].parent if roots[0].is_file() else roots[0]) / "report"
    report = write_report(roots, out, metric=metric, formats=formats, plots=not args.no_plots)
    print(report["markdown"])
    for plain, _ in report["table"].notes:
        if plain.startswith("WARNING"):
            print(f"mixbench: {plain}", file=sys.stderr)
    print(f"{len(report['runset'].runs)} complete run(s), {len(report['runset'].problems)} incomplete or failed")
    print(f"report in {out}:")
    for path in report["files"]:
        print(f"  {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mixbench.evaluate import run_cli
    from mixbench.plugins import load_plugins

    load_plugins(args.plugins)  # suites of your own, before --suite is read
    return run_cli(args)


def cmd_new_method(args: argparse.Namespace) -> int:
    from mixbench.scaffold import write_method

    files = write_method(args.name, args.dir)
    print("\n".join(f"wrote {f}" for f in files))
    method, test = files
    print(f"\nnext:\n  python -m pytest -q {test}\n"
          f"  mixbench run --plugins {method} --methods vanilla,{args.name} --dataset digits --epochs 3")
    return 0


COMMANDS = {"list": cmd_list, "run": cmd_run, "status": cmd_status, "report": cmd_report, "evaluate": cmd_evaluate,
            "new-method": cmd_new_method}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        # The reader went away (`mixbench list models | head`): stop quietly. Point stdout at devnull so
        # that the interpreter's final flush does not fail again (as the Python docs on SIGPIPE advise).
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured)
            pass
        return 0
    except UsageError as exc:
        print(f"mixbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mixbench: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as exc:  # the environment: disk full, no permission, --out under a file...
        where = exc.filename or getattr(args, "out", None)
        hint = "; free some space or choose another --out" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        print(f"mixbench: error: {exc.strerror or exc}" + (f": {where}" if where else "") + hint, file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
