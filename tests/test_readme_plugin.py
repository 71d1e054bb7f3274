"""The README's "Compare your own method" example, run exactly as written.

Its shell blocks run with bash in an empty git repository outside the project
(``mixbench`` and ``python`` are this interpreter's), its Python block becomes
``stripemix.py`` where the README says so; at the end the table with the
stripemix row beside vanilla and mixup is committed.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Compare your own method"


def readme_blocks():
    """The section's fenced blocks, in order: (language, text)."""
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION + "\n")
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end >= 0 else None]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", section, re.M | re.S)]


def test_readme_section_has_the_steps():
    blocks = readme_blocks()
    assert [lang for lang, _ in blocks] == ["", "python", ""]
    assert blocks[0][1].strip() == "mixbench new-method stripemix"
    assert 'name = "stripemix"' in blocks[1][1] and "def stripemix_mix(" in blocks[1][1]
    commands = blocks[2][1]
    for step in ("python -m pytest -q test_stripemix.py", "mixbench run --plugins stripemix.py",
                 "mixbench evaluate runs", "mixbench report runs --out report", "git commit"):
        assert step in commands, step


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path):
    (_, new), (_, plugin), (_, commands) = readme_blocks()
    work = tmp_path / "my-paper"
    work.mkdir()
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "GIT_AUTHOR_NAME": "A Researcher", "GIT_AUTHOR_EMAIL": "a@example.org",
           "GIT_COMMITTER_NAME": "A Researcher", "GIT_COMMITTER_EMAIL": "a@example.org"}
    assert Path(bindir, "mixbench").exists() and Path(bindir, "python").exists()

    def bash(script: str) -> str:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True,
                              text=True, timeout=1200)
        assert proc.returncode == 0, f"{script}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        return proc.stdout

    bash("git init -q")
    out = bash(new)
    assert "wrote stripemix.py" in out and (work / "test_stripemix.py").exists()
    (work / "stripemix.py").write_text(plugin)
    out = bash(commands)

    assert re.search(r"\b9 passed\b", out), out  # the generated tests pass on the README's core
    assert re.search(rf"^stripemix +alpha=1.0 +\[plugin {re.escape(str(work / 'stripemix.py'))}\]$", out, re.M), out
    table = (work / "report" / "table.md").read_text()
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1].strip())
    assert rows == ["vanilla", "mixup", "stripemix"], table
    assert "calibration.ece" in table
    committed = subprocess.run(["git", "ls-files"], cwd=work, capture_output=True, text=True).stdout.split()
    assert {"stripemix.py", "test_stripemix.py", "report/table.md", "report/table.tex"} <= set(committed)
    log = subprocess.run(["git", "log", "--format=%s"], cwd=work, capture_output=True, text=True).stdout
    assert log.strip() == "stripemix beside vanilla and mixup"
