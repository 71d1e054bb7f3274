"""The shared worker pool (methods/_pool.py): order of results, and scripts without a __main__ guard.

The scripts run in a subprocess with this tree on the path: forkserver and
spawn workers import the main script again, so only a real script shows it.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mixbench.methods import _pool

ROOT = Path(__file__).resolve().parents[1]

BODY = """
import warnings
import numpy as np
import pytest
from mixbench.methods._pool import ChunkPool

warnings.simplefilter("always")
pool = ChunkPool(1, name="demo")
print("result", [r.tolist() for r in pool.run(np.square, [(np.arange(3),), (np.arange(3, 6),)])])
print("workers", pool.workers)
pool.close()
"""


def run_script(tmp_path, text):
    script = tmp_path / "train_script.py"
    script.write_text(textwrap.dedent(text))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


def test_results_come_back_in_order_and_serially_without_workers():
    chunks = [(np.arange(k, k + 2),) for k in range(0, 10, 2)]
    assert [r.tolist() for r in _pool.ChunkPool(0).run(np.square, chunks)] == [[0, 1], [4, 9], [16, 25],
                                                                               [36, 49], [64, 81]]
    assert _pool.chunk_bounds(5, 3).tolist() == [0, 2, 3, 5] and _pool.chunk_bounds(2, 4).tolist() == [0, 1, 2]


def test_guard_detection(tmp_path, monkeypatch):
    import types

    for text, guarded in (("x = 1\n", False), ("if __name__ == '__main__':\n    pass\n", True),
                          ("if '__main__' == __name__:\n    pass\n", True), ("if __name__ != '__main__':\n    pass\n", False)):
        path = tmp_path / "s.py"
        path.write_text(text)
        monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__file__=str(path), __spec__=None))
        assert (_pool.unguarded_main_script() is None) == guarded, text
    # python -m pkg (a package's __main__) and interactive sessions are not re-imported by the workers
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__spec__=types.SimpleNamespace(
        name="mixbench.__main__", origin=str(tmp_path / "s.py"))))
    assert _pool.unguarded_main_script() is None
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__spec__=None))
    assert _pool.unguarded_main_script() is None


@pytest.mark.slow
def test_unguarded_script_says_so_and_runs_serially(tmp_path):
    proc = run_script(tmp_path, BODY)
    assert proc.returncode == 0, proc.stderr
    assert "result [[0, 1, 4], [9, 16, 25]]" in proc.stdout and "workers 0" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if "demo:" in line]
    assert len(lines) == 1, proc.stderr
    assert "train_script.py has no `if __name__ == \"__main__\":` guard" in lines[0]
    assert "pass workers=0" in lines[0]
    assert "worker pool failed" not in proc.stderr


@pytest.mark.slow  # starts a worker process (imports torch again)
def test_guarded_script_solves_in_the_worker(tmp_path):
    guarded = "def main():\n" + textwrap.indent(BODY, "    ") + "\n\nif __name__ == \"__main__\":\n    main()\n"
    proc = run_script(tmp_path, guarded)
    assert proc.returncode == 0, proc.stderr
    assert "result [[0, 1, 4], [9, 16, 25]]" in proc.stdout and "workers 1" in proc.stdout
    assert "demo:" not in proc.stderr


@pytest.mark.slow  # starts a worker process (imports torch again)
def test_pool_started_outside_the_guard_stops_the_worker_and_says_why(tmp_path):
    # The script has a guard, but starts the pool at its top level anyway: each worker, importing the
    # script, would start a pool (and train) itself. The worker stops; the script falls back with the reason.
    proc = run_script(tmp_path, BODY + "\nif __name__ == \"__main__\":\n    pass\n")
    assert proc.returncode == 0, proc.stderr
    assert "result [[0, 1, 4], [9, 16, 25]]" in proc.stdout and "workers 0" in proc.stdout
    assert proc.stdout.count("result") == 1, "a worker ran the script's work"
    warning = [line for line in proc.stderr.splitlines() if "demo: worker pool failed" in line]
    assert len(warning) == 1 and "pass workers=0" in warning[0], proc.stderr
