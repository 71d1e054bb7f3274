"""Image-file and IDX data sets in their real on-disk layouts, streaming, train subsets, one training step each."""
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mixbench.data as data
from mixbench import UsageError
from mixbench.data import (
    dataset_slug,
    fashion_mnist,
    get_dataset_info,
    load_dataset,
    make_loaders,
    normalise_dataset_name,
    read_idx,
    stratified_subset,
)
from mixbench.methods import list_methods
from mixbench.spec import RunSpec
from mixbench.train import train_run

# Distinct colours per class, so that labels can be checked through pixels.
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


@pytest.fixture(autouse=True)
def _small_and_serial(monkeypatch):
    monkeypatch.setenv("MIXBENCH_WORKERS", "0")  # the streaming tests that need workers ask for them
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation (slow on a busy machine)
    yield
    torch.set_num_threads(threads)


def _jpeg(path, colour, size=(64, 64), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None] + rng.integers(-10, 11, (size[1], size[0], 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)


def write_tiny_imagenet(root, n_classes=3, per_class=4, val_per_class=2):
    base = root / "tiny-imagenet-200"
    wnids = [f"n0{i}44" for i in range(n_classes)][::-1]  # not sorted in the file
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    (base / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in wnids))
    for w in wnids:
        c = sorted(wnids).index(w)
        for i in range(per_class):
            _jpeg(base / "train" / w / "images" / f"{w}_{i}.JPEG", COLOURS[c], seed=i)
        boxes = "".join(f"{w}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(per_class))
        (base / "train" / w / f"{w}_boxes.txt").write_text(boxes)
    lines, k = [], 0
    for w in wnids:
        for _ in range(val_per_class):
            _jpeg(base / "val" / "images" / f"val_{k}.JPEG", COLOURS[sorted(wnids).index(w)], seed=100 + k)
            lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63\n")
            k += 1
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    _jpeg(base / "test" / "images" / "test_0.JPEG", (0, 0, 0))  # unlabelled, ignored
    return base, sorted(wnids)


def write_cub(root, n_classes=3, per_class=4):
    base = root / "CUB_200_2011"
    images, labels, split, classes = [], [], [], []
    k = 0
    for c in range(n_classes):
        folder = f"{c + 1:03d}.Bird_{c}"
        classes.append(f"{c + 1} {folder}\n")
        for i in range(per_class):
            k += 1
            rel = f"{folder}/Bird_{c}_{i:04d}.jpg"
            _jpeg(base / "images" / rel, COLOURS[c], size=(80, 60), seed=k)  # not square, like the real photos
            images.append(f"{k} {rel}\n")
            labels.append(f"{k} {c + 1}\n")
            split.append(f"{k} {int(i < per_class - 1)}\n")  # the last image of each class is a test image
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split), ("classes.txt", classes)):
        (base / name).write_text("".join(lines))
    return base


def write_imagefolder(root, classes=("cat", "dog", "emu"), per_class=4, val_per_class=2, size=(40, 48)):
    for c, name in enumerate(classes):
        for i in range(per_class):
            _jpeg(root / "train" / name / f"{i}.jpg", COLOURS[c], size=size, seed=i)
        for i in range(val_per_class):
            _jpeg(root / "val" / name / "sub" / f"{i}.jpeg", COLOURS[c], size=size, seed=50 + i)
    (root / "train" / classes[0] / "notes.txt").write_text("not an image")
    return root


def write_idx(path, array, gz=True):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    blob = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)


def write_fashion(folder, n_train=40, n_test=20, gz=True):
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28)), "train_y": np.arange(n_train) % 10,
        "test_x": rng.integers(0, 256, (n_test, 28, 28)), "test_y": np.arange(n_test) % 10,
    }
    for key, stem in data.FASHION_FILES.items():
        write_idx(folder / stem, arrays[key], gz=gz)
    return arrays


def spec(dataset, tmp_path, **kw):
    options = dict(method="vanilla", dataset=dataset, data_dir=str(tmp_path), device="cpu", epochs=1, batch_size=4,
                   model="preactresnet18_w16", lr=0.05, weight_decay=5e-4,
                   model_kwargs=dict(channels=[8, 8, 16, 16], stem_chs=8, layers=[1, 1, 1, 1]))  # a tiny net
    return RunSpec.from_dict({**options, **kw}).resolved()


def train_one(s, tmp_path):
    result = train_run(s, tmp_path / "run", progress=False)
    assert result["status"] == "complete" and np.isfinite(result["final_test_loss"])
    on_disk = json.loads((tmp_path / "run" / "result.json").read_text())
    assert on_disk["train_subset"] == s.train_subset and on_disk["spec"]["data_mode"] == s.data_mode
    return result


