"""Reference accuracies a time-series model should beat: 1-NN Euclidean and the majority label.

1-NN with Euclidean distance on the raw series is the standard UCR baseline (the archive
publishes its figure for every dataset), so a trained model can be placed against it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..errors import MlxRftError
from .ucr import TSData

# Test rows per distance chunk: keeps the [chunk, train, features] difference array near 64 MB.
_CHUNK_ELEMENTS = 8_000_000


def _check_pair(train: TSData, test: TSData) -> None:
    if not len(train) or not len(test):
        raise MlxRftError("the train and test sets both need at least one series")
    if train.has_missing or test.has_missing:
        raise MlxRftError(
            f"{train.name} has missing values, which the 1-NN baseline does not handle; pick a "
            "dataset without missing values or fill them (e.g. by linear interpolation) first"
        )
    if train.channels != test.channels:
        raise MlxRftError(
            f"the test set has {test.channels} channels but the train set has {train.channels}; "
            "use splits of the same dataset"
        )


def resample(values: np.ndarray, length: int) -> np.ndarray:
    """[C, T] -> [C, length] by linear interpolation over evenly spaced positions (ends kept)."""
    C, T = values.shape
    if T == length:
        return values
    if T == 1:
        return np.repeat(values, length, axis=1)
    pos = np.linspace(0.0, T - 1, length)
    left = np.minimum(np.floor(pos).astype(np.int64), T - 2)
    w = (pos - left).astype(np.float32)
    return values[:, left] * (1 - w) + values[:, left + 1] * w


def _matrix(data: TSData, length: int) -> np.ndarray:
    """[N, C * length] float64: every series resampled to `length`, channels concatenated."""
    return np.stack([resample(s, length).reshape(-1) for s in data.series]).astype(np.float64)


def nearest_train_index(train: TSData, test: TSData) -> np.ndarray:
    """For each test series, the index of its Euclidean-nearest train series (first on ties).

    Variable-length data (or splits of different lengths) are resampled, channel by channel, to
    the longest train length by linear interpolation, so every pair has the same dimensions.
    """
    _check_pair(train, test)
    length = max(train.lengths)
    X, Y = _matrix(train, length), _matrix(test, length)
    chunk = max(1, _CHUNK_ELEMENTS // X.size)
    # Exact squared differences (not |a|^2 + |b|^2 - 2ab), so near-ties are not decided by rounding.
    return np.concatenate([
        ((Y[i:i + chunk, None, :] - X[None, :, :]) ** 2).sum(-1).argmin(1)
        for i in range(0, len(Y), chunk)
    ])


def one_nn_accuracy(train: TSData, test: TSData) -> float:
    """Test accuracy of 1-nearest-neighbour with Euclidean distance over all channels."""
    nearest = nearest_train_index(train, test)
    predicted = np.asarray(train.labels)[nearest]
    return float((predicted == np.asarray(test.labels)).mean())


def majority_label(train: TSData) -> str:
    """The most common train label; ties go to the one first in `train.classes` (or seen first)."""
    counts = Counter(train.labels)
    order = [c for c in train.classes if c in counts]
    order += [c for c in counts if c not in train.classes]
    return max(order, key=lambda c: counts[c])  # max keeps the first of equal counts


def majority_accuracy(train: TSData, test: TSData) -> float:
    """Test accuracy of always answering the most common train label."""
    if not len(train) or not len(test):
        raise MlxRftError("the train and test sets both need at least one series")
    label = majority_label(train)
    return sum(y == label for y in test.labels) / len(test)
