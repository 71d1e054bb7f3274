"""`mixbench report`: aggregation, highlighting, captions, LaTeX validity, plots, failed runs, errors."""
from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mixbench import UsageError
from mixbench.cli import main
from mixbench.frame import load_runs
from mixbench.report import (
    build_table,
    latex_document,
    latex_escape,
    summary_table,
    to_latex,
    to_markdown,
    write_report,
)

SPEC = {"epochs": 3, "batch_size": 64, "lr": 0.1, "schedule": "cosine", "model_kwargs": {}}


def make_run(root: Path, method: str, seed: int, final: float, *, best=None, last10=None, time_s=1.0,
             mem=100.0, status="complete", dataset="digits", model="net", params=None, eval_=None,
             curve=None, spec=None, write_result=True, cpu_s=None, threads=None, device=None):
    """A run directory as the harness writes it: metrics.jsonl, spec.yaml and (usually) result.json.

    ``cpu_s`` (process CPU seconds per epoch) with ``threads`` and ``device`` writes the cost fields of runs
    that record CPU time; without them the run looks like a result written before they existed.
    """
    spec = {**SPEC, **(spec or {}), "method": method, "seed": seed, "dataset": dataset, "model": model,
            "method_params": params or {}}
    run_id = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    run_dir = root / dataset / model / method / f"seed{seed}-{run_id}"
    run_dir.mkdir(parents=True)
    curve = curve if curve is not None else [final - 20.0, final - 5.0, final]
    with open(run_dir / "metrics.jsonl", "w") as f:
        for epoch, top1 in enumerate(curve):
            line = {"epoch": epoch, "test_top1": top1, "epoch_time_s": time_s}
            if cpu_s is not None:
                line["epoch_cpu_time_s"] = cpu_s
            f.write(json.dumps(line) + "\n")
    (run_dir / "spec.yaml").write_text(json.dumps(spec))  # JSON is valid YAML
    if write_result:
        result = {
            "schema_version": 1, "run_id": run_id, "status": status, "method": method,
            "method_params": params or {}, "dataset": dataset, "model": model, "seed": seed,
            "epochs": spec["epochs"],
            "final_top1": final, "best_top1": final if best is None else best,
            "last10_median_top1": final if last10 is None else last10, "final_top5": 100.0,
            "epoch_time_s": time_s, "peak_mem_mb": mem, "wall_time_s": len(curve) * time_s, "spec": spec,
        }
        if cpu_s is not None:
            result.update(epoch_cpu_time_s=cpu_s, cpu_time_s=len(curve) * cpu_s)
        if threads is not None:
            result["num_threads"] = threads
        if device is not None:
            result["device"] = device
        if eval_ is not None:
            result["eval"] = eval_
        (run_dir / "result.json").write_text(json.dumps(result))
    return run_dir


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "runs"
    for seed, acc in enumerate([90.0, 92.0, 94.0]):
        make_run(root, "vanilla", seed, acc, best=acc + 1, last10=acc - 1, time_s=1.0)
    for seed, acc in enumerate([95.0, 96.0]):
        make_run(root, "mixup", seed, acc, best=acc + 0.5, last10=80.0, time_s=1.5)
    for seed, acc in enumerate([93.0, 93.5]):
        make_run(root, "cutmix", seed, acc, best=99.0, last10=81.0, time_s=2.0)
    return root


def md_row(md: str, method: str) -> list:
    for line in md.splitlines():
        if line.startswith(f"| {method} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row {method!r} in\n{md}")


