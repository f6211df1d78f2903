"""Datasets (uint8 tensors), deterministic splits, tensor-resident loaders, kornia augmentation."""

from misleader.data.datasets import DATASETS, Dataset, list_datasets, load_dataset, resolve_data_dir
from misleader.data.loader import TensorLoader, to_unit
from misleader.data.splits import SplitSpec, Splits, make_splits

__all__ = ["DATASETS", "Dataset", "list_datasets", "load_dataset", "resolve_data_dir", "TensorLoader", "to_unit",
           "SplitSpec", "Splits", "make_splits"]
