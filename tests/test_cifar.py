"""Tests for cifar.py: archive round trips, pixel layout, refusals, normalisation, synthetic data.

Archives are tiny (a few images of 4x4 or 8x8 pixels) and written to pytest's tmp_path.
"""

import gzip
import io
import os
import pickle
import tarfile

import numpy as np
import pytest

import protocol
from apparatus import cifar_files as cifar
from apparatus import synthetic

# Normalised float64 data: mean 0 and std 1 up to rounding of sums over a few thousand values.
NORM_TOL_F64 = 1e-12
# float32 storage rounds each value to ~6e-8 relative; averages stay well below this.
NORM_TOL_F32 = 1e-6
# Training-set statistics of the float32 output differ from float64 only by float32 rounding.
F32_RTOL = 1e-6
N_PER_BATCH = 4  # tiny archives: 5 x 4 training images
N_TEST = 6
SIDE = 4  # 4x4 images keep the layout test readable
N_CLASSES = len(cifar.LABEL_NAMES)


def layout_value(n, channel, row, col):
    """The pixel value the layout test writes; distinct for every (channel, row, col)."""
    return (n * 7 + channel * 60 + row * SIDE + col) % 256


def layout_rows(n_images):
    """Rows in the official layout, built plane by plane: red H*W, then green, then blue."""
    rows = []
    for n in range(n_images):
        row = [
            layout_value(n, channel, row, col)
            for channel in range(3)  # planes: red, green, blue
            for row in range(SIDE)  # each plane row-major
            for col in range(SIDE)
        ]
        rows.append(row)
    return np.array(rows, dtype=np.uint8)  # (N, 3 * SIDE * SIDE)


@pytest.fixture
def layout_archive(tmp_path):
    """A .tar.gz with known pixel values and labels; returns (path, md5, train labels, test labels)."""
    n_train = 5 * N_PER_BATCH
    y_train = np.arange(n_train) % N_CLASSES
    y_test = (np.arange(N_TEST) * 3) % N_CLASSES
    path = tmp_path / cifar.ARCHIVE_NAME
    rows = layout_rows(n_train + N_TEST)
    md5 = synthetic.write_archive(path, rows[:n_train], y_train, rows[n_train:], y_test)
    return path, md5, y_train, y_test


@pytest.fixture
def synthetic_archive(tmp_path):
    """A small synthetic archive in its own folder; returns (path, md5)."""
    folder = tmp_path / "archive_dir"
    folder.mkdir()
    path = folder / cifar.ARCHIVE_NAME
    md5 = synthetic.write_synthetic_archive(path, N_PER_BATCH, N_TEST, np.random.default_rng(0), 8)
    return path, md5


def extract(archive, destination):
    """Extract with tarfile (independently of cifar.py); returns the cifar-10-batches-py folder."""
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(destination, filter="data")
    return destination / cifar.FOLDER_NAME


def assert_same_data(a, b):
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert a.label_names == b.label_names


def assert_refused(excinfo, *words):
    """The CifarError message is one line, names the problem and says where to get the data."""
    message = str(excinfo.value)
    assert "\n" not in message
    assert cifar.DOWNLOAD_URL in message and cifar.ENV_VAR in message
    for word in words:
        assert word in message


def test_pixel_layout_lands_at_n_row_col_channel(layout_archive):
    path, md5, y_train, y_test = layout_archive
    data = cifar.load_cifar10(path, expected_md5=md5)
    assert data.x_train.shape == (5 * N_PER_BATCH, SIDE, SIDE, 3)
    assert data.x_test.shape == (N_TEST, SIDE, SIDE, 3)
    assert data.x_train.dtype == np.uint8
    assert data.y_train.dtype == np.int64 and data.y_test.dtype == np.int64
    n_train = 5 * N_PER_BATCH
    for x, offset in ((data.x_train, 0), (data.x_test, n_train)):
        for n in range(x.shape[0]):
            for row in range(SIDE):
                for col in range(SIDE):
                    for channel in range(3):
                        expected = layout_value(n + offset, channel, row, col)
                        assert x[n, row, col, channel] == expected, (n, row, col, channel)
    np.testing.assert_array_equal(data.y_train, y_train)
    np.testing.assert_array_equal(data.y_test, y_test)
    assert data.label_names == cifar.LABEL_NAMES
    assert str(path) in data.source


