"""Methods and evaluation suites from outside the package (mixbench.plugins).

A plugin method is written to a temporary folder outside the project and run
through `mixbench run` (in this process, in parallel worker processes and as a
Slurm job array on the local test cluster), `mixbench evaluate` and `mixbench
report`, where it sits in the table beside vanilla. Every clear error has a
test, and so does `mixbench new-method` (its generated test passes).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from mixbench import UsageError, plugins
from mixbench.cli import main
from mixbench.launchers.local import run_parallel
from mixbench.launchers.record import read_launch
from mixbench.methods import get_method, list_methods
from mixbench.methods._registry import _METHODS
from mixbench.results import is_complete, read_result
from mixbench.spec import RunSpec, expand_grid

REPO = Path(__file__).resolve().parents[1]

BANDMIX = '''
"""bandmix: a vertical band of the partner, labels by the band's area (a test plugin)."""
import torch

from mixbench.evaluate import register_suite
from mixbench.methods import MixMethod, MixOutput, register_method


def bandmix(x, perm, lam):
    w = x.shape[-1]
    cut = int(round((1 - lam) * w))
    mixed = x.clone()
    if cut:
        mixed[..., :cut] = x[perm][..., :cut]
    return mixed, 1 - cut / w


@register_method
class BandMix(MixMethod):
    name = "bandmix"

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha

    def forward(self, model, x, y):
        lam = self.draw_lambda(self.alpha)
        perm = self.draw_perm(x.shape[0], x.device)
        mixed, share = bandmix(x, perm, lam)
        return MixOutput(model(mixed), share * y + (1 - share) * y[perm])


@register_suite
def suite_mean_confidence(ctx):
    """The mean top softmax probability on the test images."""
    with torch.no_grad():
        p = torch.softmax(ctx.model(ctx.x), dim=1)
    return {"mean_confidence": float(p.max(1).values.mean())}
