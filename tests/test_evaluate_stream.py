"""`mixbench evaluate` on an image-file data set that the run streamed: the suites read the test set a
batch at a time through the streaming loader, never the whole set decoded into memory."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mixbench import data
from mixbench.cli import main

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def write_folder(root, per_class=4, val_per_class=3, size=40):
    rng = np.random.default_rng(0)
    for c, colour in enumerate(COLOURS):
        for split, n in (("train", per_class), ("val", val_per_class)):
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                path = root / split / f"class{c}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)
    return root


@pytest.fixture(scope="module")
def stream_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MIXBENCH_WORKERS", "0")
    base = tmp_path_factory.mktemp("stream")
    root = write_folder(base / "pets")
    assert main(["run", "--methods", "vanilla", "--dataset", f"imagefolder:{root}", "--model", "preactresnet18_w16",
                 "--image-size", "32", "--data-mode", "stream", "--epochs", "1", "--batch-size", "4",
                 "--device", "cpu", "--out", str(base / "runs"), "--no-progress"]) == 0
    (found,) = list((base / "runs").rglob("result.json"))
    yield found.parent
    mp.undo()


@pytest.mark.slow
def test_evaluate_streams_the_test_set(stream_run, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXBENCH_WORKERS", "0")

    def whole_set(*args, **kwargs):
        raise AssertionError("the evaluation decoded the whole data set into memory")

    monkeypatch.setattr(data, "decode_images", whole_set)
    monkeypatch.setattr(data, "load_dataset", whole_set)
    from mixbench import evaluate as ev

    seen = []
    original = ev.image_sets

    def spy(*args, **kwargs):
        sets = original(*args, **kwargs)
        seen.extend(s.in_memory for s in sets)
        return sets

    monkeypatch.setattr(ev, "image_sets", spy)
    assert main(["evaluate", str(stream_run), "--suite", "calibration,corruption,feature_removal,loss_landscape",
                 "--device", "cpu", "--batch-size", "4", "--cache-dir", str(tmp_path),
                 "--set", "corruption.corruptions=[gaussian_noise,snow]", "--set", "corruption.severities=[1,5]",
                 "--set", "loss_landscape.points=3", "--set", "loss_landscape.directions=1"]) == 0
    assert seen == [False, False]  # test and train splits both stream
    result = json.loads((stream_run / "result.json").read_text())
    ev_ = result["eval"]
    # the same test images, resized and centre-cropped as the run's own test pass saw them
    assert ev_["calibration"]["top1"] == pytest.approx(result["final_top1"])
    assert result["eval_meta"]["calibration"]["samples"] == 9
    assert ev_["corruption"]["clean_top1"] == pytest.approx(result["final_top1"])
    assert set(ev_["corruption"]) == {"clean_top1", "mean_top1", "gaussian_noise", "snow"}
    assert ev_["feature_removal"]["top1"][0] == pytest.approx(result["final_top1"])
    assert np.isfinite(ev_["loss_landscape"]["sharpness"])
    assert not list(tmp_path.glob("*.pt"))  # streamed corruptions are not cached


def test_streamed_batches_give_back_the_exact_pixels():
    from mixbench.evaluations import ImageSet

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(10)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    m, s = torch.tensor(mean).view(1, 3, 1, 1) * 255, torch.tensor(std).view(1, 3, 1, 1) * 255
    loader = [((images[i:i + 4].float() - m) / s, labels[i:i + 4]) for i in range(0, 10, 4)]  # as the loaders give
    streamed = ImageSet(labels, torch.device("cpu"), loader=loader, mean=mean, std=std)
    held = ImageSet(labels, torch.device("cpu"), images=images)
    got = torch.cat([x for x, _ in streamed.batches(4)])
    assert torch.equal(got, torch.cat([x for x, _ in held.batches(4)]))
    assert not streamed.in_memory and len(streamed) == 10
    with pytest.raises(Exception, match="streaming"):
        streamed.tensors()