def test_written_archive_follows_official_format(synthetic_archive):
    path, md5 = synthetic_archive
    assert md5 == cifar.file_md5(path)
    with tarfile.open(path, "r:gz") as tar:
        names = set(tar.getnames())
        members = {
            name.split("/")[-1]: tar.extractfile(name).read()
            for name in names
            if name.startswith(cifar.FOLDER_NAME + "/") and tar.getmember(name).isfile()
        }
    expected = {*cifar.TRAIN_MEMBERS, cifar.TEST_MEMBER, cifar.META_MEMBER}
    assert expected <= set(members)
    for name in expected:
        assert members[name][:2] == b"\x80\x02", name  # pickle protocol 2
    for name, n in [(m, N_PER_BATCH) for m in cifar.TRAIN_MEMBERS] + [(cifar.TEST_MEMBER, N_TEST)]:
        batch = pickle.loads(members[name], encoding="bytes")
        assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
        assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (n, 3 * 8 * 8)
        assert isinstance(batch[b"labels"], list) and len(batch[b"labels"]) == n
        assert all(type(label) is int for label in batch[b"labels"])
    meta = pickle.loads(members[cifar.META_MEMBER], encoding="bytes")
    assert meta[b"label_names"] == [name.encode() for name in cifar.LABEL_NAMES]


def test_archive_folder_parent_and_env_var_agree(synthetic_archive, tmp_path, monkeypatch):
    path, md5 = synthetic_archive
    from_archive = cifar.load_cifar10(path, expected_md5=md5)
    folder = extract(path, tmp_path / "extracted")
    from_parent_of_archive = cifar.load_cifar10(path.parent, expected_md5=md5)
    from_folder = cifar.load_cifar10(folder, expected_md5=None)
    from_parent_of_folder = cifar.load_cifar10(folder.parent)
    monkeypatch.setenv(cifar.ENV_VAR, str(path))
    from_env_archive = cifar.load_cifar10(expected_md5=md5)
    monkeypatch.setenv(cifar.ENV_VAR, str(folder))
    from_env_folder = cifar.load_cifar10()
    for other in (
        from_parent_of_archive,
        from_folder,
        from_parent_of_folder,
        from_env_archive,
        from_env_folder,
    ):
        assert_same_data(from_archive, other)
    assert from_archive.x_train.shape == (5 * N_PER_BATCH, 8, 8, 3)
    assert "archive" in from_env_archive.source and "folder" in from_env_folder.source


def test_synthetic_archive_equals_in_memory_and_is_deterministic(tmp_path):
    kwargs = dict(n_train_per_batch=N_PER_BATCH, n_test=N_TEST, image_size=8)
    md5s = []
    for name in ("a.tar.gz", "b.tar.gz"):
        rng = np.random.default_rng(5)
        md5s.append(synthetic.write_synthetic_archive(tmp_path / name, N_PER_BATCH, N_TEST, rng, 8))
    assert md5s[0] == md5s[1]
    loaded = cifar.load_cifar10(tmp_path / "a.tar.gz", expected_md5=md5s[0])
    assert_same_data(loaded, synthetic.load_synthetic(5, **kwargs))
    assert_same_data(synthetic.load_synthetic(5, **kwargs), synthetic.load_synthetic(5, **kwargs))
    other_seed = synthetic.load_synthetic(6, **kwargs)
    assert not np.array_equal(loaded.x_train, other_seed.x_train)


def test_load_synthetic_defaults_and_balanced_labels():
    data = synthetic.load_synthetic(image_size=4)
    assert data.x_train.shape == (5000, 4, 4, 3) and data.x_test.shape == (1000, 4, 4, 3)
    np.testing.assert_array_equal(np.bincount(data.y_train), np.full(N_CLASSES, 500))
    np.testing.assert_array_equal(np.bincount(data.y_test), np.full(N_CLASSES, 100))


