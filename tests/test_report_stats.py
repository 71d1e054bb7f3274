"""`mixbench report`'s statistics: paired tests and their marks, ranks across columns, budget sweeps,
CPU-time cost columns under contention, method styles, and a quiet exit on a closed pipe."""
from __future__ import annotations

import csv
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixbench import stats
from mixbench.frame import load_runs
from mixbench.report import build_table, summary_table, to_latex, to_markdown, write_report
from test_report import check_latex_balanced, make_run, md_row

# Per-seed top-1 of vanilla: a seed effect (spread ~1.2 points) that every method run with the seed shares.
VANILLA = [90.0, 91.5, 89.2, 92.3, 90.8]


def read_csv(path: Path) -> list:
    with open(path) as f:
        return list(csv.DictReader(f))


def effect_results(root: Path) -> Path:
    """Five seeds: mixup +2.0 ± 0.1 over vanilla, cutmix noise only (mean difference 0), manifold_mixup
    +0.5 ± 0.05 (smaller than the seed spread: only a paired comparison sees it)."""
    for seed, base in enumerate(VANILLA):
        make_run(root, "vanilla", seed, base)
        make_run(root, "mixup", seed, base + 2.0 + [0.1, -0.1, 0.05, -0.05, 0.0][seed])
        make_run(root, "cutmix", seed, base + [0.4, -0.3, 0.2, -0.5, 0.2][seed])
        make_run(root, "manifold_mixup", seed, base + 0.5 + [0.05, -0.05, 0.0, 0.03, -0.03][seed])
    return root


def stats_rows(path: Path) -> dict:
    return {(r["row"], r["reference"]): r for r in read_csv(path)}


def test_real_difference_is_marked_and_noise_is_not(tmp_path):
    out = tmp_path / "rep"
    report = write_report([effect_results(tmp_path / "runs")], out, formats=["md", "latex", "csv"], plots=False)
    md = report["markdown"]
    assert md_row(md, "mixup")[1] == "**92.76 ± 1.16**† (5)"  # best (bold) and differs from vanilla
    assert md_row(md, "cutmix")[1] == "90.76 ± 0.91‡ (5)"  # no †: noise only; ‡: below the best
    assert md_row(md, "manifold_mixup")[1].startswith("91.26 ± 1.21†‡")  # paired: seen despite the spread
    assert md_row(md, "vanilla")[1] == "90.76 ± 1.22‡ (5)"
    assert "† differs from vanilla, ‡ differs from the best of its column" in md
    assert "Holm" in md.splitlines()[0]  # the caption names the marks
    tex = to_latex(report["table"])
    check_latex_balanced(tex)
    assert r"mixup & \textbf{92.76 $\pm$ 1.16}$^{\dagger}$ {\scriptsize (5)}" in tex
    assert r"\underline{91.26 $\pm$ 1.21}$^{\dagger\ddagger}$ {\scriptsize (5)}" in tex
    assert r"$^{\dagger}$ differs from vanilla" in tex

    rows = stats_rows(out / "stats.csv")
    assert set(next(iter(rows.values()))) >= {"diff_mean", "ci_low", "ci_high", "p", "p_holm", "n_pairs"}
    mix = rows[("mixup", "vanilla")]
    assert int(mix["n_pairs"]) == 5 and float(mix["diff_mean"]) == pytest.approx(2.0)
    assert float(mix["ci_low"]) < 2.0 < float(mix["ci_high"]) and float(mix["ci_low"]) > 1.8
    assert float(mix["p"]) < 1e-4 and float(mix["p"]) <= float(mix["p_holm"]) < 0.05
    cut = rows[("cutmix", "vanilla")]
    assert abs(float(cut["diff_mean"])) < 1e-9 and float(cut["p_holm"]) == pytest.approx(1.0)
    assert float(cut["ci_low"]) < 0 < float(cut["ci_high"]) and cut["significant"] == "False"
    # the paired test against scipy's, and the same difference unpaired would not be significant
    from scipy import stats as ss

    van = VANILLA
    man = [v + 0.5 + d for v, d in zip(van, [0.05, -0.05, 0.0, 0.03, -0.03])]
    assert float(rows[("manifold_mixup", "vanilla")]["p"]) == pytest.approx(ss.ttest_rel(man, van).pvalue)
    assert ss.ttest_ind(man, van).pvalue > 0.5
    assert rows[("cutmix", "best")]["reference_row"] == "mixup"
    assert "### Paired differences in top-1" in md and "not tested" not in md


