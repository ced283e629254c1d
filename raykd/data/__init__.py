"""Datasets for raykd: a registry of named sources, each served as indexed splits read from a
prepared row store on storage (``store.py``).

``DATASETS`` is read by config validation; ``prepare_data`` by the driver's preflight;
``dataset_info`` / ``build_dataset`` by the teacher cache and the training loop;
``raykd.data.augment`` holds the seeded augmentation.
"""

from raykd.data.indexed import DatasetInfo, IndexedDataset, SplitBase
from raykd.data.registry import DATASETS, DatasetSpec, build_dataset, dataset_info, prepare_data

__all__ = ["DATASETS", "DatasetInfo", "DatasetSpec", "IndexedDataset", "SplitBase",
           "build_dataset", "dataset_info", "prepare_data"]
