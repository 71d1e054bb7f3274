"""The ``mixbench`` command line."""
from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixbench", description="Benchmark mixup-family augmentations on timm CNNs."
    )
    parser.add_argument("--version", action="version", version=f"mixbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list registered methods, data sets or models")
    p.add_argument("what", choices=["methods", "datasets", "models"])

    p = sub.add_parser("run", help="train a grid of (method, seed) runs")
    p.add_argument("--methods", default="all", help="'all' or a comma-separated list (default: all)")
    p.add_argument("--dataset", default="digits", help="data set name (default: digits; see `mixbench list datasets`)")
    p.add_argument("--model", help="timm model name or alias (default: the data set's)")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr", type=_positive_float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=["cosine", "multistep"])
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default: {DEFAULT_OUT})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--data-dir", help="data folder (default: $MIXBENCH_DATA or ~/.cache/mixbench)")
    p.add_argument("--download", action="store_true", help="download the data set if it is missing")
    p.add_argument("--train-subset", type=_positive_int, metavar="N",
                   help="train on a stratified subset of N images (seeded by each run's seed)")
    p.add_argument("--data-mode", choices=["auto", "memory", "stream"],
                   help="image-file data sets: decode once into memory, or stream from disk (default: auto)")
    p.add_argument("--image-size", type=_positive_int, help="resize to this size (default: the data set's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--eval", help="evaluation suites to run after training: 'all' or a comma-separated list "
                   "(see `mixbench evaluate`)")

    p = sub.add_parser("report", help="Markdown/LaTeX/CSV tables and plots from run directories")
    p.add_argument("results", nargs="*", type=Path, metavar="RESULTS_DIR",
                   help=f"folders searched for result.json (default: {DEFAULT_OUT})")
    p.add_argument("--out", type=Path, help="report folder (default: FIRST_RESULTS_DIR/report)")
    p.add_argument("--metric", default="final", help="top-1 rule: final, best or last10 (default: final)")
    p.add_argument("--format", default="md,latex,csv", help="comma-separated: md, latex, csv (default: all)")
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
    return parser


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        from mixbench.methods import get_method, list_methods

        for name in list_methods():
            params = ", ".join(f"{k}={v!r}" for k, v in get_method(name).default_params().items())
            print(f"{name:16s} {params}")
    elif args.what == "datasets":
        from mixbench.data import dataset_descriptions

        for name, text in dataset_descriptions().items():
            print(f"{name:16s} {text}")
    else:
        from mixbench.models import ALIASES, list_model_names

        for alias, (target, kwargs) in ALIASES.items():
            extra = f" {kwargs}" if kwargs else ""
            print(f"{alias:24s} -> {target}{extra}")
        for name in list_model_names()[len(ALIASES):]:
            print(name)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from mixbench.data import normalise_dataset_name
    from mixbench.launch import run_local
    from mixbench.report import summary_table
    from mixbench.spec import expand_grid, parse_methods, parse_seeds

    methods = parse_methods(args.methods)
    seeds = parse_seeds(args.seeds)
    args.dataset = normalise_dataset_name(args.dataset, args.data_dir)  # imagefolder[:PATH] -> absolute path
    if args.data_dir and not Path(args.data_dir).is_dir() and not args.download:
        raise UsageError(f"--data-dir {args.data_dir!r} is not a folder (pass --download to create and fill it)")
    options = {"dataset": args.dataset, "device": args.device, "data_dir": args.data_dir, "download": args.download,
               "compile": args.compile}
    for key in ("model", "epochs", "batch_size", "lr", "weight_decay", "schedule", "train_subset", "data_mode",
                "image_size"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.eval:
        from mixbench.evaluate import parse_suites

        options["eval"] = parse_suites(args.eval)
    specs = expand_grid(methods, seeds, **options)
    if specs:
        from mixbench.models import resolve_model_name

        resolve_model_name(specs[0].model)
    results = run_local(specs, args.out, progress=not args.no_progress)
    print()
    print(summary_table(results))
    print(f"\nresults in {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mixbench.report import parse_formats, parse_metric, write_report

    metric, formats = parse_metric(args.metric), parse_formats(args.format)
    roots = args.results or [DEFAULT_OUT]
    out = args.out or roots[0] / "report"
    report = write_report(roots, out, metric=metric, formats=formats, plots=not args.no_plots)
    print(report["markdown"])
    print(f"{len(report['runset'].runs)} complete runs, {len(report['runset'].problems)} incomplete or failed")
    print(f"report in {out}:")
    for path in report["files"]:
        print(f"  {path}")
    return 0


COMMANDS = {"list": cmd_list, "run": cmd_run, "report": cmd_report}


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mixbench.evaluate import run_cli

    return run_cli(args)


COMMANDS["evaluate"] = cmd_evaluate


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"mixbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mixbench: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"mixbench: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