def test_pairs_only_matching_seeds_and_fewer_than_three_is_a_note(tmp_path):
    root = tmp_path / "runs"
    for seed, base in enumerate(VANILLA[:3]):
        make_run(root, "vanilla", seed, base)
    for seed in (0, 1, 7):  # seed 7 has no vanilla partner: two pairs
        make_run(root, "mixup", seed, 99.0 + 0.1 * seed)
    for seed in (3, 4, 5):  # no common seed at all
        make_run(root, "cutmix", seed, 95.0 + 0.1 * seed)
    report = write_report([root], tmp_path / "rep", formats=["md", "csv"], plots=False)
    md = report["markdown"]
    assert "†" not in md_row(md, "mixup")[1] and "‡" not in md_row(md, "cutmix")[1]
    assert not report["table"].marks
    note = next(line for line in md.splitlines() if line.startswith("- not tested"))
    assert "fewer than 3 seeds paired" in note
    assert "mixup vs vanilla (2 paired)" in note and "cutmix vs vanilla (0 paired)" in note
    rows = stats_rows(tmp_path / "rep" / "stats.csv")
    assert rows[("mixup", "vanilla")]["n_pairs"] == "2" and rows[("mixup", "vanilla")]["p"] == ""
    assert float(rows[("mixup", "vanilla")]["diff_mean"]) == pytest.approx(99.05 - 90.75)
    assert "Holm" not in md.splitlines()[0]  # nothing tested: no marks to explain


def test_holm_and_paired_edge_cases():
    assert stats.holm([0.01, 0.04, 0.03, float("nan")])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(stats.holm([0.01, float("nan")])[1])
    assert stats.holm([0.5, 0.2]) == pytest.approx([0.5, 0.4])
    same = stats.paired_test({0: 2.0, 1: 3.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 3.0})  # identical differences
    assert (same.diff_mean, same.p, same.ci_low, same.ci_high) == (1.0, 0.0, 1.0, 1.0)
    assert stats.paired_test({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.0, 1: 2.0, 2: 3.0}).p == 1.0
    assert stats.paired_test({0: 1.0}, {1: 1.0}).n_pairs == 0


def test_friedman_matches_scipy_and_handles_two_methods():
    import numpy as np
    from scipy import stats as ss

    x = np.array([[90.0, 91.0, 89.0], [80.0, 82.0, 81.0], [70.0, 70.5, 69.0], [60.0, 61.0, 61.0]])
    chi2, p = stats.friedman(x)
    ref = ss.friedmanchisquare(*x.T)
    assert (chi2, p) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue))
    chi2, p = stats.friedman(np.array([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0]]))  # B wins every block
    assert chi2 == pytest.approx(3.0) and 0 < p < 0.1
    assert stats.nemenyi_cd(3, 4) == pytest.approx(2.343 * math.sqrt(12 / 24), abs=1e-3)  # Demšar's q_0.05


