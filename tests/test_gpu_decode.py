"""The streaming loader's decode="gpu" path, run on the CPU (decode_jpeg on the CPU: the same code path).

It must give the PIL path's batches: the same shapes, labels and order, the same crop boxes and
flips (the same seeded draws), pixels within a small tolerance (decoders and resize kernels differ),
the same resume state; files decode_jpeg does not take (PNG, CMYK JPEG) fall back to PIL.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from mixbench import UsageError
from mixbench.cli import main
from mixbench.data import StreamLoader, imagefolder_files, jpeg, make_loaders
from mixbench.data.loaders import _StreamImages
from mixbench.spec import RunSpec

SIZES = [(60, 80), (75, 50), (64, 64), (90, 70)]  # (height, width): portrait, landscape, square
# Pixel agreement of the two paths, in 0..255 units. On this tree the CPU decode_jpeg (libjpeg-turbo, as
# PIL's) measured a mean absolute difference of 0.007 and a maximum of 1 (the resize kernels' rounding).
MEAN_TOL = 3.0


def _photo(h, w, rng):
    """A smooth random image (compresses like a photograph) over a left-right ramp (so a wrong flip shows)."""
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), dtype=np.float32)
    return (0.6 * smooth + 0.4 * np.linspace(0, 255, w)[None, :, None]).astype(np.uint8)


def write_tree(root: Path, per_split=(12, 6), classes=3, extra=True) -> Path:
    """An ImageNet-layout tree of small JPEGs (root/train/<wnid>/*.JPEG, root/val/<wnid>/*.JPEG); with
    ``extra`` a PNG, a greyscale JPEG and a CMYK JPEG in train."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_split):
        for k in range(n):
            h, w = SIZES[k % len(SIZES)]
            path = root / split / f"n{k % classes:08d}" / f"{split}_{k}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_photo(h, w, rng)).save(path, "JPEG", quality=90)
    if extra:
        Image.fromarray(_photo(50, 66, rng)).save(root / "train" / "n00000000" / "a.png")
        Image.fromarray(_photo(66, 50, rng)).convert("L").save(root / "train" / "n00000001" / "grey.JPEG", "JPEG")
        Image.fromarray(_photo(56, 72, rng)).convert("CMYK").save(root / "train" / "n00000002" / "cmyk.jpg", "JPEG")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("imagenet"))


def _loader(samples, train=True, **kw):
    # mean 0, std 1/255: the normalised batches are the uint8 pixels as floats
    options = dict(image_size=32, batch_size=5, mean=(0.0,) * 3, std=(1 / 255,) * 3, device="cpu", train=train,
                   seed=3, num_workers=0)
    return StreamLoader(samples, **{**options, **kw})


def _epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("train", [True, False])
def test_gpu_path_gives_the_pil_paths_batches(tree, train):
    samples = imagefolder_files(tree)[0 if train else 1]
    cpu, gpu = _epoch(_loader(samples, train)), _epoch(_loader(samples, train, decode="gpu"))
    assert len(cpu) == len(gpu) == (len(samples) // 5 if train else -(-len(samples) // 5))
    for (x1, y1), (x2, y2) in zip(cpu, gpu):
        assert x1.shape == x2.shape and x1.dtype == x2.dtype == torch.float32 and x2.shape[1:] == (3, 32, 32)
        assert torch.equal(y1, y2)  # the same labels in the same order
    x1, x2 = torch.cat([x for x, _ in cpu]), torch.cat([x for x, _ in gpu])
    diff = (x1 - x2).abs().mean(dim=(1, 2, 3))
    assert diff.max() < MEAN_TOL, diff
    if train:  # every image's flip agrees: the other orientation is far off (the ramp)
        assert ((x1 - x2.flip(-1)).abs().mean(dim=(1, 2, 3)) > 10 * MEAN_TOL).all()


def test_crop_boxes_and_flips_are_the_pil_paths_draws(tree, monkeypatch):
    samples = imagefolder_files(tree)[0]
    cpu = _StreamImages(samples, 32, train=True, flip=True)
    gpu = _StreamImages(samples, 32, train=True, flip=True, decode="gpu")
    drawn = []
    get_params = T.RandomResizedCrop.get_params
    hflip = T.functional.hflip
    monkeypatch.setattr(T.RandomResizedCrop, "get_params",
                        staticmethod(lambda *a: drawn.append(("box", get_params(*a))) or drawn[-1][1]))
    monkeypatch.setattr(T.functional, "hflip", lambda img: drawn.append(("flip",)) or hflip(img))
    flips = 0
    for epoch_seed in (0, 12345, 2**61 + 7):
        cpu.epoch_seed = gpu.epoch_seed = epoch_seed
        for i in range(len(samples)):
            item, label = gpu[i]
            if not isinstance(item, jpeg.Encoded):
                continue  # PIL in the worker: the same transform as the CPU path
            drawn.clear()
            _, cpu_label = cpu[i]
            assert label == cpu_label and drawn[0] == ("box", item.box)
            assert (("flip",) in drawn) == item.flip
            flips += item.flip
    assert 0 < flips < 3 * (len(samples) - 2)  # both outcomes occur


def test_png_and_cmyk_fall_back_to_pil_in_the_worker(tree):
    samples = imagefolder_files(tree)[0]
    cpu = _StreamImages(samples, 32, train=True, flip=True)
    gpu = _StreamImages(samples, 32, train=True, flip=True, decode="gpu")
    cpu.epoch_seed = gpu.epoch_seed = 99
    kinds = {}
    for i, (path, _) in enumerate(samples):
        item, _ = gpu[i]
        kinds[Path(path).name] = type(item).__name__
        if not isinstance(item, jpeg.Encoded):  # decoded here exactly as the CPU path does
            assert torch.equal(item, cpu[i][0])
    assert kinds["a.png"] == kinds["cmyk.jpg"] == "Tensor"
    assert kinds["grey.JPEG"] == kinds["train_0.JPEG"] == "Encoded"
    batch = jpeg.collate([gpu[i] for i in range(len(samples))])
    assert len(batch.decoded_at) == 2 and len(batch.encoded_at) == len(samples) - 2


def test_resume_and_workers_are_the_pil_paths(tree):
    samples = imagefolder_files(tree)[0]
    a = _loader(samples, decode="gpu")
    first, state, second = _epoch(a), a.state_dict(), _epoch(a)
    b = _loader(samples, decode="gpu", num_workers=2)  # the items cross process boundaries
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, _epoch(b)))
    c = _loader(samples, decode="gpu", seed=99)
    c.load_state_dict(state)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(second, _epoch(c)))
    pil = _loader(samples)  # the PIL path's state after one epoch is the same state
    _epoch(pil)
    assert torch.equal(pil.state_dict()["generator"], state["generator"])
    assert not torch.equal(first[0][0], second[0][0])


def test_a_failed_batched_decode_retries_each_image_then_pil(tree, monkeypatch):
    import torchvision.io

    samples = imagefolder_files(tree)[0][:5]
    gpu = _StreamImages(samples, 32, train=True, flip=True, decode="gpu")
    batch = jpeg.collate([gpu[i] for i in range(5)])
    want = jpeg.assemble(batch, 32, True, torch.device("cpu"))
    decode = torchvision.io.decode_jpeg
    bad = batch.data[1]

    def flaky(data, **kw):  # no batches, and never the second image
        if len(data) > 1 or data[0] is bad:
            raise RuntimeError("nvjpeg: unsupported")
        return decode(data, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", flaky)
    got = jpeg.assemble(batch, 32, True, torch.device("cpu"))
    assert got.dtype == torch.uint8 and got.shape == want.shape
    assert torch.equal(got[[0, 2, 3, 4]], want[[0, 2, 3, 4]])
    assert (got[1].float() - want[1].float()).abs().mean() < MEAN_TOL


# -- the run option -------------------------------------------------------------------------------


def test_decode_enters_the_run_id_only_when_gpu():
    # ids computed before the option existed: they must not move
    assert RunSpec.from_dict(dict(method="vanilla", dataset="digits")).resolved().run_id == "7d511f79"
    stream = dict(method="cutmix", dataset="tiny-imagenet", data_mode="stream")
    assert RunSpec.from_dict(stream).resolved().run_id == "7a2d9ba9"
    assert RunSpec.from_dict({**stream, "decode": "cpu"}).resolved().run_id == "7a2d9ba9"
    assert RunSpec.from_dict({**stream, "decode": "gpu"}).resolved().run_id != "7a2d9ba9"
    with pytest.raises(UsageError, match="unknown decode 'nvjpeg'; choose from: cpu, gpu"):
        RunSpec.from_dict({**stream, "decode": "nvjpeg"}).resolved()


def _spec(tree, **kw):
    options = dict(method="vanilla", dataset=f"imagefolder:{tree}", device="cpu", epochs=1, batch_size=4,
                   image_size=24, data_mode="stream", decode="gpu", model="preactresnet18_w16", lr=0.05,
                   model_kwargs=dict(channels=[8, 8, 16, 16], stem_chs=8, layers=[1, 1, 1, 1]))
    return RunSpec.from_dict({**options, **kw}).resolved()


def test_make_loaders_refuses_gpu_decode_without_cuda_or_in_memory(tree):
    train, test = make_loaders(_spec(tree), torch.device("cpu"), num_workers=0)
    assert train.decode == test.decode == "gpu" and train.mode == "stream"
    with pytest.raises(UsageError, match="decode 'gpu' applies to streamed image files"):
        make_loaders(_spec(tree, data_mode="memory"), torch.device("cpu"))
    with pytest.raises(UsageError, match="decode 'gpu' needs a CUDA device"):
        make_loaders(_spec(tree, device="auto"), torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cli_refuses_gpu_decode_without_cuda_in_one_line(tree, tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["run", "--out", str(out), "--no-progress", "--methods", "vanilla", "--dataset",
                 f"imagefolder:{tree}", "--decode", "gpu", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--decode gpu needs a CUDA device" in err and err.count("\n") == 1, err
    assert not out.exists()


def test_one_epoch_cli_run_with_gpu_decode(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXBENCH_WORKERS", "1")
    out = tmp_path / "runs"
    code = main(["run", "--out", str(out), "--no-progress", "--methods", "mixup", "--dataset", f"imagefolder:{tree}",
                 "--decode", "gpu", "--device", "cpu", "--data-mode", "stream", "--image-size", "24", "--epochs", "1",
                 "--batch-size", "5", "--model", "preactresnet18_w16"])
    assert code == 0
    (result,) = [json.loads(p.read_text()) for p in out.rglob("result.json")]
    assert result["status"] == "complete" and result["spec"]["decode"] == "gpu"
    assert np.isfinite(result["final_test_loss"])
