import gzip
import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mlpipe import datasets
from mlpipe.sample import ANNOTATORS


def _tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def _manifest(root):
    return pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)


def _unanimous_counts(frame):
    votes = frame[list(ANNOTATORS)]
    return frame.loc[votes.nunique(axis=1).eq(1) & votes.ne("").all(axis=1), ANNOTATORS[0]].value_counts()


def _write_idx(path, array, type_code=0x08, compress=True):
    array = np.asarray(array)
    header = bytes([0, 0, type_code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    raw = header + array.astype(datasets._IDX_TYPES[type_code]).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.fixture(scope="module")
def fake_fashion(tmp_path_factory):
    """Debian's file names and IDX format; 200 random 28x28 images per class."""
    folder = tmp_path_factory.mktemp("fashion-mnist")
    rng = np.random.default_rng(1)
    labels = rng.permutation(np.repeat(np.arange(10), 200)).astype(np.uint8)
    images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    _write_idx(folder / "train-images-idx3-ubyte.gz", images)
    _write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    return folder, images, labels


# --- IDX ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("type_code", "compress"), [(0x08, True), (0x08, False), (0x0C, True), (0x0D, False)])
def test_read_idx_returns_the_array_written(tmp_path, type_code, compress):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4) - (5 if type_code != 0x08 else 0)
    path = _write_idx(tmp_path / ("a.idx.gz" if compress else "a.idx"), array, type_code, compress)
    read = datasets.read_idx(path)
    assert read.shape == (2, 3, 4) and read.dtype.isnative
    assert np.array_equal(read, array)


def test_read_idx_refuses_a_wrong_magic_and_a_short_file(tmp_path):
    (tmp_path / "text.idx").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        datasets.read_idx(tmp_path / "text.idx")
    good = _write_idx(tmp_path / "good.idx", np.zeros((4, 5), np.uint8), compress=False)
    (tmp_path / "short.idx").write_bytes(good.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"needs 20 bytes of data, the file has 17"):
        datasets.read_idx(tmp_path / "short.idx")


def test_load_fashion_mnist_names_the_package_when_absent(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        datasets.load_fashion_mnist(directory=tmp_path)


def test_load_fashion_mnist_reads_debians_file_names(fake_fashion):
    folder, images, labels = fake_fashion
    read_images, read_labels = datasets.load_fashion_mnist("train", folder)
    assert np.array_equal(read_images, images) and np.array_equal(read_labels, labels)


# --- Fashion-MNIST subsets ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [600, 3000, 10000, 7])
def test_class_counts_sum_to_n_balanced_or_long_tailed(n):
    balanced = datasets.class_counts(n, "balanced")
    assert sum(balanced) == n and max(balanced) - min(balanced) <= 1
    tail = datasets.class_counts(n, "long_tailed")
    assert sum(tail) == n and tail == sorted(tail, reverse=True)
    if n >= 600:
        assert tail[-1] / tail[0] == pytest.approx(datasets.LONG_TAIL_RAREST, abs=0.01)


def test_fashion_subset_refuses_more_images_than_a_class_has(fake_fashion, tmp_path):
    with pytest.raises(ValueError, match=r"too few Fashion-MNIST images for 2100 balanced: .* needs 210, has 200"):
        datasets.write_fashion_mnist(tmp_path / "f", 2100, "balanced", directory=fake_fashion[0])


def test_fashion_subset_is_deterministic_per_seed(fake_fashion, tmp_path):
    folder = fake_fashion[0]
    first = datasets.write_fashion_mnist(tmp_path / "a", 200, "long_tailed", seed=3, directory=folder)
    again = datasets.write_fashion_mnist(tmp_path / "b", 200, "long_tailed", seed=3, directory=folder)
    other = datasets.write_fashion_mnist(tmp_path / "c", 200, "long_tailed", seed=4, directory=folder)
    assert _tree_digest(first) == _tree_digest(again) != _tree_digest(other)


@pytest.mark.parametrize("profile", ["balanced", "long_tailed"])
def test_fashion_subset_has_the_documented_counts_taggers_and_pixels(fake_fashion, tmp_path, profile):
    folder, images, labels = fake_fashion
    root = datasets.write_fashion_mnist(tmp_path / "f", 600, profile, directory=folder)
    frame = _manifest(root)
    assert len(frame) == 600
    assert {"image", "subject_id", "name", "email", "phone", "date_of_birth", "note", *datasets.TAGGERS} == set(frame.columns)
    assert set(datasets.FASHION_OVERRIDES["anonymize.policy"]) == set(frame.columns) - {"image"}
    assert sorted(frame["tagger_1"].value_counts().tolist(), reverse=True) == datasets.class_counts(600, profile)
    assert set(frame["tagger_1"]) <= set(datasets.FASHION_CLASSES)
    disagree = frame["tagger_1"].ne(frame["tagger_2"]).mean()
    assert 0.01 <= disagree <= 0.06
    assert frame["subject_id"].value_counts().max() >= 3 and frame["image"].is_unique
    # the pixels are the dataset's, unchanged, under the first tagger's (true) class
    for _, item in frame.sample(20, random_state=0).iterrows():
        pixels = np.asarray(Image.open(root / item["image"]))
        match = np.flatnonzero((images == pixels).all(axis=(1, 2)))
        assert len(match) == 1 and datasets.FASHION_CLASSES[labels[match[0]]] == item["tagger_1"]


# --- the sample's variants ---------------------------------------------------------------------------


def test_variants_are_deterministic_per_seed(tmp_path):
    first = datasets.write_digits_noisy(tmp_path / "a", seed=1)
    assert _tree_digest(first) == _tree_digest(datasets.write_digits_noisy(tmp_path / "b", seed=1))
    assert _tree_digest(first) != _tree_digest(datasets.write_digits_noisy(tmp_path / "c", seed=2))


def test_digits_8_nearest_is_the_sample_itself(tmp_path, sample_root):
    assert _tree_digest(datasets.write_digits_upscaled(tmp_path / "d8", 8, "nearest")) == _tree_digest(sample_root)


def test_upscales_are_the_samples_scans_at_n_px(tmp_path, sample_root):
    nearest = datasets.write_digits_upscaled(tmp_path / "n", 32, "nearest")
    bilinear = datasets.write_digits_upscaled(tmp_path / "b", 32, "bilinear")
    frame = _manifest(sample_root)
    assert _manifest(nearest).equals(frame) and _manifest(bilinear).equals(frame)  # same rows, votes, people
    for path in frame["image"].iloc[:30]:
        small = np.asarray(Image.open(sample_root / path))
        big_nearest, big_bilinear = np.asarray(Image.open(nearest / path)), np.asarray(Image.open(bilinear / path))
        assert big_nearest.shape == big_bilinear.shape == (32, 32)
        assert np.array_equal(big_nearest, np.kron(small, np.ones((4, 4), np.uint8)))  # 4x4 blocks
        assert abs(float(big_bilinear.mean()) - float(small.mean())) < 12
    assert not np.array_equal(big_bilinear, big_nearest)


def test_long_tailed_variant_keeps_5_percent_of_the_rarest_digit(tmp_path, sample_root):
    counts = _unanimous_counts(_manifest(datasets.write_digits_long_tailed(tmp_path / "lt")))
    assert counts.index[0] == "0" and counts.idxmin() == "9"
    assert counts.min() <= 0.08 * counts.max()  # unanimous items only, so about 5% give or take a few votes
    sample = _unanimous_counts(_manifest(sample_root))
    assert counts.min() / counts.max() < 0.5 * sample.min() / sample.max()


def test_noisy_variant_disagrees_about_four_times_as_often(tmp_path, sample_root):
    def disagreement(frame):
        votes = frame[list(ANNOTATORS)]
        labelled = votes.ne("").all(axis=1)
        return votes[labelled].nunique(axis=1).gt(1).mean()

    noisy, sample = _manifest(datasets.write_digits_noisy(tmp_path / "noisy")), _manifest(sample_root)
    assert 0.32 <= disagreement(noisy) <= 0.48 and disagreement(sample) <= 0.15
    assert len(noisy) == len(sample)  # the same items, only the votes differ
    three_way = noisy[list(ANNOTATORS)].nunique(axis=1).eq(3).mean()
    assert 0.03 <= three_way <= 0.08


def test_the_generator_refuses_bad_knobs(tmp_path):
    from mlpipe.sample import write_digits

    with pytest.raises(ValueError, match="ten shares"):
        write_digits(tmp_path / "x", keep=(1.0,) * 9)
    with pytest.raises(ValueError, match="at least 8"):
        write_digits(tmp_path / "x", size=4)
