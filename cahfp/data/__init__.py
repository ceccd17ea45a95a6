"""Datasets, data-root resolution and client partitioning."""

from cahfp.data.datasets import DATASETS, ImageData, load_dataset
from cahfp.data.partition import (
    client_shares,
    label_histograms,
    partition,
    skew,
    training_pool,
)
from cahfp.data.paths import resolve_data_dir

__all__ = [
    "DATASETS",
    "ImageData",
    "client_shares",
    "label_histograms",
    "load_dataset",
    "partition",
    "resolve_data_dir",
    "skew",
    "training_pool",
]
