"""benchmarks/gpu_check.py --quick: the GPU check's code paths on the CPU (throughput eager and compiled,
every evaluation suite, the resume with fewer visible GPUs and the refused device change, a 2-process
data-parallel epoch on Gloo, --decode gpu against PIL)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_quick(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--out", str(out),
                           "--budget-min", "60"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    parts = {(p["model"], p["compiled"]): p for p in result["throughput"]}
    assert len(parts) == 4 and not result.get("errors")
    for (model, compiled), part in parts.items():
        for name in result["methods"]:
            r = part["methods"][name]
            assert r["images_per_s"] > 0 and r["recompiles_timed"] == 0, (model, compiled, name, r)
        assert part["methods"]["vanilla"]["vs_vanilla"] == 1.0
        if compiled:  # one graph per mixing point (input + 5 stages), no graph break
            assert part["warm_graphs"] == 6, part
    assert set(result["eval"]["suites"]) >= {"adversarial", "corruption", "calibration", "loss_landscape"}
    resume = result["resume"]
    assert resume["ok"] and resume["first_exit"] == 17 and resume["other_device_exit"] == 2
    assert "written on cuda" in resume["other_device_error"] and resume["resumed_from"]
    assert "| method |" in proc.stdout and "resume:" in proc.stdout
    ddp = result["ddp"]  # two Gloo processes with sync BN, each method's epoch compiled like the throughput part's
    assert ddp["ok"] and ddp["backend"] == "gloo", ddp
    assert {k for k, v in ddp["methods"].items() if v["nproc"] == 2} == {
        "vanilla (2 processes)", "manifold_mixup (2 processes)", "automix (2 processes)"}
    assert all(v["compiled"] and v["final_top1"] > 0 for v in ddp["methods"].values())
    assert "data-parallel (gloo, sync BN)" in proc.stdout
    decode = result["decode"]  # --decode gpu on the CPU's decoder against PIL
    assert decode["ok"] and decode["train"]["labels_and_shapes_equal"] and decode["val"]["mean_abs_diff"] < 3
    assert [r["decoder"] for r in decode["speed"]] == ["PIL (workers)", "decode_jpeg (cpu)"]
    assert "--decode gpu (decode_jpeg (cpu)) vs PIL (ok)" in proc.stdout
