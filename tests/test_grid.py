"""Benchmarks (YAML grids): expansion, per-method overrides, CLI precedence, bad keys; the local launchers."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mixbench import UsageError
from mixbench.cli import main
from mixbench.benchmark import describe, expand_benchmark, load_benchmark
from mixbench.launchers.local import run_parallel
from mixbench.launchers.record import read_launch
from mixbench.results import is_complete
from mixbench.spec import RunSpec, parse_methods

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_lists_expand_in_order_and_options_apply_to_every_cell():
    cells = expand_benchmark({"dataset": "synthetic", "methods": ["vanilla", "mixup"], "seeds": [0, 1, 2],
                              "epochs": 3, "lr": 0.02, "model_kwargs": {"drop_rate": 0.1}})
    assert [(c.method, c.seed) for c in cells] == [(m, s) for m in ("vanilla", "mixup") for s in (0, 1, 2)]
    assert {(c.epochs, c.lr, c.dataset) for c in cells} == {(3, 0.02, "synthetic")}
    assert all(c.model_kwargs == {"drop_rate": 0.1} for c in cells)
    assert len({c.run_id for c in cells}) == 6
    assert describe(cells) == "6 runs: 2 method(s) x 1 dataset(s) x 1 model(s) x 3 seed(s)"


def test_per_method_overrides_and_method_grid():
    benchmark = {
        "dataset": "synthetic", "seeds": [0], "epochs": 4,
        "methods": {
            "vanilla": None,
            "mixup": {"epochs": 2, "method_params": {"alpha": 0.4}},
            "cutmix": {"grid": {"method_params.alpha": [0.5, 2.0]}, "method_params": {"prob": 0.5}},
        },
    }
    cells = expand_benchmark(benchmark)
    by = [(c.method, c.epochs, c.method_params.get("alpha"), c.method_params.get("prob")) for c in cells]
    assert by == [("vanilla", 4, None, None), ("mixup", 2, 0.4, None),
                  ("cutmix", 4, 0.5, 0.5), ("cutmix", 4, 2.0, 0.5)]


def test_global_grid_is_a_cartesian_product_and_duplicates_collapse():
    cells = expand_benchmark({"dataset": "synthetic", "methods": ["vanilla"], "seeds": [0, 1],
                              "grid": {"lr": [0.1, 0.05], "batch_size": [32, 64]}})
    assert len(cells) == 8 and len({c.run_id for c in cells}) == 8
    # the same cell listed twice (a grid value equal to a method override) is one run
    cells = expand_benchmark({"dataset": "synthetic", "methods": {"vanilla": {"lr": 0.1}}, "grid": {"lr": [0.1, 0.2]}})
    assert [c.lr for c in cells] == [0.1]


def test_command_line_overrides_the_benchmark_including_per_method_options():
    benchmark = {"dataset": "synthetic", "seeds": [0, 1, 2], "epochs": 50,
                 "methods": {"vanilla": None, "mixup": {"epochs": 70, "method_params": {"alpha": 0.3}}}}
    cells = expand_benchmark(benchmark, {"epochs": 1, "seeds": [5]})
    assert [(c.method, c.seed, c.epochs) for c in cells] == [("vanilla", 5, 1), ("mixup", 5, 1)]
    assert cells[1].method_params["alpha"] == 0.3  # method options the command line leaves alone stay
    cells = expand_benchmark(benchmark, {"methods": ["mixup"]})
    assert {c.method for c in cells} == {"mixup"} and cells[0].epochs == 70


def test_methods_all_and_defaults():
    cells = expand_benchmark({"dataset": "synthetic"})
    assert [c.method for c in cells] == parse_methods("all") and {c.seed for c in cells} == {0}
    # a benchmark that only restates the data set's defaults maps to the same runs as the plain command line
    plain = RunSpec.from_dict({"method": "mixup", "dataset": "digits", "seed": 1}).resolved()
    benchmark = load_benchmark(REPO / "benchmarks" / "digits.yaml")
    same = [c for c in expand_benchmark(benchmark) if c.method == "mixup" and c.seed == 1]
    assert [c.run_id for c in same] == [plain.run_id]


def test_methods_all_with_overrides_for_some(capsys):
    everything = expand_benchmark({"dataset": "synthetic"})
    cells = expand_benchmark({"dataset": "synthetic",
                              "methods": {"all": None, "mixup": {"method_params": {"alpha": 0.2}}}})
    assert [c.method for c in cells] == [c.method for c in everything]  # registry order, the same methods
    assert [c.method_params.get("alpha") for c in cells if c.method == "mixup"] == [0.2]
    assert [c.run_id for c in cells if c.method != "mixup"] == [c.run_id for c in everything if c.method != "mixup"]
    # a method made available by its parameters joins; one still unavailable is skipped with the reason
    missing = "/nonexistent/extractor.pt"
    cells = expand_benchmark({"dataset": "synthetic", "methods": {"all": None, "attentivemix": {
        "method_params": {"extractor": missing}}}})
    assert "attentivemix" not in [c.method for c in cells]
    assert f"skipping attentivemix: attentivemix: the extractor checkpoint {missing} is not a file" in \
        capsys.readouterr().err
    with pytest.raises(UsageError, match="methods.all takes no options"):
        expand_benchmark({"dataset": "synthetic", "methods": {"all": {"epochs": 3}}})


@pytest.mark.parametrize("benchmark, message", [
    ({"epoch": 3}, "unknown key 'epoch'"),
    ({"methods": {"mixup": {"alpah": 1.0}}}, "unknown key 'alpah' in methods.mixup"),
    ({"methods": {"mixup": {"method_params": {"alpah": 1.0}}}}, "unknown parameter(s) alpah for method 'mixup'"),
    ({"methods": {"mixupp": None}}, "unknown method 'mixupp'"),
    ({"methods": ["vanilla", "nope"]}, "unknown method 'nope'"),
    ({"grid": {"learning_rate": [0.1]}}, "unknown key 'learning_rate'"),
    ({"grid": {"lr": 0.1}}, "must be a non-empty list"),
    ({"seeds": [-1]}, "non-negative integers"),
    ({"dataset": "cifar1000"}, "unknown dataset 'cifar1000'"),
    ({"seed": 0, "seeds": [1]}, "either 'seeds' or 'seed'"),
    ({"dataset": "synthetic", "epochs": 0}, "epochs must be a positive int"),
])
def test_bad_benchmarks_name_the_bad_key(benchmark, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        expand_benchmark({"dataset": "synthetic", **benchmark} if "dataset" not in benchmark else benchmark)


def test_load_benchmark_errors(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_benchmark(tmp_path / "missing.yaml")
    with pytest.raises(UsageError, match="must be a mapping"):
        load_benchmark(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(UsageError, match="not valid YAML"):
        load_benchmark(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(UsageError, match="unknown key 'lrr'"):
        load_benchmark(write(tmp_path, "lrr: 0.1\n"))


def test_cli_reports_a_bad_benchmark_key_on_one_line(tmp_path, capsys):
    assert main(["run", "--config", str(write(tmp_path, "bacth_size: 64\n")), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown key 'bacth_size'" in err


def test_shipped_benchmarks():
    benchmark = load_benchmark(REPO / "benchmarks" / "digits.yaml")
    digits = expand_benchmark(benchmark)
    # attentivemix joins when its extractor (a model trained by a documented command) is on this machine
    extractor = benchmark["methods"]["attentivemix"]["method_params"]["extractor"]
    extra = {"attentivemix"} if Path(extractor).is_file() else set()
    assert {c.method for c in digits} == set(parse_methods("all")) | extra and {c.seed for c in digits} == {0, 1, 2}
    assert {c.dataset for c in digits} == {"digits"}
    cifar = expand_benchmark(load_benchmark(REPO / "benchmarks" / "cifar100_preactresnet18.yaml"))
    assert {c.method for c in cifar} == {"vanilla", "mixup", "cutmix", "manifold_mixup", "puzzlemix", "catchup_mix"}
    for c in cifar:
        assert (c.dataset, c.model, c.batch_size, c.lr, c.momentum, c.nesterov, c.weight_decay) == (
            "cifar100", "preactresnet18", 100, 0.1, 0.9, True, 1e-4)
        assert (c.epochs, c.schedule, c.milestones, c.gamma) == (1200, "multistep", [400, 800], 0.1)
    alpha = {c.method: c.method_params.get("alpha") for c in cifar}
    assert alpha["mixup"] == 1.0 and alpha["cutmix"] == 1.0 and alpha["manifold_mixup"] == 2.0
    assert {c.method: c.method_params.get("adv_p") for c in cifar}["puzzlemix"] == 0.0


def test_cli_config_with_overrides_dry_run(tmp_path, capsys):
    benchmark = write(tmp_path, {"dataset": "synthetic", "methods": ["vanilla", "mixup"], "seeds": [0, 1],
                                 "epochs": 9, "out": str(tmp_path / "from-benchmark")})
    assert main(["run", "--config", str(benchmark), "--seeds", "4", "--epochs", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 runs: 2 method(s)" in out and "seed 4" in out and str(tmp_path / "from-benchmark") in out
    assert not (tmp_path / "from-benchmark").exists()


@pytest.mark.slow
def test_local_run_from_a_benchmark_and_status(tmp_path, capsys):
    benchmark = write(tmp_path, {"dataset": "synthetic", "methods": ["vanilla"], "seeds": [0], "epochs": 1,
                                 "train_subset": 64, "batch_size": 32, "device": "cpu", "out": str(tmp_path / "runs")})
    assert main(["run", "--config", str(benchmark), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["status", "--config", str(benchmark)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("done") and lines[-1] == "1 cells: 1 done, 0 running, 0 pending, 0 failed"
    (cell,) = expand_benchmark(load_benchmark(benchmark))
    assert read_launch(cell.run_dir(tmp_path / "runs"))["executor"] == "local"


@pytest.mark.slow
def test_parallel_local_runs_one_worker_per_device(tmp_path):
    cells = expand_benchmark({"dataset": "synthetic", "methods": ["vanilla", "mixup"], "seeds": [0], "epochs": 1,
                              "train_subset": 64, "batch_size": 32})
    results = run_parallel(cells, tmp_path, ["cpu", "cpu"], progress=False)
    assert sorted(r["method"] for r in results) == ["mixup", "vanilla"]
    assert all(is_complete(c.run_dir(tmp_path)) for c in cells)
    pids = {read_launch(c.run_dir(tmp_path))["pid"] for c in cells}
    assert len(pids) == 2  # two worker processes
    # rerunning skips complete cells without starting workers
    assert len(run_parallel(cells, tmp_path, ["cpu", "cpu"], progress=False)) == 2


def test_every_method_checks_availability_with_its_parameters():
    from mixbench.methods import get_method, list_methods

    for name in list_methods():
        cls = get_method(name)
        params = cls.default_params()
        assert isinstance(cls.available(**params), bool)
        assert "\n" not in cls.unavailable_reason(**params)
