"""The command line end to end: a short real run, re-run skipping, and bad input."""
import json
import subprocess
import sys

import pytest

from mixbench.cli import main

RESULT_FIELDS = {
    "schema_version", "method", "method_params", "dataset", "model", "seed", "epochs", "status", "final_top1",
    "best_top1", "last10_median_top1", "wall_time_s", "epoch_time_s", "peak_mem_mb", "versions", "device",
    "git_commit",
}


@pytest.mark.slow
def test_run_writes_complete_results_and_skips_them_next_time(tmp_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "mixbench", "run", "--methods", "vanilla,mixup", "--dataset", "synthetic",
           "--epochs", "2", "--seeds", "0", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "vanilla" in proc.stdout and "mixup" in proc.stdout and "vs vanilla" in proc.stdout
    results = sorted(out.rglob("result.json"))
    assert len(results) == 2
    for path in results:
        result = json.loads(path.read_text())
        assert RESULT_FIELDS <= set(result)
        assert result["status"] == "complete" and result["epochs"] == 2 and result["schema_version"] == 1
        assert 0 <= result["final_top1"] <= 100 and result["best_top1"] >= result["final_top1"]
        assert set(result["versions"]) >= {"python", "torch", "timm", "mixbench"}
        metrics = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in metrics] == [0, 1]
        assert metrics[-1]["test_top1"] == result["final_top1"]
        assert (path.parent / "spec.yaml").exists() and (path.parent / "model.pt").exists()
        assert not (path.parent / "checkpoint.pt").exists()
    # The synthetic task is learnable: vanilla gets well above chance (10%) in two epochs (60% seen).
    vanilla = json.loads(next(p for p in results if "/vanilla/" in str(p)).read_text())
    assert vanilla["final_top1"] > 30
    before = {p: p.stat().st_mtime_ns for p in results}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stderr.count("already complete") == 2
    assert {p: p.stat().st_mtime_ns for p in results} == before


@pytest.mark.slow
def test_same_seed_same_numbers(tmp_path):
    args = ["run", "--methods", "cutmix", "--dataset", "synthetic", "--epochs", "1", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads(next((tmp_path / d).rglob("metrics.jsonl")).read_text()) for d in "ab")
    assert a["train_loss"] == b["train_loss"] and a["test_top1"] == b["test_top1"]


@pytest.mark.parametrize("args, message", [
    (["--methods", "mixupp"], "unknown method 'mixupp'; choose from: vanilla, mixup, cutmix"),
    (["--dataset", "imagenet22k"], "unknown dataset 'imagenet22k'; choose from: digits"),
    (["--model", "resnet19"], "unknown model 'resnet19'"),
    (["--seeds", "a,b"], "--seeds must be comma-separated integers, got 'a,b'"),
    (["--device", "tpu"], "unknown device 'tpu'; choose from: auto, cpu, cuda"),
    (["--data-dir", "/nonexistent/mixbench-data"], "--data-dir '/nonexistent/mixbench-data' is not a folder"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "runs"
    code = main(["run", "--out", str(out), "--no-progress"] + args)
    # `--methods all` (the default) first notes each method it skips (attentivemix without an extractor)
    err = capsys.readouterr().err
    err = "".join(line for line in err.splitlines(True) if not line.startswith("mixbench: skipping"))
    assert code == 2
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--epochs", "x"), ("--lr", "-1"), ("--batch-size", "1.5")])
def test_bad_numbers_exit_2(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_list_methods_one_name_per_line(capsys):
    assert main(["list", "methods"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names[:3] == ["vanilla", "mixup", "cutmix"]