@pytest.mark.parametrize("learnable", [True, False])
def test_synthetic_signal_is_learnable_only_when_asked(learnable):
    # Nearest class mean on the per-image mean colour: about 0.7 with the signal, 0.1 without.
    data = synthetic.load_synthetic(1, n_train_per_batch=100, n_test=500, learnable=learnable)
    colour_train = data.x_train.mean(axis=(1, 2))  # (N_train, C)
    colour_test = data.x_test.mean(axis=(1, 2))  # (N_test, C)
    centres = np.stack([colour_train[data.y_train == k].mean(0) for k in range(N_CLASSES)])
    distances = ((colour_test[:, None, :] - centres[None]) ** 2).sum(-1)  # (N_test, K)
    accuracy = np.mean(distances.argmin(1) == data.y_test)
    if learnable:
        assert accuracy > 0.5
    else:
        assert accuracy < 0.2  # chance 0.1; 500 test images give std 0.013


def test_md5_mismatch_refused(synthetic_archive):
    path, md5 = synthetic_archive
    with pytest.raises(cifar.CifarError) as excinfo:
        cifar.load_cifar10(path)  # default: the official md5
    assert_refused(excinfo, "md5", cifar.OFFICIAL_MD5, md5)


def test_missing_path_refused(tmp_path, monkeypatch):
    with pytest.raises(cifar.CifarError) as excinfo:
        cifar.load_cifar10(tmp_path / "nowhere")
    assert_refused(excinfo, "does not exist", "nowhere")
    with pytest.raises(cifar.CifarError) as excinfo:
        cifar.load_cifar10(tmp_path)  # a folder with neither archive nor extracted folder
    assert_refused(excinfo, "neither")
    monkeypatch.delenv(cifar.ENV_VAR, raising=False)
    with pytest.raises(cifar.CifarError) as excinfo:
        cifar.load_cifar10()
    assert_refused(excinfo, "not set")


def test_corrupt_archive_refused(synthetic_archive, tmp_path):
    path, md5 = synthetic_archive
    blob = path.read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(cifar.CifarError) as excinfo:
        cifar.load_cifar10(truncated, expected_md5=md5)
    assert_refused(excinfo, "md5")
    with pytest.raises(cifar.CifarError) as excinfo:
        cifar.load_cifar10(truncated, expected_md5=cifar.file_md5(truncated))
    assert_refused(excinfo, "corrupt archive")
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"this is not a gzip file" * 10)
    with pytest.raises(cifar.CifarError) as excinfo:
        cifar.load_cifar10(garbage, expected_md5=None)
    assert_refused(excinfo, "corrupt archive")


def test_missing_member_refused(synthetic_archive, tmp_path):
    path, _ = synthetic_archive
    folder = extract(path, tmp_path / "extracted")
    (folder / cifar.TEST_MEMBER).unlink()
    with pytest.raises(cifar.CifarError) as excinfo:
        cifar.load_cifar10(folder)
    assert_refused(excinfo, "missing member", cifar.TEST_MEMBER)

    without = tmp_path / "without.tar.gz"  # an archive lacking data_batch_3
    with tarfile.open(path, "r:gz") as source, tarfile.open(without, "w:gz") as target:
        for info in source:
            if not info.name.endswith("data_batch_3"):
                target.addfile(info, source.extractfile(info) if info.isfile() else None)
    with pytest.raises(cifar.CifarError) as excinfo:
        cifar.load_cifar10(without, expected_md5=cifar.file_md5(without))
    assert_refused(excinfo, "missing member", "data_batch_3")


def write_member(folder, member, obj):
    (folder / member).write_bytes(pickle.dumps(obj, protocol=2))