def test_aggregation_mean_std_n(results):
    runset = load_runs([results])
    table = build_table(runset, "final")
    assert table.rows == ["vanilla", "mixup", "cutmix"]
    top1 = next(j for j, c in enumerate(table.columns) if c.quantity == "top1")
    mean, std, n = table.cells[("vanilla", top1)]
    assert (mean, std, n) == (pytest.approx(92.0), pytest.approx(2.0), 3)
    mean, std, n = table.cells[("mixup", top1)]
    assert (mean, round(std, 4), n) == (pytest.approx(95.5), 0.7071, 2)
    md = to_markdown(table)
    assert md_row(md, "vanilla")[1] == "92.00 ± 2.00 (3)"
    assert md_row(md, "cutmix")[1] == "93.25 ± 0.35 (2)"
    # epoch time relative to vanilla's mean, and peak memory, as extra columns
    assert md_row(md, "mixup")[2] == "1.50×" and md_row(md, "cutmix")[2] == "2.00×"
    assert md_row(md, "vanilla")[3] == "100"
    assert "| method | digits/net top-1 (%) | epoch time (× vanilla) | peak mem (MB) |" in md


def test_best_in_bold_and_second_underlined(results):
    table = build_table(load_runs([results]), "final")
    md = to_markdown(table)
    assert md_row(md, "mixup")[1] == "**95.50 ± 0.71** (2)"
    assert md.count("**") == 2 + 2  # the caption line and the one best cell
    tex = to_latex(table)
    assert r"mixup & \textbf{95.50 $\pm$ 0.71} {\scriptsize (2)}" in tex
    assert r"cutmix & \underline{93.25 $\pm$ 0.35} {\scriptsize (2)}" in tex
    assert tex.count(r"\textbf{") == 1 and tex.count(r"\underline{") == 1


@pytest.mark.parametrize("metric,words,vanilla_cell", [
    ("final", "at the final epoch", "**"),
    ("best", "at the best epoch", "93.00 ± 2.00 (3)"),
    ("last10", "median of the last 10 epochs", "**91.00 ± 2.00** (3)"),
])
def test_caption_names_the_metric_and_cells_use_it(results, metric, words, vanilla_cell):
    table = build_table(load_runs([results]), metric)
    md, tex = to_markdown(table), to_latex(table)
    assert f"(metric: {metric})" in md.splitlines()[0] and words in md.splitlines()[0]
    caption = re.search(r"\\caption\{(.*)\}\n", tex).group(1)
    assert f"(metric: {metric})" in caption and words in caption
    assert f"\\label{{tab:mixbench-{metric}}}" in tex
    if metric == "final":
        assert not md_row(md, "vanilla")[1].startswith("**")
    else:
        assert md_row(md, "vanilla")[1] == vanilla_cell
    if metric == "best":
        assert md_row(md, "cutmix")[1] == "**99.00 ± 0.00** (2)"


def check_latex_balanced(tex: str) -> None:
    stack = []
    for kind, env in re.findall(r"\\(begin|end)\{([^}]*)\}", tex):
        if kind == "begin":
            stack.append(env)
        else:
            assert stack and stack.pop() == env, f"\\end{{{env}}} does not close the open environment"
    assert not stack, f"unclosed environments: {stack}"
    body = "\n".join(line.split("%")[0] if not line.lstrip().startswith("%") else "" for line in
                     re.sub(r"\\[%{}_&$#]", "", tex).splitlines())
    depth = 0
    for ch in body:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0, "a } closes nothing"
    assert depth == 0, "unbalanced braces"
    assert body.count("$") % 2 == 0, "unbalanced math shifts"
    assert "_" not in body, "unescaped underscore"
    ncols = len(body.split(r"\begin{tabular}{")[1].split("}")[0])
    for line in body.splitlines():
        if line.strip().endswith(r"\\"):  # every row spans exactly the tabular's columns
            cells = line.strip()[:-2].split("&")
            spans = [int(m.group(1)) if (m := re.search(r"\\multicolumn\{(\d+)\}", c)) else 1 for c in cells]
            assert sum(spans) == ncols, line


