"""Embedded data sets, user data loaders and the exact mixture laws."""

from .cifar10 import cifar10
from .datasets import (
    DataError,
    Dataset,
    digits,
    folder_dataset,
    mixture_dataset,
    mnist,
    npz_dataset,
    toy,
)
from .mixtures import gmm8, mixture5d

__all__ = [
    "cifar10",
    "DataError",
    "Dataset",
    "digits",
    "folder_dataset",
    "mixture_dataset",
    "mnist",
    "npz_dataset",
    "toy",
    "gmm8",
    "mixture5d",
]
