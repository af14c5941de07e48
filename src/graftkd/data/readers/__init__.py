"""Readers: CIFAR python format, labeled image folders, tar archives, unlabeled folders, sklearn digits,
one module per family.

Every reader returns an ``ImageSet`` of uint8 ``(N, C, H, W)`` images. Labeled readers order images by
class index (alphabetical order of class folder names) and then by relative path, so an index means
the same image on every machine holding the same files.
"""
from __future__ import annotations

from graftkd.data.readers.archives import is_archive_path, load_image_archive
from graftkd.data.readers.cifar import CIFAR_INFO, download_cifar, load_cifar_python
from graftkd.data.readers.digits import load_digits
from graftkd.data.readers.folders import list_images, load_image_files, load_image_folder, load_unlabeled_folder

__all__ = [
    "CIFAR_INFO",
    "load_cifar_python",
    "download_cifar",
    "load_image_folder",
    "load_image_archive",
    "load_unlabeled_folder",
    "load_image_files",
    "load_digits",
    "is_archive_path",
    "list_images",
]
