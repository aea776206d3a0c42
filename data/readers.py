"""Readers for the shipped data sets: plain numpy arrays, no torch.

The readers check what they read and raise :class:`DataError` with the file
and the fix, so the CLI can refuse a bad data set before any process starts.
"""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MNIST_FILES = "a pair such as t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"


class DataError(ValueError):
    """A data set that cannot be read: names the file and what is expected."""


@dataclass(frozen=True)
class ImageSet:
    """Images as float32 (N, 1, H, W) in [0, 1] and int64 labels."""

    images: np.ndarray
    labels: np.ndarray
    source: str


def load_digits() -> ImageSet:
    """scikit-learn's 1,797 handwritten 8x8 digits (values 0..16)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    return ImageSet(
        images, bunch.target.astype(np.int64), "sklearn.datasets.load_digits"
    )


def read_idx(path: Path, ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (gzip or raw), checking its magic number and size.

    ``ndim`` (3 for images, 1 for labels) also checks the number of dimensions
    that the magic number announces.
    """
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: broken gzip stream ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        magic = raw[:4].hex() or "empty"
        raise DataError(
            f"{path}: not an IDX file (magic number 0x{magic}; expected 0x00000803 "
            "for images or 0x00000801 for labels)"
        )
    if ndim is not None and raw[3] != ndim:
        raise DataError(
            f"{path}: not an IDX file of {ndim} dimension(s) (magic number "
            f"0x{raw[:4].hex()}; expected 0x000008{ndim:02x})"
        )
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(
        int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: truncated or padded IDX file: header says {shape} "
            f"({expected} bytes of data), the file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def find_mnist(root: Path) -> list[tuple[Path, Path]]:
    """Pairs of (images, labels) IDX files in ``root``: train first, then t10k."""
    if not root.is_dir():
        raise DataError(
            f"data.root={root} is not a folder; point it at a folder holding "
            f"MNIST IDX files ({MNIST_FILES})"
        )
    pairs = []
    for images in sorted(root.glob("*-images-idx3-ubyte*"), reverse=True):
        prefix = images.name.split("-images-")[0]
        suffix = images.name.split("idx3-ubyte")[1]
        labels = root / f"{prefix}-labels-idx1-ubyte{suffix}"
        if not labels.exists():
            raise DataError(f"{images} has no labels file: expected {labels}")
        pairs.append((images, labels))
    if not pairs:
        raise DataError(
            f"data.root={root} holds no MNIST IDX files; expected {MNIST_FILES}"
        )
    return pairs


def load_mnist(root: Path) -> ImageSet:
    """Every (images, labels) pair found in ``root``, concatenated."""
    images, labels = [], []
    for image_path, label_path in find_mnist(root):
        x, y = read_idx(image_path, ndim=3), read_idx(label_path, ndim=1)
        if len(x) != len(y):
            raise DataError(
                f"{image_path} holds {len(x)} images but {label_path} {len(y)} labels"
            )
        if len(y) and (int(y.max()) > 9 or int(y.min()) < 0):
            bad = int(y.max()) if int(y.max()) > 9 else int(y.min())
            raise DataError(f"{label_path}: labels must be digits 0..9, found {bad}")

        images.append(x)
        labels.append(y)
    x = np.concatenate(images).astype(np.float32)[:, None, :, :] / 255.0
    y = np.concatenate(labels).astype(np.int64)
    return ImageSet(x, y, str(root))


def text_min_chars(window: int, val_fraction: float, test_fraction: float) -> int:
    """The shortest text that gives every split at least one window."""
    smallest = min(val_fraction, test_fraction, 1.0 - val_fraction - test_fraction)
    return math.ceil((window + 1) / smallest) + window


def default_text() -> tuple[str, str]:
    """The Python documentation topics that ship with CPython (no download)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics)), "pydoc_data.topics"


def read_text(path: Path | None, min_chars: int) -> tuple[str, str]:
    """The text of a UTF-8 file (or the embedded default) and its source."""
    if path is None:
        text, source = default_text()
        if len(text) < min_chars:
            raise DataError(
                f"the embedded text ({source}) holds {len(text)} characters; "
                f"data.window needs at least {min_chars}: lower data.window"
            )
        return text, source
    if path.is_dir():
        raise DataError(f"data.path={path} is a folder; give a UTF-8 text file")
    if not path.is_file():
        raise DataError(f"data.path={path}: no such file; give a UTF-8 text file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"data.path={path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
            f"offset {err.start}); convert it, e.g. iconv -t UTF-8"
        ) from None
    except OSError as err:
        raise DataError(f"data.path={path}: cannot read ({err.strerror})") from None
    if len(text) < min_chars:
        raise DataError(
            f"data.path={path} holds {len(text)} characters; it needs at least "
            f"{min_chars} for data.window and the train/val/test splits"
        )
    return text, str(path)
