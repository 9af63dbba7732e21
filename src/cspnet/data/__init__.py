"""Datasets: classification (Fashion-MNIST, scikit-learn digits, image folders)."""
from .classification import (
    BUILTIN,
    ClassificationData,
    CorruptImageError,
    DataError,
    FolderDataset,
    TensorImageDataset,
    load_classification,
    load_digits_data,
    load_fashion_mnist,
    load_image_folder,
)

__all__ = [
    "BUILTIN", "ClassificationData", "CorruptImageError", "DataError", "FolderDataset", "TensorImageDataset",
    "load_classification", "load_digits_data", "load_fashion_mnist", "load_image_folder",
]
