"""Deterministic, stratified splits of a labelled set (numpy and scikit-learn only)."""

from __future__ import annotations

import numpy as np

from dltrain.data.readers import DataError


def split_indices(
    labels: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    fold: int | None = None,
    folds: int | None = None,
    source: str = "the data",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, val and test indices, stratified by label and fixed by ``seed``.

    The test split is always the same for a seed. With ``folds``, the rest
    (train + val) is cut by stratified K-fold and ``fold`` picks which part
    validates; ``val_fraction`` is then unused.
    """
    from sklearn.model_selection import StratifiedKFold, train_test_split

    index = np.arange(len(labels))
    try:
        rest, test = train_test_split(
            index, test_size=test_fraction, stratify=labels, random_state=seed
        )
        if folds is not None:
            splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            train, val = list(splitter.split(rest, labels[rest]))[fold]
            return rest[train], rest[val], test
        train, val = train_test_split(
            rest,
            test_size=val_fraction / (1.0 - test_fraction),
            stratify=labels[rest],
            random_state=seed,
        )
    except ValueError as err:
        raise DataError(f"cannot split {source} into train/val/test: {err}") from None
    return train, val, test


def smallest_class_in_pool(labels: np.ndarray, test_fraction: float, seed: int) -> int:
    """Samples of the rarest class in train + val: the most folds that can work."""
    train, val, _ = split_indices(
        labels, 0.5 * (1 - test_fraction), test_fraction, seed
    )
    pool = labels[np.concatenate([train, val])]
    return int(np.bincount(pool).min())
