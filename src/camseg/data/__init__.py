"""Datasets in the camseg folder format, the synthetic generator, splits and the DataModule."""

from camseg.data.folder import DatasetIndex, Sample, load_index, validate_root

__all__ = ["DatasetIndex", "Sample", "load_index", "validate_root"]
