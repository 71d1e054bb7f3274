"""The suites' declarations (options, checks, headline numbers) and the report reading them."""
import dataclasses

import pytest

from mixbench import UsageError
from mixbench.evaluate import check_options
from mixbench.evaluations import SUITES, Headline, headline
from mixbench.evaluations.corruption_ops import STANDARD_CORRUPTIONS
from mixbench.frame import load_runs
from mixbench.report import build_table

from test_report import make_run


def test_every_built_in_suite_declares_its_headlines():
    assert list(SUITES) == ["adversarial", "corruption", "deformation", "feature_removal", "filter_usage",
                            "calibration", "loss_landscape"]
    declared = {name: [(h.key, h.lower_is_better) for h in s.headlines] for name, s in SUITES.items()}
    assert declared == {
        "adversarial": [("fgsm_top1", False), ("pgd_top1", False)], "corruption": [("mean_top1", False)],
        "deformation": [("mean_top1", False)], "feature_removal": [("auc", False)],
        "filter_usage": [("mean_gini", True), ("mean_effective_fraction", False)],
        "calibration": [("ece", True), ("nll", True)], "loss_landscape": [("sharpness", True)],
    }
    assert headline("calibration.ece").label == "calibration.ece" and headline("calibration.ece").better == "min"
    assert headline("filter_usage.mean_gini").decimals == 3
    assert headline("adversarial.clean_top1") is None  # a number of the result, not a headline
    assert headline("corruption.fog.mean_top1") is None


def test_options_and_their_checks_come_from_the_suites():
    assert SUITES["corruption"].options() == {"corruptions": tuple(STANDARD_CORRUPTIONS), "severities": (1, 2, 3, 4, 5)}
    assert SUITES["calibration"].options() == {"bins": 15}
    assert SUITES["filter_usage"].options() == {}
    with pytest.raises(UsageError, match="bins must be a positive integer"):
        check_options("calibration", {"bins": 0})
    with pytest.raises(UsageError, match="unknown evaluation suite 'robustness'"):
        check_options("robustness", {})
    assert SUITES["adversarial"].summary({"clean_top1": 90.0, "fgsm_top1": 50.0, "pgd_top1": 40.0}) == \
        "fgsm_top1=50 pgd_top1=40"


def test_undeclared_suites_show_their_top_level_numbers():
    assert headline("my_suite.score") == Headline("score", False, "my_suite.score")
    assert headline("my_suite.val_loss").lower_is_better
    assert headline("my_suite.nested.x") is None


def test_report_columns_come_from_the_declarations(tmp_path, monkeypatch):
    for seed, (ece, auc) in enumerate([(5.0, 90.0), (7.0, 80.0)]):
        make_run(tmp_path, "vanilla", seed, 90.0, eval_={"calibration": {"ece": ece, "nll": 0.3, "top1": 90.0},
                                                         "feature_removal": {"auc": auc, "channels": 8}})
    titles = lambda: [c.title for c in build_table(load_runs([tmp_path])).columns if c.quantity.startswith("eval.")]  # noqa: E731
    assert titles() == ["calibration.ece ↓", "calibration.nll ↓", "feature_removal.auc ↑"]
    # declare other headlines: the table follows
    cal = SUITES["calibration"]
    monkeypatch.setattr(cal, "headlines", [Headline("top1", label="clean top-1 (%)", decimals=1)])
    monkeypatch.setattr(SUITES["feature_removal"], "headlines",
                        [dataclasses.replace(SUITES["feature_removal"].headlines[0], lower_is_better=True)])
    table = build_table(load_runs([tmp_path]))
    cols = [c for c in table.columns if c.quantity.startswith("eval.")]
    assert [c.title for c in cols] == ["clean top-1 (%) ↑", "feature_removal.auc ↓"]
    assert [c.decimals for c in cols] == [1, 2] and cols[1].better == "min"
