"""The examples' data: scikit-learn's bundled 8x8 digits (1797 images, no download)."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset


def digits_datasets(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Train/test split (80/20), pixels scaled to [0, 1]."""
    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images / 16.0, labels, test_size=0.2, random_state=seed, stratify=labels)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return (TensorDataset(as_x(x_train), as_y(y_train)),
            TensorDataset(as_x(x_test), as_y(y_test)))


def make_model() -> torch.nn.Module:
    """A small MLP: 64 -> 128 -> 64 -> 10."""
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )


def progress_bar(done: int, total: int, width: int = 20) -> str:
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + "]"
