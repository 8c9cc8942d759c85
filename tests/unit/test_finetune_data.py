"""finetune/data.py + splits.py: the three readers, the splits, and the errors they give."""
import gzip
import struct

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from vfm.finetune.data import DataError, open_dataset, read_idx_file
from vfm.finetune.splits import make_splits

FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return (x * 255 / 16).astype(np.uint8).reshape(-1, 8, 8), y


def write_folder(root, images, labels, names=None):
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / (names[label] if names else f"digit{label}")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.png")
    return root


def write_idx(path, array):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_debians_fashion_mnist_reads_as_installed():
    data = open_dataset(f"idx:{FASHION}")
    assert len(data) == 70000 and data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"
    assert np.bincount(data.given_split).tolist() == [60000, 0, 10000]
    assert np.bincount(data.labels[data.given_split == 2]).tolist() == [1000] * 10
    image = data.source.load(0)
    assert image.shape == (28, 28, 3) and image.dtype == np.uint8
    splits = make_splits(data, (0.8, 0.1, 0.1), seed=0, limit=700)
    # test keeps the data's own t10k share (1/7); val is carved out of train's 60 per class at
    # 0.1 / (0.8 + 0.1) = 6.67 -> 7 per class
    assert splits.counts() == {"train": 530, "val": 70, "test": 100}
    assert set(np.unique(data.given_split[splits.test])) == {2}
    assert np.bincount(data.labels[splits.test]).tolist() == [10] * 10


def test_idx_files_written_here_with_class_names(tmp_path, digits):
    images, labels = digits
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images[:1500])
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels[:1500].astype(np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[1500:])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[1500:].astype(np.uint8))
    (tmp_path / "classes.txt").write_text("\n".join(f"n{i}" for i in range(10)))
    data = open_dataset(f"idx:{tmp_path}")
    assert data.classes == tuple(f"n{i}" for i in range(10)) and len(data) == len(labels)
    np.testing.assert_array_equal(data.source.load(1600)[:, :, 0], images[1600])


def test_a_truncated_idx_file_is_a_clear_error(tmp_path):
    raw = gzip.decompress(open(f"{FASHION}/t10k-labels-idx1-ubyte.gz", "rb").read())
    (tmp_path / "cut").write_bytes(raw[:-10])
    with pytest.raises(DataError, match="truncated or damaged"):
        read_idx_file(tmp_path / "cut")
    (tmp_path / "junk").write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(DataError, match="bad magic"):
        read_idx_file(tmp_path / "junk")


def test_image_folder_splits_are_stratified_and_seeded(tmp_path, digits):
    images, labels = digits
    data = open_dataset(str(write_folder(tmp_path / "d", images[:600], labels[:600])))
    assert data.classes == tuple(f"digit{i}" for i in range(10)) and data.given_split is None
    a, b = make_splits(data, (0.6, 0.2, 0.2), seed=1), make_splits(data, (0.6, 0.2, 0.2), seed=1)
    c = make_splits(data, (0.6, 0.2, 0.2), seed=2)
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a.items(), b.items()))
    assert not np.array_equal(a.test, c.test)
    assert len(np.intersect1d(a.train, a.test)) == 0 and len(a.union()) == 600
    for part, share in ((a.train, 0.6), (a.val, 0.2), (a.test, 0.2)):
        per_class = np.bincount(data.labels[part], minlength=10)
        expected = np.bincount(data.labels, minlength=10) * share
        assert np.all(np.abs(per_class - expected) <= 1)  # each class in the same proportion


def test_limit_keeps_class_proportions(tmp_path, digits):
    images, labels = digits
    data = open_dataset(str(write_folder(tmp_path / "d", images[:800], labels[:800])))
    splits = make_splits(data, (0.8, 0.1, 0.1), seed=0, limit=200)
    assert sum(splits.counts().values()) == 200
    assert np.bincount(data.labels[splits.union()], minlength=10).min() >= 19


def test_image_folder_with_its_own_train_and_test(tmp_path, digits):
    images, labels = digits
    write_folder(tmp_path / "d" / "train", images[:300], labels[:300])
    write_folder(tmp_path / "d" / "test", images[300:400], labels[300:400])
    data = open_dataset(str(tmp_path / "d"))
    assert data.given_splits() == {"train", "test"} and len(data) == 400
    splits = make_splits(data, (0.8, 0.1, 0.1), seed=0)
    assert len(splits.test) == 100 and set(splits.val) <= set(np.flatnonzero(data.given_split == 0))


def test_a_label_seen_only_in_test_is_an_error(tmp_path, digits):
    images, labels = digits
    write_folder(tmp_path / "d" / "train", images[:50], labels[:50] % 3)
    write_folder(tmp_path / "d" / "test", images[50:60], np.full(10, 7))
    with pytest.raises(DataError, match="'digit7' appears in the test split but never in train"):
        open_dataset(str(tmp_path / "d"))


def test_an_empty_class_folder_is_an_error(tmp_path, digits):
    images, labels = digits
    write_folder(tmp_path / "d", images[:20], labels[:20] % 2)
    (tmp_path / "d" / "empty").mkdir()
    (tmp_path / "d" / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="class 'empty' .* has no images"):
        open_dataset(str(tmp_path / "d"))


def test_csv_manifest_with_splits(tmp_path, digits):
    images, labels = digits
    write_folder(tmp_path / "img", images[:40], labels[:40] % 2, names=["cat", "dog"])
    rows = ["path,label,split"] + [f"img/{['cat', 'dog'][labels[i] % 2]}/{i}.png,{['cat', 'dog'][labels[i] % 2]},"
                                   f"{'test' if i >= 30 else 'train'}" for i in range(40)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n\n")
    data = open_dataset(str(tmp_path / "m.csv"))
    assert data.classes == ("cat", "dog") and data.given_splits() == {"train", "test"}
    np.testing.assert_array_equal(data.source.load(3)[:, :, 0], images[3])


@pytest.mark.parametrize("text,message", [
    ("file,class\na.png,x\n", "needs a header with columns path,label"),
    ("path,label,split\na.png,x,train\nb.png,y,holdout\n", "line 3: split is 'holdout'"),
    ("path,label\na.png,\n", "line 2: both path and label"),
    ("path,label,split\na.png,x,train\nb.png,y,test\n", "label 'y' appears in the test split but never in train"),
])
def test_csv_manifest_errors_name_the_line(tmp_path, text, message):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        open_dataset(str(tmp_path / "m.csv"))


def test_select_classes_renumbers(tmp_path, digits):
    images, labels = digits
    data = open_dataset(str(write_folder(tmp_path / "d", images[:100], labels[:100])))
    two = data.select_classes(["digit7", "digit1"])
    assert two.classes == ("digit7", "digit1") and set(two.labels) == {0, 1}
    assert len(two) == int(((labels[:100] == 7) | (labels[:100] == 1)).sum())
    with pytest.raises(DataError, match="no class 'digit42'"):
        data.select_classes(["digit42", "digit1"])
