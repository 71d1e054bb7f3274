"""Data sets and the on-device batch pipeline.

- ``registry``: what the harness knows of each data set (``DatasetInfo``) by name.
- one module per source, each registering its data sets: ``digits``, ``cifar``, ``synthetic``,
  ``fashion_mnist`` (IDX files), ``tiny_imagenet``, ``cub200``, ``imagefolder`` (``imagefolder:PATH``);
  ``files`` holds what the image-file sets share (listing, decoding).
- ``cache``: the data folder rule and the one per-process cache of what was read from it.
- ``loaders``: ``DeviceLoader`` (device-resident uint8 sets, augmented on the device) and
  ``StreamLoader`` (image files decoded by workers) on one base class, ``BatchLoader``; ``jpeg``: the
  streaming loader's option to decode JPEGs in batches on the training device.
- ``runs``: a run's data (``get_data``) and its loaders (``make_loaders``).
"""
from mixbench.data.registry import (  # noqa: F401  (the registry first: the sources register into it)
    DATA_MODES,
    PAPER_DEFAULTS,
    Arrays,
    Dataset,
    DatasetInfo,
    Samples,
    check_data_options,
    dataset_descriptions,
    dataset_slug,
    get_dataset_info,
    list_datasets,
    load_dataset,
    normalise_dataset_name,
    register_dataset,
    register_family,
)
from mixbench.data.cache import CACHE, DataCache, data_root, default_data_dir  # noqa: F401
from mixbench.data.augment import random_crop, random_hflip, resize_uint8  # noqa: F401
from mixbench.data.files import (  # noqa: F401
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    decode_images,
    default_num_workers,
    load_image,
)
# The sources, in the order of ``list_datasets()``.
from mixbench.data.digits import DIGITS_SIZE  # noqa: F401
from mixbench.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD  # noqa: F401
from mixbench.data import synthetic  # noqa: F401
from mixbench.data.fashion_mnist import (  # noqa: F401
    DEBIAN_FASHION_MNIST,
    FASHION_FILES,
    FASHION_MEAN,
    FASHION_STD,
    find_fashion_mnist,
    read_idx,
)
from mixbench.data.tiny_imagenet import TINY_IMAGENET_MEAN, TINY_IMAGENET_STD, tiny_imagenet_files  # noqa: F401
from mixbench.data.cub200 import cub200_files  # noqa: F401
from mixbench.data.imagefolder import imagefolder_classes, imagefolder_files  # noqa: F401
from mixbench.data.loaders import DECODE_CHOICES, BatchLoader, DeviceLoader, StreamLoader  # noqa: F401
from mixbench.data.runs import (  # noqa: F401
    MEMORY_MAX_SIZE,
    get_data,
    make_loaders,
    memory_limit_bytes,
    stratified_subset,
)
