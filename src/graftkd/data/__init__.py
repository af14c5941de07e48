"""Data layer: image sets, readers with a decoded-once cache, few-shot manifests, augmentation.

Entry points: ``load_dataset(spec, split)`` for labeled data, ``load_unlabeled_folder(path)`` for a
folder of images without classes, ``make_manifest`` / ``FewShotManifest`` for reproducible few-shot
subsets, ``Normalizer`` and ``random_crop_flip`` for on-device preprocessing.
"""
from graftkd.data.augment import (
    Augment,
    apply_crop_flip,
    crop_flip_params,
    default_augment,
    random_crop_flip,
    resolve_augment,
)
from graftkd.data.cache import cache_dir, file_sha256
from graftkd.data.dataset import ImageSet
from graftkd.data.fewshot import (
    FewShotManifest,
    make_manifest,
    make_unlabeled_manifest,
    sample_few_shot,
    sample_unlabeled,
)
from graftkd.data.images import IMAGE_EXTENSIONS
from graftkd.data.normalize import DATASET_STATS, Normalizer, channel_stats, stats_for
from graftkd.data.readers import (
    download_cifar,
    load_cifar_python,
    load_digits,
    load_image_archive,
    load_image_files,
    load_image_folder,
    load_unlabeled_folder,
)
from graftkd.data.sources import KNOWN_DATASETS, data_roots, load_dataset, resolve_source

__all__ = [
    "Augment",
    "DATASET_STATS",
    "FewShotManifest",
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "KNOWN_DATASETS",
    "Normalizer",
    "apply_crop_flip",
    "cache_dir",
    "channel_stats",
    "crop_flip_params",
    "data_roots",
    "default_augment",
    "resolve_augment",
    "download_cifar",
    "file_sha256",
    "load_cifar_python",
    "load_dataset",
    "load_digits",
    "load_image_archive",
    "load_image_files",
    "load_image_folder",
    "load_unlabeled_folder",
    "make_manifest",
    "make_unlabeled_manifest",
    "random_crop_flip",
    "resolve_source",
    "sample_few_shot",
    "sample_unlabeled",
    "stats_for",
]
