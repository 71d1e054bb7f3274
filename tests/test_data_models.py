"""Data loading (digits, CIFAR on-disk format), on-device augmentation, models with a CIFAR stem."""
import hashlib
import pickle

import numpy as np
import pytest
import torch
import torchvision

from mixbench import UsageError
from mixbench.data import DeviceLoader, load_dataset, random_crop, random_hflip
from mixbench.models import create_model


def test_digits_split_is_fixed_stratified_and_uint8():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.train_x.dtype == torch.uint8 and a.train_x.shape[1:] == (3, 16, 16)
    assert len(a.train_y) + len(a.test_y) == 1797
    assert torch.equal(a.test_y, b.test_y) and torch.equal(a.train_x, b.train_x)
    train_freq = torch.bincount(a.train_y) / len(a.train_y)
    test_freq = torch.bincount(a.test_y) / len(a.test_y)
    assert (train_freq - test_freq).abs().max() < 0.01


def _write_cifar100(root, n_train=20, n_test=10):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 100, size=n)]
        arrays[split] = (data, labels)
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * n,
                         "filenames": [f"{i}.png" for i in range(n)], "batch_label": split}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": ["x"] * 20}, f)
    return arrays


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar100_reads_torchvision_on_disk_format(tmp_path, monkeypatch):
    arrays = _write_cifar100(tmp_path)
    folder = tmp_path / "cifar-100-python"
    cls = torchvision.datasets.CIFAR100
    # The real integrity check runs against the checksums of the files this test wrote.
    monkeypatch.setattr(cls, "train_list", [["train", _md5(folder / "train")]])
    monkeypatch.setattr(cls, "test_list", [["test", _md5(folder / "test")]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / "meta")})
    ds = load_dataset("cifar100", data_dir=tmp_path)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (10, 3, 32, 32)
    data, labels = arrays["train"]
    # channel-major rows: the first 1024 values are the red plane
    assert torch.equal(ds.train_x[3, 0].flatten(), torch.from_numpy(data[3, :1024]))
    assert torch.equal(ds.train_x[3, 2].flatten(), torch.from_numpy(data[3, 2048:]))
    assert ds.train_y.tolist() == labels and ds.info.num_classes == 100


def test_cifar_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match=r"cifar-10-batches-py.*--download"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4) + 1
    g = torch.Generator().manual_seed(0)
    out = random_crop(x, 1, g)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):
        windows = [padded[i, :, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_hflip_flips_about_half_and_nothing_else():
    x = torch.arange(1000 * 1 * 1 * 2, dtype=torch.float32).view(1000, 1, 1, 2)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == x[:, 0, 0, 1])
    assert torch.equal(out[~flipped], x[~flipped]) and torch.equal(out[flipped], x[flipped].flip(-1))
    assert 400 < flipped.sum() < 600


def test_device_loader_normalises_and_is_seeded():
    x = torch.full((10, 3, 4, 4), 255, dtype=torch.uint8)
    y = torch.arange(10)
    kw = dict(batch_size=4, mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu", train=True, seed=3)
    batches = list(DeviceLoader(x, y, **kw))
    assert len(batches) == 2  # the incomplete last batch is dropped when training
    torch.testing.assert_close(batches[0][0], torch.full((4, 3, 4, 4), 2.0))
    again = list(DeviceLoader(x, y, **kw))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    test = DeviceLoader(x, y, **{**kw, "train": False})
    assert [len(b[1]) for b in test] == [4, 4, 2] and test.num_samples == 10



def test_device_loader_shards_are_the_global_batch_and_resume_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (26, 3, 6, 6), dtype=torch.uint8, generator=g)
    y = torch.arange(26)
    kw = dict(batch_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu", train=True, seed=7,
              crop_padding=2, flip=True)
    whole = DeviceLoader(x, y, **kw)
    ranks = [DeviceLoader(x, y, **kw) for _ in range(2)]
    for rank, loader in enumerate(ranks):
        loader.shard(rank, 2)
    for epoch in range(2):  # the crops and flips of each global batch, split between the ranks
        for (gx, gy), (ax, ay), (bx, by) in zip(whole, *ranks):
            assert torch.equal(torch.cat([ax, bx]), gx) and torch.equal(torch.cat([ay, by]), gy)
        assert all(torch.equal(whole.state_dict()["generator"], r.state_dict()["generator"]) for r in ranks)
    assert set(whole.state_dict()) == {"generator"} and ranks[1].num_samples == whole.num_samples == 24
    with pytest.raises(UsageError, match="divisible"):
        DeviceLoader(x, y, **kw).shard(0, 3)
    resumed = DeviceLoader(x, y, **{**kw, "seed": 0})
    resumed.load_state_dict(whole.state_dict())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole, resumed))
    test = DeviceLoader(x, y, **{**kw, "train": False, "batch_size": 4})
    parts = [test.eval_shard(rank, 3) for rank in range(3)]
    assert torch.equal(torch.cat([b[1] for p in parts for b in p]), y) and sum(p.num_samples for p in parts) == 26
    assert test.num_samples == 26  # the shards are copies

@pytest.mark.parametrize("name, kwargs, first", [
    ("resnet18", {}, "conv1"),
    ("preactresnet18", {}, "stem.conv"),
    ("regnetx_002", {}, "stem.conv"),
])
def test_cifar_stem_keeps_full_resolution(name, kwargs, first):
    model = create_model(name, num_classes=7, image_size=32, **kwargs)
    conv = model.get_submodule(first)
    assert conv.stride == (1, 1) and conv.kernel_size == (3, 3)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    feats = {}
    stage = model.feature_info[1]["module"]
    model.get_submodule(stage).register_forward_hook(lambda m, i, o: feats.setdefault("s", o))
    out = model.eval()(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert feats["s"].shape[-1] == 32 // model.feature_info[1]["reduction"]


def test_large_inputs_keep_the_imagenet_stem():
    model = create_model("resnet18", num_classes=3, image_size=224)
    assert model.conv1.stride == (2, 2) and isinstance(model.maxpool, torch.nn.MaxPool2d)


def test_unknown_model_suggests_close_names():
    with pytest.raises(UsageError, match="unknown model 'resnet19'.*did you mean.*resnet18"):
        create_model("resnet19", num_classes=3)


def test_a_data_set_is_read_once_for_the_run_and_its_evaluation():
    from types import SimpleNamespace

    from mixbench.data import get_data, make_loaders

    spec = SimpleNamespace(dataset="digits", data_dir=None, download=False, data_mode="auto", train_subset=None,
                           image_size=None, seed=0, batch_size=64)
    data = get_data(spec)
    train, test = make_loaders(spec, torch.device("cpu"))
    assert get_data(spec) is data and test.images is data.test_x and train.images is data.train_x
    bigger, _ = make_loaders(SimpleNamespace(**{**vars(spec), "image_size": 20}), torch.device("cpu"))
    assert bigger.images.shape[-1] == 20 and bigger.info.crop_padding == 2 and get_data(spec) is data