def eval_record(fgsm: float, ece: float) -> dict:
    """result["eval"] as `mixbench evaluate` writes it: headline numbers, options, nested per-item details."""
    return {
        "adversarial": {"clean_top1": 90.0, "fgsm_top1": fgsm, "eps": 0.03, "pgd_steps": 10},
        "calibration": {"ece": ece, "nll": 0.3, "top1": 90.0},
        "corruption": {"mean_top1": 50.0, "fog": {"severity": [1, 2], "top1": [60.0, 40.0], "mean_top1": 50.0}},
        "my_suite": {"score": 1.0, "nested": {"x": 1.0}, "curve": [1, 2], "ok": True},
    }


def two_dataset_results(tmp_path):
    root = tmp_path / "multi"
    for ds, model in (("digits", "pre_act_w16"), ("cifar_100", "wide_resnet")):
        for seed in (0, 1):
            make_run(root, "vanilla", seed, 90.0 + seed, dataset=ds, model=model, eval_=eval_record(30.0 + seed, 7.0))
            make_run(root, "mixup", seed, 91.0 + seed, dataset=ds, model=model, time_s=1.2,
                     eval_=eval_record(40.0, 5.0))
    return root


def test_latex_environments_braces_and_escapes(results, tmp_path):
    check_latex_balanced(to_latex(build_table(load_runs([results]), "final")))
    tex = to_latex(build_table(load_runs([two_dataset_results(tmp_path)]), "best"))
    check_latex_balanced(tex)
    assert r"\multicolumn{8}{c}{cifar\_100/wide\_resnet}" in tex
    assert r"\cmidrule(lr){2-9} \cmidrule(lr){10-17}" in tex
    assert r"\underline" not in tex  # with two methods, second best is also the worst: not marked
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert latex_escape("a_b & 50% #1 {x} $") == r"a\_b \& 50\% \#1 \{x\} \$"


