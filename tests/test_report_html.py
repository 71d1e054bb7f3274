"""`mixbench report`'s index.html: what it holds, that it fetches nothing, and (in a headless Chromium) that its
tables render with every method, that a click on a header re-sorts the rows and that every plot loads."""
from __future__ import annotations

import html
import os
import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import pytest

from mixbench.cli import main
from mixbench.htmlpage import method_docs
from mixbench.report import write_report
from test_report import eval_record, make_run

METHODS = ["vanilla", "mixup", "cutmix", "puzzlemix"]
TOP1 = {"vanilla": [90.0, 91.0, 92.0], "mixup": [95.0, 95.5, 96.5], "cutmix": [93.0, 92.0, 94.5],
        "puzzlemix": [80.0, 81.0, 79.0]}


def make_results(root: Path) -> Path:
    """Three seeds of four methods on two data sets, with evaluation results (a robustness plot)."""
    for dataset, shift in (("digits", 0.0), ("fashion-mnist", -10.0)):
        for method in METHODS:
            for seed, acc in enumerate(TOP1[method]):
                make_run(root, method, seed, acc + shift, dataset=dataset, time_s=1.0 + 0.1 * len(method),
                         eval_=eval_record(50.0 + acc / 10, 2.0 + seed))
    make_run(root, "cutmix", 7, 1.0, status="failed")  # listed, not averaged
    return root


