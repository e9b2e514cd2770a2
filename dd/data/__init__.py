"""Datasets as plain torch ``Dataset`` objects (no lightning, no hydra).

Model images are float32 ``(3, H, W)`` in ``[-1, 1]``; metric images are uint8 ``(N, 3, H, W)``.
"""

from dd.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FashionMNISTDataset,
    fashion_mnist_uint8,
    load_fashion_mnist,
)
from dd.data.image_folder import (
    ImageFolderDataset,
    load_image_folder_uint8,
    model_images_to_uint8,
    uint8_to_model_images,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FashionMNISTDataset",
    "ImageFolderDataset",
    "fashion_mnist_uint8",
    "load_fashion_mnist",
    "load_image_folder_uint8",
    "model_images_to_uint8",
    "uint8_to_model_images",
]
