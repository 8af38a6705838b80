"""Compatibility module: datasets moved to the package benchmark/datasets/ (a registry of kinds,
in-memory and file-backed sets). ``from benchmark.data import ImageSet, load_images, subset``
keeps working."""
from benchmark.datasets import (DATASETS, FASHION_CLASSES, MNIST_CLASSES, FileImageSet, ImageSet, class_balanced,
                                load_images, open_dataset, subset)
from benchmark.datasets.memory import PROJECT_ROOT

__all__ = ["DATASETS", "FASHION_CLASSES", "MNIST_CLASSES", "FileImageSet", "ImageSet", "class_balanced",
           "load_images", "open_dataset", "subset", "PROJECT_ROOT"]