def test_corrupt_pickle_and_wrong_shapes_refused(synthetic_archive, tmp_path):
    path, _ = synthetic_archive
    folder = extract(path, tmp_path / "extracted")
    good = (folder / "data_batch_2").read_bytes()
    batch = pickle.loads(good, encoding="bytes")
    rows, labels = batch[b"data"], batch[b"labels"]
    cases = [
        (good[: len(good) // 2], "corrupt pickle"),
        ({**batch, b"data": rows[:, :100]}, "rows have length 100"),
        ({**batch, b"data": rows.astype(np.float32)}, "uint8"),
        ({**batch, b"labels": labels[:-1]}, "labels for"),
        ({**batch, b"labels": [N_CLASSES] + labels[1:]}, "labels outside"),
        ({b"data": rows}, "lacks b'data' or b'labels'"),
        ([1, 2, 3], "expected a dict"),
    ]
    for content, words in cases:
        if isinstance(content, bytes):
            (folder / "data_batch_2").write_bytes(content)
        else:
            write_member(folder, "data_batch_2", content)
        with pytest.raises(cifar.CifarError) as excinfo:
            cifar.load_cifar10(folder)
        assert_refused(excinfo, "data_batch_2", words)
    (folder / "data_batch_2").write_bytes(good)
    cifar.load_cifar10(folder)  # restored: loads again


def test_pickle_with_foreign_global_refused_without_running_it(synthetic_archive, tmp_path):
    path, _ = synthetic_archive
    folder = extract(path, tmp_path / "extracted")
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    write_member(folder, cifar.META_MEMBER, {b"label_names": [Payload()]})
    with pytest.raises(cifar.CifarError) as excinfo:
        cifar.load_cifar10(folder)
    assert_refused(excinfo, "corrupt pickle", "refusing global")
    assert not marker.exists()


def test_channel_stats_match_numpy_in_float64():
    x = np.random.default_rng(2).integers(0, 256, size=(7, 5, 3, 3), dtype=np.uint8)
    mean, std = protocol.channel_stats(x)
    reference = x.reshape(-1, 3).astype(np.float64) / 255.0  # (N*H*W, C)
    np.testing.assert_allclose(mean, reference.mean(0), rtol=1e-14)
    np.testing.assert_allclose(std, reference.std(0), rtol=1e-13)


def test_normalize_uses_train_statistics_for_both_sets():
    data = synthetic.load_synthetic(3, n_train_per_batch=20, n_test=50, image_size=8)
    # Shift and scale the test images so that their own statistics differ from the train ones.
    x_test = (data.x_test // 2 + 100).astype(np.uint8)
    data = protocol.CifarData(
        data.x_train, data.y_train, x_test, data.y_test, data.label_names, "t"
    )
    normed = protocol.normalize(data, dtype=np.float64)
    assert normed.x_train.dtype == np.float64 and normed.x_train.shape == data.x_train.shape
    np.testing.assert_allclose(normed.x_train.mean(axis=(0, 1, 2)), 0.0, atol=NORM_TOL_F64)
    np.testing.assert_allclose(normed.x_train.std(axis=(0, 1, 2)), 1.0, atol=NORM_TOL_F64)

    train = data.x_train.reshape(-1, 3).astype(np.float64) / 255.0  # (N*H*W, C)
    expected_test = (x_test.astype(np.float64) / 255.0 - train.mean(0)) / train.std(0)
    np.testing.assert_allclose(normed.x_test, expected_test, rtol=1e-12, atol=1e-12)
    assert np.all(np.abs(normed.x_test.std(axis=(0, 1, 2)) - 1.0) > 0.3)  # not its own stats
    np.testing.assert_array_equal(normed.y_test, data.y_test)

    normed32 = protocol.normalize(data, dtype=np.float32)
    assert normed32.x_train.dtype == np.float32 and normed32.x_test.dtype == np.float32
    np.testing.assert_allclose(normed32.x_test, expected_test, rtol=F32_RTOL, atol=F32_RTOL)
    train32 = normed32.x_train.astype(np.float64)
    np.testing.assert_allclose(train32.mean(axis=(0, 1, 2)), 0.0, atol=NORM_TOL_F32)
    np.testing.assert_allclose(train32.std(axis=(0, 1, 2)), 1.0, atol=NORM_TOL_F32)
    with pytest.raises(ValueError):
        protocol.normalize(data, dtype=np.int32)


def test_gzip_header_has_fixed_time(synthetic_archive):
    path, _ = synthetic_archive
    with open(path, "rb") as f:
        header = f.read(10)
    assert header[:2] == b"\x1f\x8b" and header[4:8] == b"\0\0\0\0"  # mtime 0
    with gzip.open(path) as gz:
        assert tarfile.open(fileobj=io.BytesIO(gz.read())).getnames()[0] == cifar.FOLDER_NAME
