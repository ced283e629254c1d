"""Datasets for raykd: a registry of named sources, each served as in-memory indexed splits.

``DATASETS`` is read by config validation; ``dataset_info`` / ``build_dataset`` by the teacher
cache and the training loop; ``raykd.data.augment`` holds the seeded augmentation.
"""

from raykd.data.indexed import DatasetInfo, IndexedDataset
from raykd.data.registry import DATASETS, DatasetSpec, build_dataset, dataset_info

__all__ = ["DATASETS", "DatasetInfo", "DatasetSpec", "IndexedDataset", "build_dataset",
           "dataset_info"]
