"""The data readers and data modules, for real: files on disk, no mocks."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from dltrain.data.datamodules import (
    EpochSampler,
    ImageDataModule,
    ShardSampler,
    TextDataModule,
)
from dltrain.data.readers import (
    DataError,
    ImageSet,
    find_mnist,
    load_digits,
    load_mnist,
    read_idx,
    read_text,
)

MNIST_T10K_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
IDX_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: 0x00 0x00, the type code, ndim, big-endian dims, data."""
    code = IDX_TYPE_CODES[array.dtype]
    header = bytes([0, 0, code, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool | None = None) -> Path:
    data = idx_bytes(array)
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def random_mnist(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


def write_mnist(root: Path, n: int, prefix: str = "t10k", suffix: str = ".gz", seed=0):
    images, labels = random_mnist(n, seed)
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images, labels


# ---------------------------------------------------------------------------
# read_idx
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_roundtrip_images_and_labels(tmp_path, name):
    images, labels = random_mnist(7)
    image_path = write_idx(tmp_path / name, images)
    label_path = write_idx(
        tmp_path / name.replace("images-idx3", "labels-idx1"), labels
    )
    if name.endswith(".gz"):
        assert image_path.read_bytes()[:2] == b"\x1f\x8b"  # really gzip
    read_images, read_labels = read_idx(image_path), read_idx(label_path)
    assert read_images.shape == (7, 28, 28)
    assert read_images.dtype == np.uint8
    assert np.array_equal(read_images, images)
    assert read_labels.shape == (7,)
    assert np.array_equal(read_labels, labels)


def test_read_idx_big_endian_int32(tmp_path):
    values = np.array([[1, -2, 70000], [2**31 - 1, -(2**31), 0]], dtype=">i4")
    read = read_idx(write_idx(tmp_path / "ints.idx", values))
    assert read.shape == (2, 3)
    assert read.tolist() == values.tolist()


def test_read_idx_zero_items(tmp_path):
    read = read_idx(write_idx(tmp_path / "empty-labels", np.zeros(0, np.uint8)))
    assert read.shape == (0,)


@pytest.mark.parametrize(
    "magic",
    [b"\x00\x00\x07\x03", b"\x01\x00\x08\x03", b"\x00\x01\x08\x01", b"PK\x03\x04"],
)
def test_read_idx_wrong_magic(tmp_path, magic):
    images, _ = random_mnist(2)
    path = tmp_path / "bad-magic-idx3-ubyte"
    path.write_bytes(magic + idx_bytes(images)[4:])
    with pytest.raises(DataError) as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message
    assert "magic" in message
    assert f"0x{magic.hex()}" in message


def test_read_idx_wrong_magic_inside_gzip(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(b"\x12\x34\x56\x78" + bytes(100)))
    with pytest.raises(DataError, match="magic") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="magic") as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_truncated_data(tmp_path, compress):
    images, _ = random_mnist(3)
    path = tmp_path / "short"
    data = idx_bytes(images)[:-100]  # the last image lost 100 bytes
    path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message
    assert "(3, 28, 28)" in message  # what the header promised
    assert str(3 * 28 * 28 - 100) in message  # what the file holds


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "header-only"
    path.write_bytes(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big"))  # 1 of 3 dims
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_padded_data(tmp_path):
    _, labels = random_mnist(5)
    path = tmp_path / "padded"
    path.write_bytes(idx_bytes(labels) + b"\x00")
    with pytest.raises(DataError, match="padded"):
        read_idx(path)


def _gzip_of_images() -> bytes:
    # Compressible pixels, so that gzip writes real deflate blocks (random
    # bytes would be stored uncompressed and only the CRC could catch damage).
    images = (np.arange(5 * 28 * 28) % 7 * 30).astype(np.uint8).reshape(5, 28, 28)
    data = gzip.compress(idx_bytes(images), mtime=0)
    assert len(data) < 5 * 28 * 28 // 2
    return data


@pytest.mark.parametrize(
    "damage",
    ["cut_in_half", "bad_crc", "bad_method", "corrupt_deflate_stream"],
)
def test_read_idx_broken_gzip(tmp_path, damage):
    data = bytearray(_gzip_of_images())
    if damage == "cut_in_half":
        data = data[: len(data) // 2]
    elif damage == "bad_crc":
        data[-8:-4] = b"\x00\x00\x00\x00"
    elif damage == "bad_method":
        data[2] = 0  # the compression method byte; 8 is deflate
    else:  # flip two bytes in the middle of the compressed stream
        data[20] ^= 0xFF
        data[21] ^= 0xFF
    path = tmp_path / f"{damage}.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert "gzip" in str(info.value)


def test_read_idx_missing_file(tmp_path):
    path = tmp_path / "nope-idx3-ubyte"
    with pytest.raises(DataError, match="cannot read") as info:
        read_idx(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------
# find_mnist / load_mnist
# ---------------------------------------------------------------------------


def test_find_mnist_empty_folder_names_expected_files(tmp_path):
    with pytest.raises(DataError) as info:
        find_mnist(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "t10k-images-idx3-ubyte" in message
    assert "t10k-labels-idx1-ubyte" in message


def test_find_mnist_not_a_folder(tmp_path):
    for root in (
        tmp_path / "missing",
        write_idx(tmp_path / "f", np.zeros(1, np.uint8)),
    ):
        with pytest.raises(DataError, match="not a folder") as info:
            find_mnist(root)
        assert "t10k-images-idx3-ubyte" in str(info.value)


def test_find_mnist_missing_labels(tmp_path):
    images, _ = random_mnist(3)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    with pytest.raises(DataError, match="no labels file") as info:
        find_mnist(tmp_path)
    assert str(tmp_path / "t10k-labels-idx1-ubyte.gz") in str(info.value)
    with pytest.raises(DataError, match="no labels file"):
        load_mnist(tmp_path)


def test_find_mnist_pairs_train_first(tmp_path):
    write_mnist(tmp_path, 3, prefix="t10k", suffix=".gz")
    write_mnist(tmp_path, 4, prefix="train", suffix="")
    pairs = find_mnist(tmp_path)
    assert [(i.name, lab.name) for i, lab in pairs] == [
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    ]


def test_load_mnist_concatenates_and_scales(tmp_path):
    test_x, test_y = write_mnist(tmp_path, 3, prefix="t10k", seed=1)
    train_x, train_y = write_mnist(tmp_path, 4, prefix="train", suffix="", seed=2)
    data = load_mnist(tmp_path)
    assert data.images.shape == (7, 1, 28, 28)
    assert data.images.dtype == np.float32
    assert data.labels.dtype == np.int64
    expected = np.concatenate([train_x, test_x])[:, None].astype(np.float32) / 255.0
    assert np.array_equal(data.images, expected)
    assert data.labels.tolist() == np.concatenate([train_y, test_y]).tolist()
    assert data.source == str(tmp_path)


def test_load_mnist_count_mismatch(tmp_path):
    images, labels = random_mnist(5)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:4])
    with pytest.raises(DataError, match="5 images") as info:
        load_mnist(tmp_path)
    assert "4 labels" in str(info.value)


def test_load_mnist_swapped_dimensions(tmp_path):
    images, labels = random_mnist(5)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", labels)  # 1-d where 3-d belongs
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", images)
    with pytest.raises(DataError, match="3 dimension") as info:
        load_mnist(tmp_path)
    assert str(tmp_path / "t10k-images-idx3-ubyte") in str(info.value)


def test_read_idx_checks_announced_dimensions(tmp_path):
    images, labels = random_mnist(4)
    label_path = write_idx(tmp_path / "labels", labels)
    image_path = write_idx(tmp_path / "images.gz", images)
    assert read_idx(label_path, ndim=1).shape == (4,)
    assert read_idx(image_path, ndim=3).shape == (4, 28, 28)
    for path, ndim in ((label_path, 3), (image_path, 1)):
        with pytest.raises(DataError, match="magic") as info:
            read_idx(path, ndim=ndim)
        assert str(path) in str(info.value)


def test_load_mnist_labels_not_digits(tmp_path):
    images, labels = random_mnist(5)
    labels[2] = 12
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    with pytest.raises(DataError, match="found 12"):
        load_mnist(tmp_path)


def test_load_mnist_real_shared_t10k(shared_data):
    root = shared_data / "mnist"
    pairs = find_mnist(root)
    assert [(i.name, lab.name) for i, lab in pairs] == [
        ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    ]
    data = load_mnist(root)
    assert data.images.shape == (10_000, 1, 28, 28)
    assert data.images.dtype == np.float32
    assert float(data.images.min()) == 0.0
    assert float(data.images.max()) == 1.0
    assert data.labels.shape == (10_000,)
    assert np.bincount(data.labels, minlength=10).tolist() == MNIST_T10K_LABEL_COUNTS
    # The first test digits of MNIST are 7, 2, 1, 0, 4.
    assert data.labels[:5].tolist() == [7, 2, 1, 0, 4]


# ---------------------------------------------------------------------------
# load_digits
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    return load_digits()


def test_load_digits(digits):
    assert digits.images.shape == (1797, 1, 8, 8)
    assert digits.images.dtype == np.float32
    assert float(digits.images.min()) == 0.0
    assert float(digits.images.max()) == 1.0
    assert digits.labels.dtype == np.int64
    assert sorted(set(digits.labels.tolist())) == list(range(10))
    assert np.bincount(digits.labels).sum() == 1797


# ---------------------------------------------------------------------------
# read_text
# ---------------------------------------------------------------------------


def test_read_text_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait".encode("latin-1"))  # 0xe9 at offset 3
    with pytest.raises(DataError) as info:
        read_text(path, 1)
    message = str(info.value)
    assert "UTF-8" in message
    assert "offset 3" in message
    assert "0xe9" in message
    assert str(path) in message


def test_read_text_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(DataError, match="holds 0 characters") as info:
        read_text(path, 1)
    assert str(path) in str(info.value)


def test_read_text_too_short(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("to be or not")
    with pytest.raises(DataError, match="holds 12 characters; it needs at least 100"):
        read_text(path, 100)
    assert read_text(path, 12) == ("to be or not", str(path))


@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_read_text_missing_file(tmp_path, kind):
    path = tmp_path / "missing.txt" if kind == "missing" else tmp_path
    expected = "no such file" if kind == "missing" else "is a folder"
    with pytest.raises(DataError, match=expected) as info:
        read_text(path, 1)
    assert str(path) in str(info.value)


def test_read_text_utf8_multibyte(tmp_path):
    path = tmp_path / "utf8.txt"
    path.write_text("na\u00efve \u2014 \u00e9t\u00e9\n", encoding="utf-8")
    text, source = read_text(path, 5)
    assert text == "na\u00efve \u2014 \u00e9t\u00e9\n"
    assert source == str(path)


def test_read_text_real_tinyshakespeare(shared_data):
    path = shared_data / "tinyshakespeare.txt"
    text, source = read_text(path, 1000)
    assert len(text) > 1_000_000
    assert source == str(path)
    assert text.startswith("First Citizen:")


def test_read_text_default_is_embedded_pydoc_text():
    text, source = read_text(None, 1000)
    assert source == "pydoc_data.topics"
    assert len(text) > 100_000
    assert text.strip()


# ---------------------------------------------------------------------------
# ImageDataModule
# ---------------------------------------------------------------------------


def indexed_digits(digits: ImageSet) -> ImageSet:
    """The real digit labels, with pixel (0, 0) holding each sample's index."""
    images = digits.images.copy()
    images[:, 0, 0, 0] = np.arange(len(images), dtype=np.float32)
    return ImageSet(images, digits.labels, "indexed digits")


def split_indices(module: ImageDataModule) -> dict[str, np.ndarray]:
    return {
        name: getattr(module, f"{name}_set").tensors[0][:, 0, 0, 0].long().numpy()
        for name in ("train", "val", "test")
    }


def split_sets(module):
    return (module.train_set, module.val_set, module.test_set)


def make_digits_module(images: ImageSet, seed: int = 0) -> ImageDataModule:
    return ImageDataModule(
        images, batch_size=64, val_fraction=0.1, test_fraction=0.2, seed=seed
    )


def test_image_module_digits_split_sizes(digits):
    module = make_digits_module(digits)
    # sklearn rounds test up: ceil(0.2 * 1797) = 360; then val is
    # ceil(0.1 / 0.8 * 1437) = 180 of the remaining 1437; train gets 1257.
    assert module.info.sizes == {"train": 1257, "val": 180, "test": 360}
    assert (len(module.train_set), len(module.val_set), len(module.test_set)) == (
        1257,
        180,
        360,
    )
    assert module.info.num_classes == 10
    assert module.info.input_shape == (1, 8, 8)
    assert module.info.task == "classification"
    assert module.info.class_names == [str(c) for c in range(10)]
    # Every pixel of every sample lands in exactly one split.
    total = sum(float(s.tensors[0].double().sum()) for s in split_sets(module))
    assert total == pytest.approx(float(digits.images.astype(np.float64).sum()))


def test_image_module_splits_disjoint_and_cover(digits):
    images = indexed_digits(digits)
    module = make_digits_module(images)
    parts = split_indices(module)
    combined = np.concatenate(list(parts.values()))
    assert len(combined) == 1797
    assert sorted(combined.tolist()) == list(range(1797))
    for name, index in parts.items():
        labels = getattr(module, f"{name}_set").tensors[1].numpy()
        assert np.array_equal(labels, digits.labels[index]), name  # pairs intact
        images_of = getattr(module, f"{name}_set").tensors[0][:, :, 1:, :].numpy()
        assert np.array_equal(images_of, digits.images[index][:, :, 1:, :]), name


def test_image_module_stratified(digits):
    parts = split_indices(make_digits_module(indexed_digits(digits)))
    all_counts = np.bincount(digits.labels, minlength=10)
    test_counts = np.bincount(digits.labels[parts["test"]], minlength=10)
    expected_test = all_counts * 360 / 1797
    assert np.abs(test_counts - expected_test).max() <= 1, (test_counts, expected_test)
    rest_counts = all_counts - test_counts
    val_counts = np.bincount(digits.labels[parts["val"]], minlength=10)
    expected_val = rest_counts * 180 / 1437
    assert np.abs(val_counts - expected_val).max() <= 1, (val_counts, expected_val)


def test_image_module_split_depends_on_seed_only(digits):
    images = indexed_digits(digits)
    first = split_indices(make_digits_module(images, seed=0))
    again = split_indices(make_digits_module(images, seed=0))
    other = split_indices(make_digits_module(images, seed=1))
    for name in ("train", "val", "test"):
        assert np.array_equal(first[name], again[name]), name
        assert not np.array_equal(np.sort(first[name]), np.sort(other[name])), name


def test_image_module_val_and_test_loaders_see_every_sample_once(digits):
    module = make_digits_module(indexed_digits(digits))
    for name, expected in (("val", 180), ("test", 360)):
        loader = getattr(module, f"{name}_dataloader")()
        seen = torch.cat([x[:, 0, 0, 0] for x, _ in loader]).long().tolist()
        assert len(seen) == expected, name
        assert sorted(seen) == sorted(split_indices(module)[name].tolist()), name


def test_image_module_unsplittable_set_raises(digits):
    labels = np.array([0] * 9 + [1], dtype=np.int64)  # class 1 has one sample
    images = np.zeros((10, 1, 8, 8), np.float32)
    with pytest.raises(DataError, match="cannot split") as info:
        make_digits_module(ImageSet(images, labels, "tiny set"))
    assert "tiny set" in str(info.value)


# ---------------------------------------------------------------------------
# ShardSampler / EpochSampler
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("length", [360, 361, 7, 0])
@pytest.mark.parametrize("world_size", [1, 2, 3, 10, 500])
def test_shard_sampler_every_index_once(length, world_size):
    shards = [
        list(ShardSampler(length, rank, world_size)) for rank in range(world_size)
    ]
    for rank, shard in enumerate(shards):
        assert len(ShardSampler(length, rank, world_size)) == len(shard)
    union = [i for shard in shards for i in shard]
    assert len(union) == length  # no padding, no duplicates
    assert sorted(union) == list(range(length))
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1


def test_shard_sampler_world_larger_than_length():
    shards = [list(ShardSampler(7, rank, 10)) for rank in range(10)]
    assert shards == [[0], [1], [2], [3], [4], [5], [6], [], [], []]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_epoch_sampler_same_count_every_rank(world_size):
    samplers = [EpochSampler(1257, 1000, 0, r, world_size) for r in range(world_size)]
    draws = [list(s) for s in samplers]
    expected = 1000 // world_size
    assert [len(d) for d in draws] == [expected] * world_size
    assert [len(s) for s in samplers] == [expected] * world_size
    # Within an epoch the ranks draw from one permutation: no overlap.
    union = [i for d in draws for i in d]
    assert len(set(union)) == len(union)
    assert all(0 <= i < 1257 for i in union)


def test_epoch_sampler_more_samples_than_length():
    draws = [list(EpochSampler(7, 20, 3, rank, 2)) for rank in range(2)]
    assert [len(d) for d in draws] == [10, 10]
    counts = np.bincount(draws[0] + draws[1], minlength=7)
    assert counts.min() >= 20 // 7  # whole permutations first
    assert counts.sum() == 20


def test_epoch_sampler_epochs_and_seed():
    sampler = EpochSampler(500, 200, seed=42, rank=0, world_size=1)
    epoch0 = list(sampler)
    assert list(sampler) == epoch0  # same epoch, same draw
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    sampler.set_epoch(0)
    assert list(sampler) == epoch0
    twin = EpochSampler(500, 200, seed=42, rank=0, world_size=1)
    twin.set_epoch(1)
    assert list(twin) == epoch1  # deterministic given seed and epoch
    assert list(EpochSampler(500, 200, seed=7, rank=0, world_size=1)) != epoch0
    # Ranks of a 2-process world get different halves, also per epoch.
    ranks = [EpochSampler(500, 200, seed=42, rank=r, world_size=2) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(1)
    assert set(ranks[0]).isdisjoint(set(ranks[1]))


# ---------------------------------------------------------------------------
# TextDataModule
# ---------------------------------------------------------------------------

WINDOW, EVAL_STRIDE = 64, 50


@pytest.fixture(scope="module")
def shakespeare(shared_data) -> tuple[str, TextDataModule]:
    path = shared_data / "tinyshakespeare.txt"
    text = path.read_text(encoding="utf-8")
    module = TextDataModule(
        str(path),
        window=WINDOW,
        train_samples=1000,
        eval_stride=EVAL_STRIDE,
        batch_size=32,
        val_fraction=0.05,
        test_fraction=0.05,
        seed=0,
    )
    return text, module


def decode(module: TextDataModule, tokens: torch.Tensor) -> str:
    vocab = module.info.vocab
    return "".join(vocab[i] for i in tokens.tolist())


def test_text_module_info(shakespeare):
    text, module = shakespeare
    assert module.info.vocab == "".join(sorted(set(text)))
    assert module.info.num_classes == len(module.info.vocab) == 65
    assert module.info.task == "language_model"
    assert module.info.input_shape == (WINDOW,)
    assert module.info.sizes == {
        "train": 1000,
        "val": len(module.val_set),
        "test": len(module.test_set),
    }


def test_text_module_contiguous_split(shakespeare):
    text, module = shakespeare
    n_val, n_test = int(len(text) * 0.05), int(len(text) * 0.05)
    n_train = len(text) - n_val - n_test
    parts = (module.train_set, module.val_set, module.test_set)
    assert [len(p.tokens) for p in parts] == [n_train, n_val, n_test]
    # The three parts are consecutive slices of one token sequence.
    assert [p.tokens.storage_offset() for p in parts] == [0, n_train, n_train + n_val]
    assert decode(module, module.train_set.tokens) == text[:n_train]
    assert decode(module, module.val_set.tokens) == text[n_train : n_train + n_val]
    assert decode(module, module.test_set.tokens) == text[n_train + n_val :]


@pytest.mark.parametrize("part", ["train", "val", "test"])
def test_text_module_items_are_window_and_next_char(shakespeare, part):
    text, module = shakespeare
    n_val = n_test = int(len(text) * 0.05)
    n_train = len(text) - n_val - n_test
    begin, end = {
        "train": (0, n_train),
        "val": (n_train, n_train + n_val),
        "test": (n_train + n_val, len(text)),
    }[part]
    dataset = getattr(module, f"{part}_set")
    stride = 1 if part == "train" else EVAL_STRIDE
    assert len(dataset) == (end - begin - WINDOW - 1) // stride + 1
    last = len(dataset) - 1
    for i in (0, 1, len(dataset) // 2, last):
        x, y = dataset[i]
        start = begin + i * stride
        assert x.shape == (WINDOW,)
        assert x.dtype == torch.long
        assert y.shape == ()
        assert decode(module, x) == text[start : start + WINDOW]
        assert module.info.vocab[int(y)] == text[start + WINDOW]  # char after window
    # Windows and targets stay inside their part: val and test never reach
    # back into the training text, and no target is beyond the part's end.
    assert begin + last * stride + WINDOW < end
    assert end - (begin + last * stride + WINDOW) <= stride


def test_text_module_loaders(shakespeare):
    _, module = shakespeare
    train = module.train_dataloader()
    assert isinstance(train.sampler.sampler, EpochSampler)  # inside ResumableSampler
    assert len(train.sampler) == 1000
    x, y = next(iter(train))
    assert x.shape == (32, WINDOW)
    assert y.shape == (32,)
    val = module.val_dataloader()
    assert isinstance(val.sampler, ShardSampler)
    assert sum(len(y) for _, y in val) == len(module.val_set)


def test_text_module_vocab_missing_characters(shakespeare, shared_data):
    text, module = shakespeare
    vocab = module.info.vocab.replace("z", "")
    with pytest.raises(DataError, match="never seen") as info:
        TextDataModule(
            str(shared_data / "tinyshakespeare.txt"),
            window=WINDOW,
            train_samples=100,
            eval_stride=EVAL_STRIDE,
            batch_size=8,
            val_fraction=0.05,
            test_fraction=0.05,
            seed=0,
            vocab=vocab,
        )
    assert "'z'" in str(info.value)


def test_text_module_given_vocab_sets_token_ids(tmp_path):
    path = tmp_path / "abc.txt"
    path.write_text("abcabcabca" * 30)  # 300 characters
    vocab = "cbaxyz"  # a superset, in its own order
    module = TextDataModule(
        str(path),
        window=4,
        train_samples=50,
        eval_stride=1,
        batch_size=8,
        val_fraction=0.1,
        test_fraction=0.1,
        seed=0,
        vocab=vocab,
    )
    assert module.info.vocab == vocab
    assert module.info.num_classes == 6
    x, y = module.train_set[0]
    assert x.tolist() == [2, 1, 0, 2]  # "abca" in the given vocabulary
    assert int(y) == 1  # "b"


def test_text_module_too_short_text(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 200)
    # needs ceil((64 + 1) / 0.05) + 64 = 1364 characters
    with pytest.raises(DataError, match="at least 1364"):
        TextDataModule(
            str(path),
            window=64,
            train_samples=10,
            eval_stride=1,
            batch_size=8,
            val_fraction=0.05,
            test_fraction=0.05,
            seed=0,
        )
