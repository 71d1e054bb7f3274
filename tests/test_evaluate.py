"""Evaluation suites: hand-checkable cores, then one end-to-end run through the CLI."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixbench import UsageError
from mixbench import evaluate as ev
from mixbench.evaluations import PixelModel, top1
from mixbench.evaluations.adversarial import fgsm, pgd
from mixbench.evaluations.calibration import calibration_metrics
from mixbench.evaluations.corruption import corrupt, corrupted_images
from mixbench.evaluations.deformation import deform
from mixbench.evaluations.feature_removal import feature_removal_curve, remove_top_channels
from mixbench.evaluations.filter_usage import channel_norms, effective_channels, filter_usage_during_training, gini
from mixbench.evaluations.loss_landscape import filter_normalised_direction, landscape_loss
from mixbench.cli import main
from mixbench.spec import RunSpec


# ---------------------------------------------------------------------------
# Adversarial


class Linear(nn.Module):
    def __init__(self, weight, bias=None):
        super().__init__()
        self.weight = torch.as_tensor(weight, dtype=torch.float64)
        self.bias = torch.zeros(len(self.weight), dtype=torch.float64) if bias is None else torch.as_tensor(bias)

    def forward(self, x):
        return x @ self.weight.T + self.bias


def test_fgsm_two_class_linear_by_hand():
    # logits (2a - b, -a + b); for label 0 the input gradient of the loss is p1 * (w1 - w0) = p1 * (-3, 2),
    # whatever p1 is, so FGSM moves a by -eps and b by +eps, clamped to [0, 1].
    model = Linear([[2.0, -1.0], [-1.0, 1.0]])
    x = torch.tensor([[0.5, 0.5], [0.02, 0.99]], dtype=torch.float64)
    adv = fgsm(model, x, torch.tensor([0, 0]), eps=0.1)
    assert torch.allclose(adv, torch.tensor([[0.4, 0.6], [0.0, 1.0]], dtype=torch.float64))


def test_fgsm_linear_equals_closed_form():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(5, 12, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    x = torch.rand(32, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (32,), generator=g)
    eps = 8 / 255
    # d CE / d x = W^T (softmax(W x + b) - onehot(y))
    grad = (torch.softmax(x @ w.T + b, 1) - F.one_hot(y, 5).double()) @ w
    expected = (x + eps * grad.sign()).clamp(0, 1)
    assert torch.equal(fgsm(Linear(w, b), x, y, eps), expected)


def test_pgd_stays_in_the_ball_and_one_full_step_is_fgsm():
    g = torch.Generator().manual_seed(1)
    model = Linear(torch.randn(4, 6, generator=g, dtype=torch.float64))
    x = torch.rand(16, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (16,), generator=g)
    assert torch.equal(pgd(model, x, y, eps=0.05, step_size=0.05, steps=1), fgsm(model, x, y, 0.05))
    adv = pgd(model, x, y, eps=0.03, step_size=0.01, steps=7, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 0.03 + 1e-12 and adv.min() >= 0 and adv.max() <= 1
    # the attack raises the loss over the clean input
    assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


# ---------------------------------------------------------------------------
# Feature removal


def test_remove_top_channels_by_hand():
    f = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 4.0]])
    assert torch.equal(remove_top_channels(f, 0), f)
    assert torch.equal(remove_top_channels(f, 1), torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 4.0]]))
    assert torch.equal(remove_top_channels(f, 2), torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    # 4-D maps: ranked by the spatial mean
    maps = torch.tensor([[[[1.0, 1.0]], [[0.0, 4.0]]]])  # channel means 1 and 2
    assert torch.equal(remove_top_channels(maps, 1), torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]]))


class GroupSum(nn.Module):
    """features = input; logit c = sum of the channels of group c (two groups of `half` channels)."""

    def __init__(self, half):
        super().__init__()
        self.half = half

    def forward_features(self, x):
        return x

    def forward_head(self, f):
        f = f.flatten(1)
        return torch.stack([f[:, :self.half].sum(1), f[:, self.half:].sum(1)], 1)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_feature_removal_k0_is_clean_and_curve_is_monotone():
    # Every sample of class 0 has its 8 class-0 channels above all its class-1 channels (and the other way
    # round), so removing the top k channels only ever takes evidence from the true class: a sample can
    # turn wrong as k grows but never right again.
    g = torch.Generator().manual_seed(0)
    n, half = 200, 8
    y = torch.arange(n) % 2
    strong = 1 + torch.rand(n, half, generator=g) * 3
    weak = torch.rand(n, half, generator=g) * torch.rand(n, 1, generator=g) * 1.5
    x = torch.where(y[:, None] == 0, torch.cat([strong, weak], 1), torch.cat([weak, strong], 1))[:, :, None, None]
    model = PixelModel(GroupSum(half), [0.0], [1.0])
    ks = list(range(0, half + 1))
    curve = feature_removal_curve(model, x, y, ks, batch_size=64)
    assert curve[0] == top1(model(x), y) == 100.0
    assert all(a >= b for a, b in zip(curve, curve[1:]))
    assert curve[-1] == 0.0 and 0 < curve[half // 2] < 100


# ---------------------------------------------------------------------------
# Filter usage


def test_gini_and_effective_channels_on_known_distributions():
    c = 16
    assert gini(torch.ones(c)) == pytest.approx(0.0, abs=1e-12)
    assert effective_channels(torch.ones(c) * 3.7) == pytest.approx(c)
    one_hot = torch.zeros(c)
    one_hot[5] = 2.0
    assert gini(one_hot) == pytest.approx((c - 1) / c)
    assert effective_channels(one_hot) == pytest.approx(1.0)
    # half the channels share everything: Gini 1/2 (mean |xi - xj| / (2 mean) = 0.5 / 1), two effective of four
    assert gini([0, 0, 1, 1]) == pytest.approx(0.5)
    assert effective_channels([0, 0, 1, 1]) == pytest.approx(2.0)
    assert gini([1, 2, 3]) == pytest.approx(2 / 9)  # sum |xi - xj| = 8, / (2 * 9 * 2)


def test_channel_norms_of_a_timm_model_cover_every_stage():
    from mixbench.models import create_model

    torch.manual_seed(0)
    net = create_model("preactresnet18_w16", num_classes=10, image_size=16)
    model = PixelModel(net, (0.5,) * 3, (0.5,) * 3).eval()
    x = torch.rand(6, 3, 16, 16)
    norms = channel_norms(model, x, batch_size=4)
    assert list(norms) == ["stem.conv", "stages.0", "stages.1", "stages.2", "stages.3", "features"]
    assert [len(v) for v in norms.values()] == [16, 16, 32, 64, 128, 128]
    with torch.no_grad():  # the head's input: mean over samples of each channel's L2 norm
        by_hand = model.features(x).flatten(2).norm(dim=2).mean(0)
        stage0 = net.stages[0](net.stem(model.normalise(x))).flatten(2).norm(dim=2).mean(0)
    assert torch.allclose(norms["features"].float(), by_hand, atol=1e-5)
    assert torch.allclose(norms["stages.0"].float(), stage0, atol=1e-5)


# ---------------------------------------------------------------------------
# Calibration


def _two_class_logits(conf):
    return torch.stack([torch.full_like(conf, 0.0), torch.log(1 - conf) - torch.log(conf)], 1)


def test_ece_of_a_perfectly_calibrated_predictor_is_zero():
    # 40 predictions at 75 % confidence of which 30 are right, 20 at 95 % of which 19 are right
    conf = torch.tensor([0.75] * 40 + [0.95] * 20, dtype=torch.float64)
    y = torch.tensor([0] * 30 + [1] * 10 + [0] * 19 + [1], dtype=torch.long)
    m = calibration_metrics(_two_class_logits(conf), y, bins=15)
    assert m["ece"] == pytest.approx(0.0, abs=1e-9)
    nll = (30 * -math.log(0.75) + 10 * -math.log(0.25) + 19 * -math.log(0.95) + -math.log(0.05)) / 60
    assert m["nll"] == pytest.approx(nll)
    assert m["top1"] == pytest.approx(100 * 49 / 60)


def test_ece_of_an_overconfident_predictor():
    conf = torch.full((10,), 0.9, dtype=torch.float64)
    y = torch.tensor([0] * 6 + [1] * 4)
    assert calibration_metrics(_two_class_logits(conf), y)["ece"] == pytest.approx(30.0)


# ---------------------------------------------------------------------------
# Corruptions and deformations


def test_corrupted_images_are_cached(tmp_path):
    # the algorithms themselves: tests/test_corruptions.py
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 16, 16), generator=g, dtype=torch.uint8)
    stack = corrupted_images(images, "gaussian_noise", [1, 3], seed=0, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    assert torch.equal(stack[1], corrupt(images, "gaussian_noise", 3, seed=0))
    assert torch.equal(corrupted_images(images, "gaussian_noise", [1, 3], 0, tmp_path), stack)


def test_a_changed_corruption_definition_is_not_read_from_the_cache(tmp_path, monkeypatch):
    import dataclasses

    from mixbench.evaluations import corruption as suite

    images = torch.randint(0, 256, (4, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    old = corrupted_images(images, "contrast", [3], seed=0, cache_dir=tmp_path)
    changed = dataclasses.replace(suite.CORRUPTIONS["contrast"], params=[0.9] * 5)  # a milder contrast
    monkeypatch.setitem(suite.CORRUPTIONS, "contrast", changed)
    new = corrupted_images(images, "contrast", [3], seed=0, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 2 and not torch.equal(new, old)
    assert torch.equal(new[0], corrupt(images, "contrast", 3, seed=0))


def test_deformations():
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(deform(x, "rotation", 0.0), x, atol=1e-5)
    assert torch.allclose(deform(x, "scale", 1.0), x, atol=1e-5)
    assert torch.allclose(deform(x, "rotation", 90.0)[0], x[0].rot90(1, (1, 2)), atol=1e-5) or \
        torch.allclose(deform(x, "rotation", 90.0)[0], x[0].rot90(-1, (1, 2)), atol=1e-5)
    small, large = deform(x, "elastic", 0.01), deform(x, "elastic", 0.1)
    assert (small - x).abs().mean() < (large - x).abs().mean()
    with pytest.raises(UsageError, match="unknown deformation"):
        deform(x, "shear", 1.0)


# ---------------------------------------------------------------------------
# Loss landscape


def test_filter_normalised_direction():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    net(torch.rand(1, 3, 5, 5))
    params = {n: p.detach() for n, p in net.named_parameters()}
    d = filter_normalised_direction(params, torch.Generator().manual_seed(0))
    for name, p in params.items():
        if p.dim() <= 1:
            assert not d[name].any(), name
        else:
            assert torch.allclose(d[name].flatten(1).norm(dim=1), p.flatten(1).norm(dim=1)), name


def test_landscape_loss_moves_the_weights_without_changing_them():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            return self.fc(x.flatten(1))

    torch.manual_seed(0)
    model = PixelModel(Flat(), [0.5], [0.25]).eval()
    x, y = torch.rand(10, 1, 3, 4), torch.arange(10) % 3
    params = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    d = filter_normalised_direction(params, torch.Generator().manual_seed(1))
    w, b = params["fc.weight"] + 0.3 * d["fc.weight"], params["fc.bias"]  # the bias direction is zero
    by_hand = F.cross_entropy(((x - 0.5) / 0.25).flatten(1) @ w.T + b, y).item()
    assert landscape_loss(model, params, [d], [0.3], x, y, batch_size=4) == pytest.approx(by_hand, rel=1e-5)
    assert torch.equal(model.model.fc.weight, params["fc.weight"])  # the model itself is untouched


# ---------------------------------------------------------------------------
# End to end: a one-epoch synthetic run, then `mixbench evaluate`


def test_run_id_ignores_eval():
    a = RunSpec(method="vanilla", dataset="synthetic")
    assert a.run_id == RunSpec(method="vanilla", dataset="synthetic", eval=["calibration"]).run_id


def test_filter_usage_during_training_interval():
    class Staged(GroupSum):
        feature_info = [{"module": "stage"}]

        def __init__(self):
            super().__init__(2)
            self.stage = nn.Identity()

        def forward_features(self, x):
            return self.stage(x)

    net = Staged()
    loader = [(torch.tensor([[3.0, 1.0, 0.0, 0.0]])[:, :, None, None], None)]
    spec = RunSpec(method="vanilla", dataset="synthetic", epochs=6, filter_usage_every=2)
    recorded = [e for e in range(6) if filter_usage_during_training(net, loader, spec, e)]
    assert recorded == [0, 2, 4, 5]  # every 2 epochs from the first, and the last
    fu = filter_usage_during_training(net, loader, spec, 0)["filter_usage"]
    assert fu["features"]["norms"] == fu["stage"]["norms"] == [3.0, 1.0, 0.0, 0.0]
    assert fu["mean_gini"] == pytest.approx(gini([3, 1, 0, 0]))  # one stage
    assert filter_usage_during_training(net, loader, RunSpec(method="vanilla", dataset="synthetic"), 0) == {}
    with pytest.raises(UsageError, match="filter_usage_every must be an integer >= 0"):
        RunSpec(method="vanilla", dataset="synthetic", filter_usage_every=-1).resolved()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", "--methods", "vanilla", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "128",
                 "--device", "cpu", "--out", str(out), "--no-progress", "--filter-usage-every", "1"]) == 0
    (found,) = list(out.rglob("result.json"))
    return found.parent


def test_filter_usage_recorded_during_training(run_dir):
    (line,) = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fu = line["filter_usage"]
    assert set(fu) >= {"mean_gini", "mean_effective_fraction", "stages.3", "features"}
    assert len(fu["stages.3"]["norms"]) == 128 and 0 <= fu["mean_gini"] < 1


def test_evaluate_cli_merges_into_result_json(run_dir, tmp_path):
    before = json.loads((run_dir / "result.json").read_text())
    assert main(["evaluate", str(run_dir), "--suite", "calibration,feature_removal,adversarial",
                 "--max-samples", "48", "--device", "cpu", "--set", "adversarial.pgd_steps=2"]) == 0
    result = json.loads((run_dir / "result.json").read_text())
    assert {k: result[k] for k in before} == before  # everything else is kept
    ev_ = result["eval"]
    assert set(ev_) == {"calibration", "feature_removal", "adversarial"}
    assert set(ev_["adversarial"]) >= {"clean_top1", "fgsm_top1", "pgd_top1", "eps"}
    assert ev_["adversarial"]["eps"] == pytest.approx(8 / 255) and ev_["adversarial"]["pgd_steps"] == 2
    assert ev_["adversarial"]["pgd_top1"] <= ev_["adversarial"]["clean_top1"]
    assert set(ev_["calibration"]) >= {"ece", "nll"}
    fr = ev_["feature_removal"]
    assert fr["k"][0] == 0 and len(fr["k"]) == len(fr["top1"]) and "auc" in fr
    assert fr["top1"][0] == pytest.approx(ev_["calibration"]["top1"])  # k = 0 is the clean accuracy
    assert result["eval_meta"]["adversarial"]["samples"] == 48
    assert result["eval_meta"]["adversarial"]["git_commit"] == result["git_commit"]  # the code that evaluated
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]

    # a second call adds suites and keeps the earlier ones; `run --eval` on a finished run only evaluates
    out = run_dir.parents[3]
    assert main(["run", "--methods", "vanilla", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "128",
                 "--device", "cpu", "--out", str(out), "--no-progress", "--eval", "filter_usage,calibration"]) == 0
    result2 = json.loads((run_dir / "result.json").read_text())
    assert set(result2["eval"]) == {"calibration", "feature_removal", "adversarial", "filter_usage"}
    assert result2["eval"]["calibration"] == ev_["calibration"]  # present already: not rerun
    fu = result2["eval"]["filter_usage"]
    assert set(fu) == {"mean_gini", "mean_effective_fraction", "stem.conv", "stages.0", "stages.1", "stages.2",
                       "stages.3", "features"}
    stages = ["stem.conv", "stages.0", "stages.1", "stages.2", "stages.3"]  # the head's input is not a stage
    assert fu["mean_gini"] == pytest.approx(sum(fu[k]["gini"] for k in stages) / 5)
    assert set(fu["stages.3"]) == {"channels", "gini", "effective_channels", "norms"}
    assert 1 <= fu["stages.3"]["effective_channels"] <= 128 and 0 <= fu["stages.3"]["gini"] < 1


@pytest.mark.slow
def test_evaluate_all_suites_small(run_dir, tmp_path):
    assert main(["evaluate", str(run_dir.parent), "--max-samples", "16", "--device", "cpu",
                 "--cache-dir", str(tmp_path), "--set", "corruption.corruptions=[contrast,jpeg_compression]",
                 "--set", "corruption.severities=[1,5]", "--set", "loss_landscape.points=3",
                 "--set", "loss_landscape.directions=1"]) == 0
    result = json.loads((run_dir / "result.json").read_text())
    assert set(result["eval"]) == set(ev.SUITES)
    assert set(result["eval"]["corruption"]) == {"clean_top1", "mean_top1", "contrast", "jpeg_compression"}
    assert result["eval"]["corruption"]["contrast"]["severity"] == [1, 5]
    assert set(result["eval"]["deformation"]) >= {"rotation", "scale", "elastic", "mean_top1"}
    ll = result["eval"]["loss_landscape"]
    assert len(ll["alpha"]) == len(ll["loss"]) == 3 and math.isfinite(ll["sharpness"])
    assert ll["loss"][1] == pytest.approx(ll["loss0"])  # alpha 0 is the trained weights


@pytest.mark.parametrize("argv, message", [
    (["--suite", "robustness"], "unknown evaluation suite 'robustness'; choose from: all, adversarial"),
    (["--set", "adversarial.epsilon=1"], "unknown option 'epsilon' for adversarial; valid: eps"),
    (["--set", "adversarial"], "expected SUITE.KEY=VALUE"),
    (["--suite", "calibration", "--set", "adversarial.eps=0.1"], "not among --suite"),
    (["--set", "adversarial.eps=big"], "adversarial.eps=big': expected a value like 0.031"),
    (["--set", "adversarial.pgd_steps=2.5"], "expected a value like 10"),
    (["--set", "corruption.corruptions=[haze]"], "unknown corruption 'haze'; choose from: gaussian_noise"),
    (["--set", "corruption.severities=[0]"], "severity must be in 1..5"),
    (["--set", "loss_landscape.split=val"], "split must be train or test"),
])
def test_evaluate_bad_input(run_dir, capsys, argv, message):
    before = (run_dir / "result.json").read_bytes()
    assert main(["evaluate", str(run_dir), *argv]) == 2
    assert message in capsys.readouterr().err
    assert (run_dir / "result.json").read_bytes() == before


def test_evaluate_skips_unfinished_runs_below_a_folder(run_dir, tmp_path, capsys):
    failed = tmp_path / "x" / "seed0-failed"
    failed.mkdir(parents=True)
    (failed / "result.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(UsageError, match="no finished runs"):
        ev.finished_run_dirs([tmp_path])
    assert "skipping" in capsys.readouterr().err
    assert main(["evaluate", str(failed)]) == 2
    assert "is not a finished run" in capsys.readouterr().err


def test_evaluate_missing_path(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err