'''

SMALL = ["--dataset", "synthetic", "--epochs", "1", "--train-subset", "512", "--no-progress"]


@pytest.fixture
def clean_registry():
    """Whatever a test's plugins register is gone after it (the registries are per process)."""
    from mixbench.evaluate import SUITES

    saved = (dict(_METHODS), dict(SUITES), dict(plugins._ORIGINS), dict(plugins._REFS), dict(plugins._FILES),
             dict(plugins._LOADED))
    modules = set(sys.modules)
    yield
    for mapping, old in zip((_METHODS, SUITES, plugins._ORIGINS, plugins._REFS, plugins._FILES, plugins._LOADED),
                            saved):
        mapping.clear()
        mapping.update(old)
    for name in set(sys.modules) - modules:
        if name.startswith("mixbench_plugin_"):
            del sys.modules[name]


@pytest.fixture
def outside(tmp_path, clean_registry):
    """A folder outside the project holding the bandmix plugin."""
    folder = tmp_path / "my_research"
    folder.mkdir()
    (folder / "bandmix.py").write_text(BANDMIX)
    assert REPO not in (folder / "bandmix.py").resolve().parents
    return folder


def one_line_error(capsys, argv, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixbench: error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err
    return err


# ---------------------------------------------------------------------------
# Registration, listing, run ids (fast)
# ---------------------------------------------------------------------------
def test_list_methods_shows_where_each_comes_from(outside, capsys):
    assert main(["list", "methods", "--plugins", str(outside / "bandmix.py")]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["vanilla"].endswith("[built-in]") and lines["mixup"].endswith("[built-in]")
    assert lines["bandmix"].endswith(f"[plugin {outside / 'bandmix.py'}]") and "alpha=1.0" in lines["bandmix"]
    assert list_methods()[-1] == "bandmix"  # after the built-ins in tables
    assert plugins.origin("suite", "mean_confidence") == f"plugin {outside / 'bandmix.py'}"
    assert plugins.origin("suite", "calibration") == "built-in"


def test_loading_twice_is_once_and_relative_paths_resolve(outside, monkeypatch):
    monkeypatch.chdir(outside)
    assert plugins.load_plugins("bandmix.py") == [str(outside / "bandmix.py")]
    cls = get_method("bandmix")
    assert plugins.load_plugins([str(outside / "bandmix.py"), "./bandmix.py"]) == [str(outside / "bandmix.py")] * 2
    assert get_method("bandmix") is cls


def test_built_in_run_ids_do_not_change():
    # Pinned: the run ids of the committed results (no plugin key in a built-in method's identity).
    specs = expand_grid(["vanilla", "mixup", "puzzlemix"], [0, 1], dataset="synthetic", epochs=1)
    assert [s.run_id for s in specs] == ["06ff69fc", "c3e6ca86", "ab672c14", "47c86750", "ac7cf1b8", "3685d355"]
    assert all(s.plugins == [] and s.method_source is None for s in specs)
    assert "method_source" not in specs[0].identity() and "plugins" not in specs[0].identity()


def test_plugin_source_is_hashed_into_the_run_id(outside, tmp_path):
    path = outside / "bandmix.py"
    plugins.load_plugins([str(path)])
    spec = expand_grid(["bandmix"], [0], dataset="synthetic", epochs=1)[0]
    assert spec.plugins == [str(path)] and spec.method_source and spec.identity()["method_source"]
    assert expand_grid(["bandmix"], [0], dataset="synthetic", epochs=1)[0].run_id == spec.run_id
    # An edit (even a comment) is a new run, and a run planned before the edit refuses to train on it.
    path.write_text(BANDMIX + "\n# tuned\n")
    edited = expand_grid(["bandmix"], [0], dataset="synthetic", epochs=1)[0]
    assert edited.run_id != spec.run_id and edited.method_source != spec.method_source
    with pytest.raises(UsageError, match="bandmix.*changed since this run was planned"):
        spec.resolved()
    # The protocol (the report's column) does not depend on the method's source.
    from mixbench.frame import _protocol

    vanilla = expand_grid(["vanilla"], [0], dataset="synthetic", epochs=1)[0]
    assert _protocol({"spec": spec.to_dict()}) == _protocol({"spec": vanilla.to_dict()})


def test_benchmark_key_plugins_relative_to_the_benchmark(outside, tmp_path, capsys, monkeypatch):
    benchmark = outside / "bench.yaml"
    benchmark.write_text("plugins: [bandmix.py]\ndataset: synthetic\nepochs: 1\nmethods:\n  vanilla:\n"
                         "  bandmix: {method_params: {alpha: 0.5}}\n")
    monkeypatch.chdir(tmp_path)  # not the benchmark's folder
    assert main(["run", "--config", str(benchmark), "--dry-run", "--out", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^bandmix .* seed 0", out, re.M) and "2 runs: 2 method(s)" in out
    # and the same through `status --config`
    assert main(["status", "--config", str(benchmark), str(tmp_path / "runs")]) == 0
    assert "bandmix" in capsys.readouterr().out


def test_a_recorded_spec_imports_its_plugins(outside, tmp_path):
    plugins.load_plugins([str(outside / "bandmix.py")])
    record = expand_grid(["bandmix"], [0], dataset="synthetic", epochs=1, eval=["mean_confidence"])[0].to_dict()
    assert record["plugins"] == [str(outside / "bandmix.py")]
    for key in list(_METHODS):  # a fresh worker process knows only the built-in methods
        if plugins.origin("method", key) != "built-in":
            del _METHODS[key]
    plugins._LOADED.clear()
    spec = RunSpec.from_record(record)
    assert get_method("bandmix").name == "bandmix" and spec.run_id == RunSpec.from_dict(record).run_id


def test_a_module_plugin(tmp_path, monkeypatch, clean_registry):
    (tmp_path / "labmod").mkdir()
    (tmp_path / "labmod" / "__init__.py").write_text("")
    (tmp_path / "labmod" / "mix.py").write_text(BANDMIX.replace('"bandmix"', '"modmix"')
                                                .replace("suite_mean_confidence", "suite_mod_confidence"))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert plugins.load_plugins("labmod.mix") == ["labmod.mix"]
    assert plugins.origin("method", "modmix") == "module labmod.mix"
    spec = expand_grid(["modmix"], [0], dataset="synthetic", epochs=1)[0]
    assert spec.plugins == ["labmod.mix"] and len(spec.method_source) == 12


# ---------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------
def test_error_plugin_file_missing(tmp_path, capsys, clean_registry):
    one_line_error(capsys, ["list", "methods", "--plugins", str(tmp_path / "nope.py")],
                   "plugin", "nope.py", "does not exist")
    one_line_error(capsys, ["run", "--plugins", str(tmp_path), "--dry-run"], "is a folder, not a Python file")
    one_line_error(capsys, ["run", "--plugins", "no_such_module_xyz", "--dry-run"],
                   "'no_such_module_xyz' is neither a Python file nor an importable module")


def test_error_plugin_missing_from_a_benchmark(tmp_path, capsys, clean_registry):
    benchmark = tmp_path / "bench.yaml"
    benchmark.write_text("plugins: [missing_mix.py]\nmethods: [vanilla]\n")
    one_line_error(capsys, ["run", "--config", str(benchmark), "--dry-run"],
                   f"{benchmark}: plugin 'missing_mix.py' does not exist ({tmp_path / 'missing_mix.py'})")


@pytest.mark.parametrize("body, expected", [
    ("import numpy\nimport no_such_package_xyz\n", "failed to import (line 2): ModuleNotFoundError: "
                                                    "No module named 'no_such_package_xyz'"),
    ("x = 1\ndef f(:\n    pass\n", "failed to import (line 2): SyntaxError: "),
    ("def boom():\n    raise RuntimeError('first line\\nsecond line')\n\nboom()\n",
     "failed to import (line 2): RuntimeError: first line"),
])
def test_error_plugin_fails_to_import(tmp_path, capsys, clean_registry, body, expected):
    path = tmp_path / "broken.py"
    path.write_text(body)
    err = one_line_error(capsys, ["run", "--plugins", str(path), "--methods", "vanilla", "--dry-run"],
                         f"plugin {path} ", expected)
    assert "second line" not in err


def test_error_half_imported_plugin_leaves_nothing_registered(tmp_path, capsys, clean_registry):
    path = tmp_path / "half.py"
    path.write_text(BANDMIX + "\nraise ImportError('needs a GPU library')\n")
    one_line_error(capsys, ["list", "methods", "--plugins", str(path)], "ImportError: needs a GPU library")
    assert "bandmix" not in list_methods() and not any(m.startswith("mixbench_plugin_half") for m in sys.modules)
    from mixbench.evaluate import SUITES

    assert "mean_confidence" not in SUITES


def test_error_plugin_registers_nothing(tmp_path, capsys, clean_registry):
    path = tmp_path / "empty.py"
    path.write_text("from mixbench.methods import MixMethod\n\nclass Forgot(MixMethod):\n    name = 'forgot'\n")
    one_line_error(capsys, ["run", "--plugins", str(path), "--dry-run"],
                   f"plugin {path} registers no method or evaluation suite", "@register_method")


def test_error_plugin_clashes_with_a_built_in_name(tmp_path, capsys, clean_registry):
    path = tmp_path / "mymixup.py"
    path.write_text(BANDMIX.replace('name = "bandmix"', 'name = "mixup"'))
    one_line_error(capsys, ["list", "methods", "--plugins", str(path)],
                   f"plugin {path}: method 'mixup' clashes with the built-in method of that name")
    assert get_method("mixup").__module__ == "mixbench.methods.mixup"
    suite = tmp_path / "mysuite.py"
    suite.write_text("from mixbench.evaluate import register_suite\n\n@register_suite\n"
                     "def suite_calibration(ctx):\n    return {}\n")
    one_line_error(capsys, ["evaluate", str(tmp_path), "--plugins", str(suite)],
                   "suite 'calibration' clashes with the built-in suite")


def test_error_two_plugins_with_one_name(outside, tmp_path, capsys):
    other = tmp_path / "other.py"
    other.write_text(BANDMIX.replace("suite_mean_confidence", "suite_other_confidence"))
    one_line_error(capsys, ["list", "methods", "--plugins", f"{outside / 'bandmix.py'},{other}"],
                   f"plugin {other}: method 'bandmix' clashes with the plugin {outside / 'bandmix.py'} method")


def test_unknown_method_points_at_plugins(capsys):
    err = one_line_error(capsys, ["run", "--methods", "mymix", "--dry-run"], "unknown method 'mymix'")
    assert "--plugins FILE.py" in err


# ---------------------------------------------------------------------------
# Entry points of installed packages
# ---------------------------------------------------------------------------
def _cli(args, cwd, env=None, timeout=300):
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in (env or {}).get("PYTHONPATH", "")
                                                                        .split(os.pathsep) if p]),
            "OMP_NUM_THREADS": "1"}
    full.update({k: v for k, v in (env or {}).items() if k != "PYTHONPATH"})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_entry_point_of_an_installed_package(tmp_path):
    site = tmp_path / "site"
    (site / "labmix").mkdir(parents=True)
    (site / "labmix" / "__init__.py").write_text("")
    (site / "labmix" / "methods.py").write_text(BANDMIX.replace('"bandmix"', '"labmix"'))
    dist = site / "labmix-0.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: labmix\nVersion: 0.3\n")
    (dist / "entry_points.txt").write_text("[mixbench.methods]\nlabmix = labmix.methods\n")
    proc = _cli(["-m", "mixbench", "list", "methods"], tmp_path, {"PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr
    line = next(s for s in proc.stdout.splitlines() if s.startswith("labmix "))
    assert line.endswith("[entry point labmix (labmix 0.3)]")
    # usable by name with no flag; hashed into the run id like a plugin file
    proc = _cli(["-c", "from mixbench.spec import expand_grid; s = expand_grid(['labmix'], [0], dataset='synthetic',"
                 " epochs=1)[0]; print(s.method_source, s.plugins)"], tmp_path, {"PYTHONPATH": str(site)})
    assert proc.returncode == 0 and re.fullmatch(r"[0-9a-f]{12} \[\]\n", proc.stdout), proc.stderr
    # a broken installed plugin is a warning, the built-in methods still work
    (site / "labmix" / "methods.py").write_text("raise RuntimeError('broken install')\n")
    proc = _cli(["-m", "mixbench", "list", "methods"], tmp_path, {"PYTHONPATH": str(site)})
    assert proc.returncode == 0 and "vanilla" in proc.stdout and "labmix" not in proc.stdout
    assert "entry point labmix (labmix 0.3) failed to import" in proc.stderr and "broken install" in proc.stderr


# ---------------------------------------------------------------------------
# mixbench new-method
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_new_method_writes_a_file_that_passes_its_own_test(tmp_path, capsys, clean_registry):
    assert main(["new-method", "wavemix", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'wavemix.py'}" in out and f"wrote {tmp_path / 'test_wavemix.py'}" in out
    text = (tmp_path / "wavemix.py").read_text()
    assert "class Wavemix(MixMethod)" in text and 'name = "wavemix"' in text and "def wavemix_mix(" in text
    proc = _cli(["-m", "pytest", "-q", "-p", "no:cacheprovider", "test_wavemix.py"], tmp_path)
    assert proc.returncode == 0 and re.search(r"\b9 passed\b", proc.stdout), proc.stdout + proc.stderr
    # never overwrites; names are checked
    one_line_error(capsys, ["new-method", "wavemix", "--dir", str(tmp_path)], "exists; not overwritten")
    # it registers as a plugin with its hyper-parameter
    assert plugins.load_plugins([str(tmp_path / "wavemix.py")])
    assert get_method("wavemix").default_params() == {"alpha": 1.0}
    one_line_error(capsys, ["new-method", "cutmix", "--dir", str(tmp_path)], "'cutmix' already exists (built-in)")
    one_line_error(capsys, ["new-method", "Bad-Name", "--dir", str(tmp_path)], "must be lower case")


@pytest.mark.slow
def test_new_method_test_fails_on_a_wrong_label_weight(tmp_path, capsys):
    # The generated test can fail: a core whose weights are not the realised share is caught.
    assert main(["new-method", "wrongmix", "--dir", str(tmp_path)]) == 0
    path = tmp_path / "wrongmix.py"
    path.write_text(path.read_text().replace("float(lam), device", "float(lam) ** 2, device"))
    proc = _cli(["-m", "pytest", "-q", "-p", "no:cacheprovider", "test_wrongmix.py", "-k", "share"], tmp_path)
    assert proc.returncode == 1 and "failed" in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------
# End to end: run (here and in parallel workers), evaluate, report
# ---------------------------------------------------------------------------
def _check_table(capsys, out: Path, report: Path, methods=("vanilla", "bandmix")):
    """The report's first table has one row per method, in that order, each with a top-1 in the one column."""
    assert main(["report", str(out), "--out", str(report), "--no-plots", "--format", "md,csv"]) == 0
    capsys.readouterr()
    table = (report / "table.md").read_text()
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    assert [r[0] for r in rows] == list(methods), table
    assert sum("top-1" in h for h in header) == 1, table  # one protocol column: the method sits beside vanilla
    assert all(len(r) == len(header) and re.match(r"\**\d+\.\d+", r[1]) for r in rows), table
    return table


@pytest.mark.slow
def test_plugin_method_through_run_evaluate_and_report(outside, tmp_path, capsys):
    out = tmp_path / "runs"
    plugin = str(outside / "bandmix.py")
    argv = ["run", "--plugins", plugin, "--methods", "vanilla,bandmix", "--out", str(out), *SMALL]
    assert main(argv) == 0
    assert re.search(r"^bandmix +1 +\d", capsys.readouterr().out, re.M)
    run_dir = next(out.rglob("bandmix/seed0-*"))
    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert spec["plugins"] == [plugin] and len(spec["method_source"]) == 12
    assert read_launch(run_dir)["spec"]["plugins"] == [plugin]
    assert read_result(run_dir)["method"] == "bandmix"
    vanilla = read_result(next(out.rglob("vanilla/seed0-*")))
    assert vanilla["final_test_loss"] != read_result(run_dir)["final_test_loss"]  # bandmix did mix
    # the same command again reuses both results
    assert main(argv) == 0
    assert capsys.readouterr().err.count("already complete") == 2
    # evaluation: a built-in suite and the plugin's own suite
    assert main(["evaluate", str(out), "--plugins", plugin, "--suite", "calibration,mean_confidence",
                 "--max-samples", "64", "--device", "cpu"]) == 0
    capsys.readouterr()
    ev = read_result(run_dir)["eval"]
    assert 0 < ev["mean_confidence"]["mean_confidence"] <= 1 and "ece" in ev["calibration"]
    table = _check_table(capsys, out, tmp_path / "report")
    assert "mean_confidence.mean_confidence" in table  # the plugin suite's number, a column of the table


FLAKY = BANDMIX.replace("""    def forward(self, model, x, y):
""", """    calls = 0

    def forward(self, model, x, y):
        import pathlib

        self.calls += 1
        if self.calls > 10 and pathlib.Path(__file__).with_name("crash-after-10-steps").exists():
            raise RuntimeError("simulated crash")
""")


@pytest.mark.slow
def test_plugin_run_resumes_from_its_checkpoint(outside, tmp_path, capsys):
    (outside / "bandmix.py").write_text(FLAKY)
    (outside / "crash-after-10-steps").write_text("")  # beside the plugin: its source (and run id) stay the same
    out = tmp_path / "runs"
    argv = ["run", "--plugins", str(outside / "bandmix.py"), "--methods", "bandmix", "--out", str(out),
            "--checkpoint-every-min", "0", *SMALL]
    argv[argv.index("--epochs") + 1] = "2"
    assert main(argv) == 1  # 512 images in batches of 64: step 11 is in the second epoch
    run_dir = next(out.rglob("bandmix/seed0-*"))
    assert read_result(run_dir)["status"] == "failed" and "simulated crash" in read_result(run_dir)["error"]
    assert (run_dir / "checkpoint.pt").exists()
    capsys.readouterr()
    (outside / "crash-after-10-steps").unlink()
    assert main(argv) == 0
    assert f"resuming {run_dir} from epoch 1" in capsys.readouterr().err
    assert read_result(run_dir)["status"] == "complete" and read_result(run_dir)["epochs"] == 2


@pytest.mark.slow
def test_plugin_method_in_parallel_worker_processes(outside, tmp_path, capsys):
    plugins.load_plugins([str(outside / "bandmix.py")])
    specs = expand_grid(["vanilla", "bandmix"], [0], dataset="synthetic", epochs=1, train_subset=512, device="cpu")
    # spawned workers start with the built-in methods only: they import the plugin from the spec
    results = run_parallel(specs, tmp_path / "runs", ["cpu", "cpu"], progress=False)
    assert [r["method"] for r in results] == ["vanilla", "bandmix"]
    assert all(r["status"] == "complete" for r in results)
    assert read_launch(specs[1].run_dir(tmp_path / "runs"))["where"].startswith("cpu worker")
    _check_table(capsys, tmp_path / "runs", tmp_path / "report")


# ---------------------------------------------------------------------------
# Slurm: the array tasks import the plugin from the recorded path
# ---------------------------------------------------------------------------
from test_slurm import _logs, _wait, slurm_cluster  # noqa: E402,F401  (the cluster fixture of test_slurm)


@pytest.mark.slow
@pytest.mark.slurm
def test_plugin_method_through_slurm(slurm_cluster, outside, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "runs"
    plugin = str(outside / "bandmix.py")
    assert main(["run", "--plugins", plugin, "--methods", "vanilla,bandmix", "--eval", "mean_confidence",
                 "--executor", "slurm", "--profile", str(REPO / "slurm" / "local.yaml"), "--out", str(out),
                 *SMALL]) == 0
    assert "submitted job" in capsys.readouterr().out
    dirs = sorted({p.parent for p in out.rglob("launch.json")})
    assert len(dirs) == 2
    bandmix_dir = next(d for d in dirs if "bandmix" in str(d))
    launch = read_launch(bandmix_dir)
    assert launch["executor"] == "slurm" and launch["spec"]["plugins"] == [plugin]
    # a task evaluates after its result.json is complete: wait for the evaluation too
    _wait(lambda: all(is_complete(d) and "mean_confidence" in (read_result(d) or {}).get("eval", {}) for d in dirs),
          240, "the 2 array tasks to train and evaluate")
    result = read_result(bandmix_dir)
    assert result["method"] == "bandmix" and result["spec"]["plugins"] == [plugin], _logs(bandmix_dir)
    assert 0 < result["eval"]["mean_confidence"]["mean_confidence"] <= 1  # the plugin's suite, in the job
    assert main(["evaluate", str(out), "--suite", "calibration", "--max-samples", "64", "--device", "cpu"]) == 0
    _check_table(capsys, out, tmp_path / "report")