@pytest.mark.skipif(not (shutil.which("pdflatex") or shutil.which("lualatex")), reason="no LaTeX engine installed")
def test_latex_compiles(tmp_path):
    tex = to_latex(build_table(load_runs([two_dataset_results(tmp_path)]), "final"))
    doc = tmp_path / "doc.tex"
    doc.write_text(latex_document(tex))
    engine = shutil.which("pdflatex") or shutil.which("lualatex")
    proc = subprocess.run([engine, "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_eval_headline_metrics_become_columns_with_direction(tmp_path):
    out = tmp_path / "rep"
    report = write_report([two_dataset_results(tmp_path)], out, formats=["md", "csv"], plots=False)
    md = report["markdown"]
    header = md.splitlines()[2]
    names = [c.strip() for c in header.strip("|").split("|")]
    digits = [n[len("digits/pre_act_w16 "):] for n in names if n.startswith("digits/pre_act_w16 ")]
    assert digits == ["top-1 (%)", "epoch time (× vanilla)", "peak mem (MB)", "adversarial.fgsm_top1 ↑",
                      "calibration.ece ↓", "calibration.nll ↓", "corruption.mean_top1 ↑", "my_suite.score ↑"]
    row_v, row_m = md_row(md, "vanilla"), md_row(md, "mixup")
    fgsm, ece = names.index("digits/pre_act_w16 adversarial.fgsm_top1 ↑"), names.index("digits/pre_act_w16 calibration.ece ↓")
    assert row_m[fgsm] == "**40.00 ± 0.00** (2)" and row_v[fgsm] == "30.50 ± 0.71 (2)"
    assert row_m[ece] == "**5.00 ± 0.00** (2)" and row_v[ece] == "7.00 ± 0.00 (2)"  # lower is better
    # every scalar, headline or not, is in the CSV files
    with open(out / "summary.csv") as f:
        quantities = {r["quantity"] for r in csv.DictReader(f)}
    assert {"eval.adversarial.eps", "eval.corruption.fog.mean_top1", "eval.my_suite.nested.x"} <= quantities
    assert not any("curve" in q or q.endswith(".ok") or "severity" in q for q in quantities)
    with open(out / "runs.csv") as f:
        assert "eval.calibration.nll" in next(csv.reader(f))


def test_unknown_methods_after_registry_alphabetically_and_variants(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "zeta_mix", 0, 80.0)
    make_run(root, "cutmix", 0, 81.0)
    make_run(root, "alpha_mix", 0, 82.0)
    make_run(root, "vanilla", 0, 83.0)
    make_run(root, "mixup", 0, 84.0, params={"alpha": 1.0})
    make_run(root, "mixup", 1, 85.0, params={"alpha": 0.2})
    table = build_table(load_runs([root]), "final")
    assert table.rows == ["vanilla", "mixup (alpha=0.2)", "mixup (alpha=1.0)", "cutmix", "alpha_mix", "zeta_mix"]
    md = to_markdown(table)
    assert md_row(md, "zeta_mix")[1] == "80.00 (1)"  # one seed: no std


def test_runs_of_different_protocols_are_different_columns(results):
    make_run(results, "vanilla", 0, 97.0, spec={"epochs": 5, "data_dir": "/elsewhere"})
    make_run(results, "vanilla", 1, 98.0, spec={"epochs": 5, "device": "cuda"})  # device: not the protocol
    table = build_table(load_runs([results]), "final")
    groups = list(dict.fromkeys(c.group for c in table.columns))
    assert groups == ["digits/net (epochs=3)", "digits/net (epochs=5)"]
    top1 = [j for j, c in enumerate(table.columns) if c.quantity == "top1"]
    assert table.cells[("vanilla", top1[0])][2] == 3 and table.cells[("vanilla", top1[1])][:3] == (97.5, pytest.approx(0.7071, abs=1e-4), 2)
    assert ("mixup", top1[1]) not in table.cells


def test_failed_and_incomplete_runs_are_listed_not_averaged(results, tmp_path):
    failed = make_run(results, "mixup", 7, 10.0, status="failed")
    partial = make_run(results, "cutmix", 9, 0.0, curve=[50.0], write_result=False)
    crashed = results / "digits" / "net" / "mixup" / "seed5-0000abcd"  # the launcher's record only
    crashed.mkdir()
    (crashed / "launch.json").write_text(json.dumps({"error": "CUDA out of memory"}))
    out = tmp_path / "report"
    report = write_report([results], out, formats=["md", "latex", "csv"], plots=False)
    assert len(report["runset"].problems) == 3
    md = (out / "table.md").read_text()
    assert md_row(md, "mixup")[1] == "**95.50 ± 0.71** (2)"  # the failed 10% run is not in the mean
    assert "Incomplete or failed runs (not averaged):" in md
    assert f"- {failed.resolve()}: failed" in md
    assert f"- {partial.resolve()}: incomplete (no result.json (1/3 epochs in metrics.jsonl))" in md
    assert f"- {crashed.resolve()}: incomplete (no result.json (0/? epochs in metrics.jsonl); launcher: CUDA out" in md
    assert "3 incomplete or failed run(s) excluded" in md.splitlines()[0]
    tex = (out / "table.tex").read_text()
    check_latex_balanced(tex)
    assert f"% - {failed.resolve()}: failed" not in tex and f"%   {failed.resolve()}: failed" in tex
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10
    assert sorted(r["status"] for r in rows if r["status"] != "complete") == ["failed", "incomplete", "incomplete"]
    with open(out / "summary.csv") as f:
        summary = {(r["row"], r["quantity"]): r for r in csv.DictReader(f)}
    assert summary[("mixup", "top1")]["n"] == "2" and float(summary[("mixup", "top1")]["mean"]) == 95.5
    assert float(summary[("vanilla", "top1")]["std"]) == pytest.approx(2.0)


def test_paths_below_the_working_directory_are_shown_relative(results, tmp_path, monkeypatch):
    failed = make_run(results, "mixup", 7, 10.0, status="failed")
    monkeypatch.chdir(tmp_path)  # a committed report must not carry the machine's absolute paths
    write_report([Path("runs")], Path("report"), formats=["md", "csv"], plots=False)
    md = (tmp_path / "report" / "table.md").read_text()
    assert f"- runs/{failed.relative_to(results).as_posix()}: failed" in md and str(tmp_path) not in md
    with open(tmp_path / "report" / "runs.csv") as f:
        dirs = [r["run_dir"] for r in csv.DictReader(f)]
    assert dirs and all(d.startswith("runs/") for d in dirs)


def test_duplicate_copies_of_a_run_count_once(results, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(results / "digits" / "net" / "vanilla", copy)
    runset = load_runs([results, copy])
    assert len(runset.runs) == 7 and [p["status"] for p in runset.problems] == ["duplicate"] * 3
    mean, std, n = build_table(runset, "final").cells[("vanilla", 0)]
    assert n == 3


@pytest.mark.slow
def test_plots_are_written_and_non_empty(tmp_path):
    root = two_dataset_results(tmp_path)
    report = write_report([root], tmp_path / "rep", formats=["md"])
    plots = {p.name: p for p in report["files"] if p.parent.name == "plots"}
    for stem in ("top1_per_epoch", "top1_final", "epoch_time", "robustness"):
        png, pdf = plots[f"{stem}.png"], plots[f"{stem}.pdf"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, stem
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2_000, stem


def test_method_colours_follow_the_registry():
    from mixbench.methods import list_methods
    from mixbench.plots import method_colors

    a = method_colors(["cutmix", "vanilla"])
    b = method_colors(["vanilla", "mixup", "cutmix", "my_mix"])
    assert a["cutmix"] == b["cutmix"] and a["vanilla"] == b["vanilla"]
    assert len(set(b.values())) == 4
    assert list_methods()[0] == "vanilla"


def test_cli_report_writes_files_and_says_where(results, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(results), "--out", str(out), "--metric", "best", "--format", "md,csv",
                 "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert f"report in {out}:" in printed and str(out / "table.md") in printed
    assert (out / "table.md").exists() and (out / "runs.csv").exists() and not (out / "table.tex").exists()
    assert "7 complete run(s), 0 incomplete or failed" in printed


def test_cli_default_out_is_inside_the_first_results_folder(results, capsys):
    assert main(["report", str(results), "--format", "md", "--no-plots"]) == 0
    assert (results / "report" / "table.md").exists()
    one = next(results.rglob("result.json"))
    assert main(["report", str(one), "--format", "md", "--no-plots"]) == 0
    assert (one.parent / "report" / "table.md").exists()


@pytest.mark.parametrize("argv,message", [
    (["report", "{empty}"], "no results (result.json) found under"),
    (["report", "{missing}"], "does not exist"),
    (["report", "{results}", "--metric", "median"], "unknown metric 'median'; choose from: final, best, last10"),
    (["report", "{results}", "--format", "md,pdf"], "unknown format 'pdf'; choose from: md, latex, csv, html"),
])
def test_cli_errors_are_one_line_exit_2(results, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    paths = {"empty": tmp_path / "empty", "missing": tmp_path / "nope", "results": results}
    assert main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("mixbench: error: ")


def test_only_failed_runs_is_an_error(tmp_path):
    make_run(tmp_path / "r", "vanilla", 0, 1.0, status="failed")
    with pytest.raises(UsageError, match="no complete runs under .*1 incomplete or failed"):
        write_report([tmp_path / "r"], tmp_path / "out", plots=False)


def test_summary_table_for_run_still_works(results):
    runs = [json.loads(p.read_text()) for p in sorted(results.rglob("result.json"))]
    text = summary_table(runs)
    assert "vanilla" in text and "92.00 +- 2.00" in text and "1.50x" in text


# ---------------------------------------------------------------------------
# feature-removal and filter-usage plots
# ---------------------------------------------------------------------------
def filter_usage_record(skew: float) -> dict:
    """A filter_usage record as mixbench.evaluate writes it; ``skew`` > 0 concentrates the norms."""
    import torch

    from mixbench.evaluations.filter_usage import filter_usage_summary

    norms = {name: torch.linspace(1.0, 1.0 + skew * c, c, dtype=torch.float64)
             for name, c in (("stages.0", 8), ("stages.1", 16), ("features", 16))}
    return filter_usage_summary(norms)


def filter_results(tmp_path, *, with_curves=True):
    """vanilla (concentrated filters, steep removal curve) and catchup_mix (wide use) x 2 seeds."""
    root = tmp_path / "fu"
    for method, skew, drop in (("vanilla", 3.0, 30.0), ("catchup_mix", 0.2, 10.0)):
        for seed in (0, 1):
            ev = {"feature_removal": {"channels": 16, "k": [0, 1, 2, 4, 8],
                                      "top1": [90.0 + seed, 85.0, 80.0 - drop, 60.0 - drop, 20.0], "auc": 50.0},
                  "filter_usage": filter_usage_record(skew + 0.1 * seed)}
            run = make_run(root, method, seed, 90.0 + seed, eval_=ev)
            if with_curves:
                lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
                for i, line in enumerate(lines):
                    line["filter_usage"] = filter_usage_record(skew * (i + 1))
                (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def check_image_files(plots: dict, stem: str) -> None:
    png, pdf = plots[f"{stem}.png"], plots[f"{stem}.pdf"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, stem
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2_000, stem


@pytest.mark.slow
def test_feature_removal_and_filter_usage_plots_are_written(tmp_path):
    report = write_report([filter_results(tmp_path)], tmp_path / "rep", formats=["md"])
    plots = {p.name: p for p in report["files"] if p.parent.name == "plots"}
    for stem in ("feature_removal", "filter_usage_norms", "filter_usage_gini", "filter_usage_per_epoch"):
        check_image_files(plots, stem)
        assert (tmp_path / "rep" / "plots" / f"{stem}.png").exists()


def test_feature_removal_and_filter_usage_frames(tmp_path):
    from mixbench.plots import feature_removal_frame, filter_usage_epochs_frame, filter_usage_frames
    from mixbench.frame import label_runs

    runs = label_runs(load_runs([filter_results(tmp_path)]).runs)
    fr = feature_removal_frame(runs)
    assert len(fr) == 4 * 5 and sorted(fr["k"].unique()) == [0, 1, 2, 4, 8]
    k0 = fr[(fr["row"] == "vanilla") & (fr["k"] == 0)]["top1"]
    assert sorted(k0) == [90.0, 91.0]
    shares, stats = filter_usage_frames(runs)
    # one sorted share curve per (run, stage): C points, descending, summing to 1, rank from 1/C to 1
    for (_, seed, stage), sub in shares.groupby(["row", "seed", "stage"]):
        c = {"stages.0": 8, "stages.1": 16, "features": 16}[stage]
        assert len(sub) == c and abs(sub["share"].sum() - 1.0) < 1e-9
        assert list(sub["share"]) == sorted(sub["share"], reverse=True)
        assert sub["rank"].min() == pytest.approx(1 / c) and sub["rank"].max() == 1.0
    g = stats.groupby("row")["gini"].mean()
    assert g["vanilla"] > g["catchup_mix"] > 0  # concentrated norms: higher Gini
    e = stats.groupby("row")["effective_fraction"].mean()
    assert e["vanilla"] < e["catchup_mix"] <= 1.0
    epochs = filter_usage_epochs_frame(runs)
    assert len(epochs) == 4 * 3 and sorted(epochs["epoch"].unique()) == [1, 2, 3]
    van = epochs[(epochs["row"] == "vanilla") & (epochs["seed"] == 0)].sort_values("epoch")
    assert list(van["mean_gini"]) == sorted(van["mean_gini"])  # skew grows with the epoch in the fixture


def test_filter_usage_headline_columns_lower_gini_is_better(tmp_path):
    md = write_report([filter_results(tmp_path, with_curves=False)], tmp_path / "rep", formats=["md"],
                      plots=False)["markdown"]
    names = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    gi, ei = names.index("filter_usage.mean_gini ↓"), names.index("filter_usage.mean_effective_fraction ↑")
    assert md_row(md, "catchup_mix")[gi].startswith("**0.")  # the lower Gini is the best
    assert md_row(md, "catchup_mix")[ei].startswith("**0.")
    assert not md_row(md, "vanilla")[gi].startswith("**")


def test_filter_usage_means_filled_in_for_older_records(tmp_path):
    from mixbench.frame import filter_usage_means

    fu = filter_usage_record(1.0)
    want = (fu["mean_gini"], fu["mean_effective_fraction"])
    old = {k: v for k, v in fu.items() if not k.startswith("mean_")}
    assert filter_usage_means(old) == pytest.approx(want)
    make_run(tmp_path / "r", "vanilla", 0, 90.0, eval_={"filter_usage": old})
    runs = load_runs([tmp_path / "r"])
    assert "filter_usage.mean_gini" in runs.eval_keys
    assert runs.runs["eval.filter_usage.mean_gini"].iloc[0] == pytest.approx(want[0])


@pytest.mark.slow
def test_no_feature_removal_or_filter_usage_plots_without_data(tmp_path):
    report = write_report([two_dataset_results(tmp_path)], tmp_path / "rep", formats=["md"])
    names = {p.name for p in report["files"]}
    assert "robustness.png" in names
    for stem in ("feature_removal", "filter_usage_norms", "filter_usage_gini", "filter_usage_per_epoch"):
        assert f"{stem}.png" not in names and not (tmp_path / "rep" / "plots" / f"{stem}.png").exists()
    # evaluation data but no per-epoch records: the epoch plot alone is left out
    report = write_report([filter_results(tmp_path, with_curves=False)], tmp_path / "rep2", formats=["md"])
    names = {p.name for p in report["files"]}
    assert {"feature_removal.png", "filter_usage_norms.png", "filter_usage_gini.png"} <= names
    assert "filter_usage_per_epoch.png" not in names


def test_a_suite_evaluated_with_different_settings_in_one_column_is_flagged(tmp_path, capsys):
    """Runs of one column whose corruption results cover different corruptions (or other options) are not
    comparable: the table's notes and the command's stderr say so, naming the runs; alike runs are not flagged."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        for method, parts in (("vanilla", ("fog",)), ("mixup", ("fog", "snow") if seed else ("fog",))):
            ev = {"corruption": {"mean_top1": 50.0, **{p: {"severity": [3], "top1": [50.0]} for p in parts}}}
            run = make_run(root, method, seed, 90.0 + seed, eval_=ev)
            result = json.loads((run / "result.json").read_text())
            result["eval_meta"] = {"corruption": {"options": {"severities": [3]}, "samples": 100, "seed": 0}}
            (run / "result.json").write_text(json.dumps(result))
    assert main(["report", str(root), "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "WARNING: corruption in digits/net was evaluated with 2 different settings" in err
    assert "3 run(s) with 1 parts (not snow)" in err and "1 run(s) with 2 parts (e.g. mixup seed 1)" in err
    assert "WARNING: corruption" in (tmp_path / "rep" / "table.md").read_text()
    # alike again: the mixup seed-1 run measured with the same corruptions as the others
    run = next(root.rglob("mixup/seed1-*"))
    result = json.loads((run / "result.json").read_text())
    del result["eval"]["corruption"]["snow"]
    (run / "result.json").write_text(json.dumps(result))
    assert main(["report", str(root), "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
    assert "WARNING" not in capsys.readouterr().err