# -- Fashion-MNIST (IDX) ---------------------------------------------------------


def test_read_idx_parses_the_header_gz_or_not(tmp_path):
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / "a", a, gz=True)
    write_idx(tmp_path / "b", a, gz=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a) and np.array_equal(read_idx(tmp_path / "b"), a)
    write_idx(tmp_path / "labels", np.array([3, 1, 4]), gz=False)
    assert read_idx(tmp_path / "labels").tolist() == [3, 1, 4]


def test_read_idx_rejects_malformed_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x08\x03\x00\x00" + b"\x00" * 8)
    with pytest.raises(UsageError, match="bad.*not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((2, 4, 4)), gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-5])
    with pytest.raises(UsageError, match=r"short: IDX sizes \(2, 4, 4\) need 32 data bytes, the file has 27"):
        read_idx(tmp_path / "short")
    (tmp_path / "notgz.gz").write_bytes(b"plain")
    with pytest.raises(UsageError, match="cannot read the IDX file .*notgz.gz"):
        read_idx(tmp_path / "notgz.gz")


@pytest.mark.parametrize("layout", ["direct-gz", "torchvision-raw"])
def test_fashion_mnist_reads_idx_files_from_data_dir(tmp_path, layout):
    folder = tmp_path if layout == "direct-gz" else tmp_path / "FashionMNIST" / "raw"
    arrays = write_fashion(folder, gz=layout == "direct-gz")
    ds = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert ds.train_x.shape == (40, 1, 28, 28) and ds.test_x.shape == (20, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8 and ds.info.in_chans == 1 and ds.info.num_classes == 10
    assert torch.equal(ds.train_x[7, 0], torch.from_numpy(arrays["train_x"][7].astype(np.uint8)))
    assert ds.test_y.tolist() == arrays["test_y"].tolist()
    assert ds.info.flip is False and ds.info.crop_padding == 2


def test_fashion_mnist_errors_name_the_missing_files(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(UsageError, match=r"train-images-idx3-ubyte\.gz.*dataset-fashion-mnist.*--download"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28)))
    with pytest.raises(UsageError, match=r"some of the IDX files but not train-labels-idx1-ubyte\[\.gz\]"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_fashion_mnist_downloads_through_torchvision_only_when_asked(tmp_path, monkeypatch):
    import torchvision

    calls = []

    class FakeFashionMNIST:  # stands in for the network: writes the files torchvision would
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write_fashion(Path(root) / "FashionMNIST" / "raw", gz=False)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(UsageError, match="Fashion-MNIST not found"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert calls == []
    ds = load_dataset("fashion-mnist", data_dir=tmp_path, download=True)
    assert calls and all(download for _, _, download in calls) and ds.train_x.shape == (40, 1, 28, 28)


def test_fashion_mnist_debian_files(tmp_path):
    if data.find_fashion_mnist(tmp_path) != data.DEBIAN_FASHION_MNIST:
        print(f"{data.DEBIAN_FASHION_MNIST} is absent (apt-get install dataset-fashion-mnist)")
        pytest.skip(f"Debian's Fashion-MNIST files are not installed at {data.DEBIAN_FASHION_MNIST}")
    ds = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10 and torch.bincount(ds.test_y).tolist() == [1000] * 10
    assert ds.train_y[:4].tolist() == [9, 0, 0, 3]  # ankle boot, T-shirt, T-shirt, dress
    assert abs(ds.train_x.float().mean().item() / 255 - ds.info.mean[0]) < 1e-3
    assert abs(ds.train_x.float().std().item() / 255 - ds.info.std[0]) < 1e-3


def test_fashion_mnist_trains_one_epoch_on_a_subset(tmp_path):
    write_fashion(tmp_path)
    s = spec("fashion-mnist", tmp_path, train_subset=20, image_size=16)
    train_loader, _ = make_loaders(s, torch.device("cpu"))
    assert train_loader.mode == "memory" and torch.bincount(train_loader.labels).tolist() == [2] * 10
    x, _ = next(iter(train_loader))
    assert x.shape == (4, 1, 16, 16) and x.dtype == torch.float32
    train_one(s, tmp_path)


@pytest.mark.parametrize("method", list_methods())
def test_every_method_takes_one_channel_input(tmp_path, method):
    write_fashion(tmp_path)
    params = {}
    if method == "attentivemix":  # its pretrained extractor is a parameter: a tiny one written here
        from test_attentivemix import write_extractor

        params = write_extractor(tmp_path)
    s = spec("fashion-mnist", tmp_path, method=method, train_subset=8, image_size=16, method_params=params)
    assert train_one(s, tmp_path)["dataset"] == "fashion-mnist"


# -- Tiny-ImageNet ------------------------------------------------------------------


def test_tiny_imagenet_layout_in_memory(tmp_path):
    base, wnids = write_tiny_imagenet(tmp_path)
    train, test = data.tiny_imagenet_files(tmp_path)  # the parent of tiny-imagenet-200 works ...
    assert data.tiny_imagenet_files(base) == (train, test)  # ... and so does the folder itself
    assert len(train) == 12 and len(test) == 6
    assert [label for _, label in train] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(f"/train/{wnids[label]}/images/" in path for path, label in train)
    s = spec("tiny-imagenet", tmp_path)
    train_loader, test_loader = make_loaders(s, torch.device("cpu"))
    assert train_loader.mode == "memory" and train_loader.images.shape == (12, 3, 64, 64)
    assert train_loader.info.num_classes == 200 and train_loader.info.crop_padding == 4 and train_loader.info.flip
    # colours survive decoding: the mean pixel of each test image is its class colour
    means = test_loader.images.float().mean(dim=(2, 3))
    expected = torch.tensor([COLOURS[y] for y in test_loader.labels.tolist()], dtype=torch.float32)
    assert (means - expected).abs().max() < 6
    train_one(spec("tiny-imagenet", tmp_path, image_size=32), tmp_path)


def test_tiny_imagenet_errors_name_the_expected_file(tmp_path):
    with pytest.raises(UsageError, match=r"expected the file .*tiny-imagenet-200/wnids\.txt"):
        data.tiny_imagenet_files(tmp_path)
    base, _ = write_tiny_imagenet(tmp_path)
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn09999\t0\t0\t1\t1\n")
    with pytest.raises(UsageError, match=r"val_annotations\.txt names wnid 'n09999'"):
        data.tiny_imagenet_files(tmp_path)
    (base / "val" / "val_annotations.txt").unlink()
    with pytest.raises(UsageError, match=r"expected the file .*val/val_annotations\.txt"):
        data.tiny_imagenet_files(tmp_path)


# -- CUB-200-2011 ------------------------------------------------------------------------


def test_cub200_official_split_and_streaming_step(tmp_path):
    write_cub(tmp_path)
    train, test = data.cub200_files(tmp_path)
    assert len(train) == 9 and len(test) == 3 and sorted({label for _, label in test}) == [0, 1, 2]
    assert get_dataset_info("cub200").image_size == 224
    assert make_loaders(spec("cub200", tmp_path), torch.device("cpu"))[0].mode == "stream"  # 224 px streams
    s = spec("cub200", tmp_path, image_size=16, data_mode="stream")
    train_loader, test_loader = make_loaders(s, torch.device("cpu"))
    x, y = next(iter(train_loader))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    x, y = next(iter(test_loader))
    assert x.shape == (3, 3, 16, 16) and y.tolist() == [0, 1, 2]
    train_one(s, tmp_path)


def test_cub200_errors_name_the_expected_file(tmp_path):
    base = write_cub(tmp_path)
    (base / "train_test_split.txt").unlink()
    with pytest.raises(UsageError, match=r"expected the file .*CUB_200_2011/train_test_split\.txt"):
        data.cub200_files(tmp_path)
    write_cub(tmp_path / "again")
    (tmp_path / "again" / "CUB_200_2011" / "image_class_labels.txt").write_text("1 201\n2 1\n")
    with pytest.raises(UsageError, match=r"image 1 the class '201'; classes are 1\.\.200"):
        data.cub200_files(tmp_path / "again")
    (tmp_path / "again" / "CUB_200_2011" / "images.txt").write_text("1 001.Bird_0/Bird_0_0000.jpg\n2\n")
    with pytest.raises(UsageError, match=r"images\.txt line 2 is malformed \(expected 2 fields\): '2'"):
        data.cub200_files(tmp_path / "again")


# -- ImageNet-style folders: in memory or streaming ---------------------------------------------


def test_imagefolder_name_classes_and_slug(tmp_path, monkeypatch):
    root = write_imagefolder(tmp_path / "pets")
    monkeypatch.chdir(tmp_path)
    name = normalise_dataset_name("imagefolder:pets")
    assert name == f"imagefolder:{root.resolve()}"
    assert normalise_dataset_name("imagefolder", data_dir=root) == name
    info = get_dataset_info(name)
    assert info.num_classes == 3 and info.image_size == 224 and info.in_chans == 3
    assert dataset_slug(name) == "imagefolder-pets"
    assert spec(name, tmp_path).run_dir(tmp_path / "out").parent.parent.parent == tmp_path / "out" / "imagefolder-pets"
    train, test = data.imagefolder_files(root)
    assert len(train) == 12 and len(test) == 6  # notes.txt is not an image; val/<class>/sub/ is searched
    with pytest.raises(UsageError, match="needs a folder"):
        normalise_dataset_name("imagefolder")
    with pytest.raises(UsageError, match=r"expected the folder .*missing/train"):
        normalise_dataset_name(f"imagefolder:{tmp_path / 'missing'}")


def test_imagefolder_mode_is_automatic_by_size_and_forceable(tmp_path, monkeypatch):
    name = f"imagefolder:{write_imagefolder(tmp_path / 'set')}"
    cpu = torch.device("cpu")
    assert make_loaders(spec(name, tmp_path, image_size=32), cpu)[0].mode == "memory"
    assert make_loaders(spec(name, tmp_path), cpu)[0].mode == "stream"  # 224 px
    monkeypatch.setenv("MIXBENCH_MEMORY_GB", "0.00001")  # 18 images at 32 px need 55 KB
    assert make_loaders(spec(name, tmp_path, image_size=32), cpu)[0].mode == "stream"
    assert make_loaders(spec(name, tmp_path, image_size=32, data_mode="memory"), cpu)[0].mode == "memory"
    loader = make_loaders(spec(name, tmp_path, image_size=48, data_mode="memory"), cpu)[0]
    assert loader.images.shape == (12, 3, 48, 48) and loader.info.crop_padding == 6  # 28 px at 224 scaled
    with pytest.raises(UsageError, match="'stream' needs an image-file data set"):
        make_loaders(spec("digits", tmp_path, data_mode="stream"), cpu)
    with pytest.raises(UsageError, match="unknown data_mode 'disk'; choose from: auto, memory, stream"):
        spec(name, tmp_path, data_mode="disk")


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_imagefolder_trains_one_epoch(tmp_path, mode):
    name = f"imagefolder:{write_imagefolder(tmp_path / 'set')}"
    result = train_one(spec(name, tmp_path, image_size=16, data_mode=mode, train_subset=8), tmp_path)
    assert result["train_subset"] == 8


def test_stream_is_seeded_resumable_and_independent_of_workers(tmp_path):
    root = write_imagefolder(tmp_path / "set", per_class=6)
    samples = data.imagefolder_files(root)[0]
    kw = dict(image_size=24, batch_size=6, mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu", train=True, seed=3)

    def epoch(loader):
        return [(x.clone(), y.clone()) for x, y in loader]

    a = data.StreamLoader(samples, num_workers=0, **kw)
    first, state, second = epoch(a), a.state_dict(), epoch(a)
    b = data.StreamLoader(samples, num_workers=2, **kw)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, epoch(b)))
    c = data.StreamLoader(samples, num_workers=0, **{**kw, "seed": 99})
    c.load_state_dict(state)
    resumed = epoch(c)
    assert len(resumed) == 3 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(second, resumed))
    assert not torch.equal(first[0][0], second[0][0])  # a new order and new crops every epoch
    assert sorted(torch.cat([y for _, y in first]).tolist()) == sorted(label for _, label in samples)


# -- train_subset -------------------------------------------------------------------------------------------


def test_train_subset_is_stratified_and_seeded():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = stratified_subset(labels, 10, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [5, 3, 2]
    assert torch.equal(idx, stratified_subset(labels, 10, seed=0)) and torch.equal(idx, idx.sort().values)
    assert not torch.equal(idx, stratified_subset(labels, 10, seed=1))
    odd = stratified_subset(labels, 7, seed=0)  # quotas 3.5, 2.1, 1.4: the largest remainders round up
    assert len(odd) == 7 and torch.bincount(labels[odd]).tolist() == [4, 2, 1]
    with pytest.raises(UsageError, match="train_subset 101 must be between 1 and the training set size 100"):
        stratified_subset(labels, 101, seed=0)


def test_train_subset_changes_the_run_id_and_defaults_keep_it(tmp_path):
    base = RunSpec(method="vanilla", dataset="digits")
    assert "train_subset" not in base.identity() and "data_mode" not in base.identity()
    assert RunSpec(method="vanilla", dataset="digits", train_subset=100).run_id != base.run_id
    with pytest.raises(UsageError, match="train_subset must be a positive int"):
        RunSpec(method="vanilla", dataset="digits", train_subset=0).resolved()
