"""Embedded data sets, user data loaders and the exact mixture laws."""

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