def _report(tmp: Path, plots: bool) -> dict:
    root = make_results(tmp / "runs")
    out = tmp / "report"
    files = write_report([root], out, plots=plots)
    return {"out": out, "root": root, "files": files["files"], "page": (out / "index.html").read_text()}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report without plots (they take a while to draw): what the page says."""
    return _report(tmp_path_factory.mktemp("html"), plots=False)


@pytest.fixture(scope="module")
def plotted(tmp_path_factory):
    """The whole report, plots included: for the browser."""
    return _report(tmp_path_factory.mktemp("html-plots"), plots=True)


def test_index_html_is_a_default_format_next_to_the_tables(report):
    names = {p.name for p in report["files"]}
    assert {"table.md", "table.tex", "runs.csv", "index.html"} <= names and "plots" not in page_links(report)
    page = report["page"]
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "mixbench report: digits/net, fashion-mnist/net" in page


def page_links(report) -> str:
    return " ".join(re.findall(r'(?:href|src)="([^"]+)"', report["page"]))


def test_the_page_fetches_nothing_and_every_local_link_exists(report):
    page, out = report["page"], report["out"]
    # Nothing is loaded from elsewhere: no external scripts, styles, images, fonts or frames.
    for tag in re.findall(r"<(?:script|link|img|iframe|source|video|audio|object|embed)\b[^>]*>", page):
        assert not re.search(r"(src|href|data)=\"(https?:)?//", tag), tag
    assert "@import" not in page and "url(" not in page
    # Links to files (runs, plots, PDFs) point at files that exist; anchors at ids on the page.
    ids = set(re.findall(r'id="([^"]+)"', page))
    hrefs = [html.unescape(h) for h in re.findall(r'(?:href|src)="([^"]+)"', page)]
    local = [h for h in hrefs if not re.match(r"https?://", h)]
    assert local
    for h in local:
        if h.startswith("#"):
            assert h[1:] in ids, h
        else:
            assert (out / unquote(h)).exists(), h


def test_every_method_cell_and_run_is_on_the_page(report):
    page = report["page"]
    body = page.split('<table id="results-table"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r'<th scope="row" class="method-name"><a href="#method-(\w+)">([^<]+)</a>', body)
    assert [label for _, label in rows] == METHODS
    assert "95.67 ± 0.76" in body and "(3)" in body  # mixup on digits, as in table.md
    assert '<span class="best">95.67 ± 0.76</span>' in body
    for method in METHODS:
        assert f'id="method-{method}"' in page
    # every run of every cell is linked with its files
    for result in report["root"].rglob("result.json"):
        if '"failed"' in result.read_text():
            continue
        rel = os.path.relpath(result, report["out"])
        assert f'href="{rel}"' in page and f'href="{os.path.relpath(result.parent / "spec.yaml", report["out"])}"' in page
    assert "Incomplete or failed runs" in page and "failed" in page


def test_methods_show_paper_parameters_and_deviations(report):
    page = report["page"]
    mixup = page.split('id="method-mixup"', 1)[1].split('class="method"', 1)[0]
    assert 'href="https://arxiv.org/abs/1710.09412"' in mixup and "Zhang et al." in mixup
    assert "<code>alpha=1.0</code>" in mixup
    puzzle = page.split('id="method-puzzlemix"', 1)[1].split('class="method"', 1)[0]
    assert "Implementation choices and deviations" in puzzle and "<li>" in puzzle


def test_method_docs_reads_the_readme_table_and_sections():
    readme = ("## Methods\n\n| name | paper | key hyper-parameters (defaults) | notes |\n|---|---|---|---|\n"
              "| `my_mix` | Doe, 2030 ([1](https://x.org/1)) | `a=1` | mixes \\| things |\n\nText.\n\n"
              "### My Mix: implementation choices\n\n- one\n- two\n\n## Data sets\n\nmore\n")
    docs = method_docs(readme)
    assert docs["my_mix"]["paper"] == "Doe, 2030 ([1](https://x.org/1))"
    assert docs["my_mix"]["notes"] == "mixes | things"
    assert docs["my_mix"]["choices"] == "- one\n- two"
    # the real README documents every registered method but vanilla's choices
    from mixbench.methods import list_methods

    real = method_docs()
    assert set(list_methods()) <= set(real)


def test_labels_are_escaped(tmp_path):
    root = tmp_path / "runs"
    for seed in range(2):
        make_run(root, "vanilla", seed, 90.0 + seed)
        make_run(root, "mixup", seed, 91.0 + seed, params={"alpha": "<b>1</b>"})
        make_run(root, "mixup", seed, 92.0 + seed, params={"alpha": 2})
    write_report([root], tmp_path / "rep", formats=["html"], plots=False)
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "<b>1</b>" not in page and "&lt;b&gt;1&lt;/b&gt;" in page
    assert not (tmp_path / "rep" / "table.md").exists()


def test_cli_format_html_alone(tmp_path, capsys):
    root = tmp_path / "runs"
    make_run(root, "vanilla", 0, 90.0)
    assert main(["report", str(root), "--out", str(tmp_path / "rep"), "--format", "html", "--no-plots"]) == 0
    assert str(tmp_path / "rep" / "index.html") in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["index.html"]


# ---------------------------------------------------------------------------
# in a real browser: Debian's chromium, driven by Selenium
# ---------------------------------------------------------------------------
def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _browser_missing() -> str:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not _chromium():
        return "no chromium on PATH (Debian: apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "no chromedriver on PATH (Debian: apt-get install chromium-driver)"
    return ""


@pytest.fixture(scope="module")
def browser():
    why = _browser_missing()
    if why:
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                # any request that leaves the machine fails: the page must not need one
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost", "--disable-background-networking"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # the driver from the distribution: Selenium Manager never downloads one
    driver = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
    yield driver
    driver.quit()


def _column(driver, table_id: str, col: int) -> list:
    return driver.execute_script(
        "return Array.from(document.getElementById(arguments[0]).tBodies[0].rows)"
        ".map(r => [r.cells[0].textContent.trim(), r.cells[arguments[1]].getAttribute('data-value')]);",
        table_id, col)


@pytest.mark.slow
def test_in_chromium_tables_sort_and_plots_load(browser, plotted, tmp_path):
    from selenium.webdriver.common.by import By

    report = plotted
    out = report["out"]
    browser.get((out / "index.html").resolve().as_uri())
    assert browser.title.startswith("mixbench report")

    # the accuracy table renders with every method, in registry order
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results-table tbody th.method-name")]
    assert labels == METHODS
    cells = browser.find_elements(By.CSS_SELECTOR, "#results-table tbody td")
    assert cells and all(c.is_displayed() for c in cells)
    assert "95.67 ± 0.76" in browser.find_element(By.ID, "results-table").text

    # a click on digits' top-1 header sorts by it, best first; a second click reverses; the method header restores
    header = browser.find_element(By.CSS_SELECTOR, '#results-table th[data-col="1"]')
    assert "top-1" in header.text
    header.click()
    means = {m: sum(v) / len(v) for m, v in TOP1.items()}
    by_top1 = sorted(METHODS, key=lambda m: -means[m])
    assert [m for m, _ in _column(browser, "results-table", 1)] == by_top1 == ["mixup", "cutmix", "vanilla", "puzzlemix"]
    values = [float(v) for _, v in _column(browser, "results-table", 1)]
    assert values == sorted(values, reverse=True) and header.get_attribute("aria-sort") == "descending"
    header.click()
    assert [m for m, _ in _column(browser, "results-table", 1)] == by_top1[::-1]
    assert header.get_attribute("aria-sort") == "ascending"
    method_header = browser.find_element(By.CSS_SELECTOR, '#results-table th[data-col="0"]')
    method_header.click()
    assert [m for m, _ in _column(browser, "results-table", 0)] == sorted(METHODS)
    # another table sorts too: the paired differences by p
    p_header = browser.find_element(By.CSS_SELECTOR, '#paired-table th[data-col="5"]')
    p_header.click()
    ps = [v for _, v in _column(browser, "paired-table", 5)]
    numbers = [float(v) for v in ps if v]
    assert numbers == sorted(numbers) and ps[:len(numbers)] == [v for v in ps if v]  # untested ones last

    # every plot loads (decoded, non-empty), one per PNG the report wrote
    pngs = sorted(p.name for p in report["files"] if p.suffix == ".png")
    assert len(pngs) >= 4
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);")
    assert sorted(Path(src).name for src, _, _ in images) == pngs
    for src, complete, width in images:
        assert complete and width > 100, src

    # nothing was fetched but local files, and no script error
    import json

    urls = [m["params"]["request"]["url"] for m in
            (json.loads(e["message"])["message"] for e in browser.get_log("performance"))
            if m["method"] == "Network.requestWillBeSent"]
    assert len(urls) > len(pngs) and all(u.startswith("file://") for u in urls), urls
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

    # a cell links to its runs
    browser.find_element(By.CSS_SELECTOR, "#results-table tbody td a.cell").click()
    target = browser.execute_script("return location.hash;")
    assert target.startswith("#runs-") and browser.find_element(By.ID, target[1:]).is_displayed()

    browser.execute_script("window.scrollTo(0, 0);")
    shot = tmp_path / "index.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    keep = os.environ.get("MIXBENCH_SCREENSHOT_DIR")
    if keep:  # CI keeps it as an artifact
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "report-index.png")