def budget_results(root: Path) -> Path:
    """Two datasets x two budgets (10, 20 epochs) x three methods x three seeds. mixup is behind vanilla at
    10 epochs and clearly ahead at 20; cutmix never catches up."""
    for dataset, shift in (("digits", 0.0), ("fashion_mnist", -8.0)):
        for epochs, seed in itertools.product((10, 20), range(3)):
            base = 88.0 + shift + (2.0 if epochs == 20 else 0.0) + [0.0, 0.8, -0.6][seed]
            noise = [0.05, -0.05, 0.0][seed]
            gain = {10: -0.5, 20: 1.5}[epochs]
            kw = dict(dataset=dataset, spec={"epochs": epochs}, curve=[base - 10, base - 3, base])
            make_run(root, "vanilla", seed, base, **kw)
            make_run(root, "mixup", seed, base + gain + noise, **kw)
            make_run(root, "cutmix", seed, base - 1.0 - noise, **kw)
    return root


@pytest.mark.slow
def test_budget_plot_rank_table_and_critical_difference_diagram(tmp_path):
    out = tmp_path / "rep"
    report = write_report([budget_results(tmp_path / "runs")], out, formats=["md", "csv"])
    plots = {p.name: p for p in report["files"] if p.parent.name == "plots"}
    for stem in ("top1_vs_budget", "critical_difference"):
        png, pdf = plots[f"{stem}.png"], plots[f"{stem}.pdf"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, stem
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2_000, stem
    md = (out / "table.md").read_text()
    groups = list(dict.fromkeys(c.group for c in report["table"].columns))
    assert groups == ["digits/net (epochs=10)", "digits/net (epochs=20)", "fashion_mnist/net (epochs=10)",
                      "fashion_mnist/net (epochs=20)"]
    budget = md[md.index("### Training budget"):]
    assert "digits/net (10, 20 epochs):" in budget and "fashion_mnist/net (10, 20 epochs):" in budget
    assert "- mixup: overtakes vanilla at 20 epochs (+1.50 points; the paired test agrees (p_Holm < 0.001))" in budget
    assert "- cutmix: does not overtake vanilla at any budget (10, 20 epochs)" in budget
    ranks = md[md.index("### Average rank over 4 columns"):]
    assert "| vanilla | 1.50 | 1 | 2 | 1 | 2 |" in ranks and "| mixup | 1.50 | 2 | 1 | 2 | 1 |" in ranks
    assert "| cutmix | 3.00 | 3 | 3 | 3 | 3 |" in ranks and "Friedman test over 4 columns and 3 methods" in ranks
    rows = {r["row"]: r for r in read_csv(out / "ranks.csv")}
    assert float(rows["cutmix"]["average_rank"]) == 3.0 and rows["cutmix"]["n_columns"] == "4"
    assert float(rows["mixup"]["rank[digits/net (epochs=20)]"]) == 1.0
    assert 0 < float(rows["mixup"]["friedman_p"]) < 1 and float(rows["mixup"]["nemenyi_cd"]) > 0
    epochs = {(r["column"], r["row"]): r["epochs"] for r in read_csv(out / "stats.csv") if r["reference"] == "vanilla"}
    assert epochs[("digits/net (epochs=20)", "mixup")] == "20"


@pytest.mark.slow
def test_one_column_or_one_budget_skips_ranks_and_budget_plot(tmp_path):
    report = write_report([effect_results(tmp_path / "runs")], tmp_path / "rep", formats=["md", "csv"])
    names = {p.name for p in report["files"]}
    assert "critical_difference.png" not in names and "top1_vs_budget.png" not in names
    assert "ranks.csv" not in names and not (tmp_path / "rep" / "plots" / "critical_difference.png").exists()
    assert "Ranks across benchmarks: not computed (they need 2 or more columns; this report has 1)." in report["markdown"]
    assert "### Training budget" not in report["markdown"]


def cost_results(root: Path, *, contended=()) -> Path:
    """CPU runs with 2 threads, uncontended: CPU time = 2 x wall. vanilla costs 2.0 CPU s per epoch, mixup 3.0.
    Runs in ``contended`` ((method, seed) pairs) took twice the wall time for the same CPU time."""
    for method, cpu in (("vanilla", 2.0), ("mixup", 3.0)):
        for seed in range(3):
            wall = cpu / 2 * (2.0 if (method, seed) in contended else 1.0)
            make_run(root, method, seed, 90.0 + seed + (method == "mixup"), time_s=wall, cpu_s=cpu, threads=2,
                     device="cpu (x86_64, 2 threads)")
    return root


def overhead(md: str, method: str) -> float:
    return float(md_row(md, method)[2].rstrip("×"))


def test_cpu_time_overhead_is_unmoved_by_contention_and_the_runs_are_named(tmp_path):
    calm = write_report([cost_results(tmp_path / "calm")], tmp_path / "r1", formats=["md"], plots=False)["markdown"]
    hot_runs = {("vanilla", 0), ("vanilla", 1), ("mixup", 2)}
    hot = write_report([cost_results(tmp_path / "hot", contended=hot_runs)], tmp_path / "r2", formats=["md"],
                       plots=False)["markdown"]
    assert "| method | digits/net top-1 (%) | epoch CPU time (× vanilla) | peak mem (MB) |" in hot
    assert overhead(calm, "mixup") == pytest.approx(1.5)
    assert overhead(hot, "mixup") == pytest.approx(overhead(calm, "mixup"), rel=0.05)
    assert overhead(hot, "vanilla") == pytest.approx(1.0, rel=0.05)
    # wall time would have said mixup costs 1.8x / 1.33 vanilla's: the contention, not the method
    wall_ratio = (2 * 1.5 + 3.0) / 3 / ((2 * 2.0 + 1.0) / 3)
    assert abs(wall_ratio / 1.5 - 1) > 0.05
    note = next(line for line in hot.splitlines() if line.startswith("- CPU contention"))
    assert "in 3 run(s)" in note and "the CPU-time column is unaffected" in note
    assert "digits/net: mixup seed 2 (2.00), vanilla seed 0 (2.00), vanilla seed 1 (2.00)" in note
    assert "CPU contention" not in calm and "process CPU time (user + system)" in calm
    check_latex_balanced(to_latex(build_table(load_runs([tmp_path / "hot"]))))


def test_old_results_and_cuda_keep_wall_time(tmp_path):
    old = tmp_path / "old"
    make_run(old, "vanilla", 0, 90.0, time_s=1.0)
    make_run(old, "mixup", 0, 91.0, time_s=1.5)
    md = to_markdown(build_table(load_runs([old])))
    assert "| epoch time (× vanilla) |" in md and md_row(md, "mixup")[2] == "1.50×"
    assert "wall-clock time: not every run recorded CPU time" in md
    mixed = tmp_path / "mixed"  # one run recorded CPU time, the other did not: wall time for both
    make_run(mixed, "vanilla", 0, 90.0, time_s=1.0, cpu_s=2.0, threads=2, device="cpu")
    make_run(mixed, "mixup", 0, 91.0, time_s=1.5)
    md = to_markdown(build_table(load_runs([mixed])))
    assert md_row(md, "mixup")[2] == "1.50×" and "not every run recorded CPU time" in md
    gpu = tmp_path / "gpu"
    make_run(gpu, "vanilla", 0, 90.0, time_s=1.0, cpu_s=0.9, threads=8, device="NVIDIA H200")
    make_run(gpu, "mixup", 0, 91.0, time_s=1.2, cpu_s=5.0, threads=8, device="NVIDIA H200")
    md = to_markdown(build_table(load_runs([gpu])))
    assert "| epoch time (× vanilla) |" in md and md_row(md, "mixup")[2] == "1.20×"
    assert "recorded CPU time" not in md and "CPU contention" not in md  # wall time is right on CUDA


def test_one_run_cells_have_no_zero_std(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "vanilla", 0, 99.1)
    make_run(root, "mixup", 0, 98.0)
    make_run(root, "mixup", 1, 98.0)
    md = to_markdown(build_table(load_runs([root])))
    assert md_row(md, "vanilla")[1] == "**99.10** (1)"
    results = [{"status": "complete", "method": "vanilla", "final_top1": 99.1, "epoch_time_s": 1.0}]
    text = summary_table(results)
    assert "99.10" in text and "+-" not in text


def test_twenty_methods_have_distinct_colours_and_markers():
    from matplotlib.colors import to_rgb

    from mixbench.methods import list_methods
    from mixbench.plots import method_colors, method_markers

    labels = list_methods() + [f"extra_{i:02d}" for i in range(20 - len(list_methods()))]
    colors, markers = method_colors(labels), method_markers(labels)
    rgb = [to_rgb(colors[label]) for label in labels]
    assert len(set(rgb)) == 20 and len({(c, markers[l]) for c, l in zip(rgb, labels)}) == 20
    closest = min(math.dist(a, b) for a, b in itertools.combinations(rgb, 2))
    assert closest > 0.09  # tab20's closest pair; the old palette repeated colours
    for a, b in zip(labels, labels[1:]):  # neighbours in table order differ in hue and marker
        assert math.dist(to_rgb(colors[a]), to_rgb(colors[b])) > 0.3 and markers[a] != markers[b]
    for a, b in itertools.combinations(labels, 2):  # similar colours (a hue and its light tone) differ in marker
        if math.dist(to_rgb(colors[a]), to_rgb(colors[b])) < 0.3:
            assert markers[a] != markers[b], (a, b)
    assert math.dist(to_rgb(colors["manifold_mixup"]), to_rgb(colors["catchup_mix"])) > 0.3
    # the same style whatever else is plotted
    assert method_colors(["catchup_mix"]) == {"catchup_mix": colors["catchup_mix"]}
    assert method_markers(["vanilla", "catchup_mix"])["catchup_mix"] == markers["catchup_mix"]


@pytest.mark.slow
def test_closed_pipe_ends_quietly(tmp_path):
    """`mixbench list methods | head -0`: the reader is gone before anything is written."""
    proc = subprocess.Popen([sys.executable, "-m", "mixbench", "list", "methods"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert err == ""


CD_SCRIPT = """
import sys, types
from pathlib import Path
import pandas as pd
from mixbench.plots import method_colors, plot_critical_difference
rows = ["vanilla", "mixup", "cutmix", "manifold_mixup", "fmix", "saliencymix"]
nemenyi = pd.DataFrame(0.9, index=rows, columns=rows)  # one bar joins all but mixup and saliencymix
nemenyi.loc["mixup", "saliencymix"] = nemenyi.loc["saliencymix", "mixup"] = 0.01
ranks = types.SimpleNamespace(rows=rows, average=dict(zip(rows, [3.5, 2.0, 2.5, 4.0, 4.5, 4.5])),
                              nemenyi=nemenyi, cd=1.8, p=0.2, columns=["a", "b", "c"])
plot_critical_difference(ranks, Path(sys.argv[1]), method_colors(rows))
"""


@pytest.mark.slow  # two fresh interpreters
def test_critical_difference_diagram_is_the_same_file_in_every_run(tmp_path):
    # scikit-posthocs iterates a set of method names to draw each bar; string hashing differs per process.
    pngs, pdfs = [], []
    for seed in ("0", "1"):
        path = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": path}
        subprocess.run([sys.executable, "-c", CD_SCRIPT, str(tmp_path / seed)], env=env, check=True)
        pngs.append((tmp_path / seed / "critical_difference.png").read_bytes())
        pdfs.append((tmp_path / seed / "critical_difference.pdf").read_bytes())
    assert pngs[0][:8] == b"\x89PNG\r\n\x1a\n" and pngs[0] == pngs[1]
    assert pdfs[0][:5] == b"%PDF-" and pdfs[0] == pdfs[1]  # no creation date either
