"""benchmarks/decode_throughput.py runs its code paths on a small generated ImageFolder tree."""
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_decode_benchmark_on_a_generated_tree(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("decode_throughput", REPO / "benchmarks" / "decode_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    assert bench.main(["--generate", "24", "--batches", "2", "--batch-size", "8", "--image-size", "32",
                       "--workers", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["decode"], r["workers"]) for r in rows] == [("cpu", 0), ("gpu", 0)]  # PIL, then decode_jpeg
    assert all(r["images"] == 16 and r["images_per_s"] > 0 and r["images_per_cpu_s"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "images/s/core" in printed and "PIL (workers)" in printed and "decode_jpeg (" in printed
