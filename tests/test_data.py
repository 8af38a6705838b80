import pytest

from benchmark.data import load_images, subset


def test_fashion_mnist_offline_padded_to_32():
    ds = load_images("fashion_mnist", "test", 32)
    assert ds.images.shape == (10000, 1, 32, 32) and ds.images.dtype.is_floating_point is False
    assert ds.num_classes == 10 and int(ds.labels.max()) == 9
    assert int(ds.images[:, :, :2].max()) == 0  # zero padding rows
    x = ds.float_batch(subset(ds, 5).labels.new_tensor([0, 1]))
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_mnist_offline():
    ds = load_images("mnist", "train", 32)
    assert ds.images.shape == (60000, 1, 32, 32)


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="fashion_mnist"):
        load_images("cifar10", "train")
    with pytest.raises(ValueError, match="split"):
        load_images("mnist", "val")


def test_subset_is_deterministic():
    ds = load_images("fashion_mnist", "test", 32)
    assert (subset(ds, 50, seed=1).labels == subset(ds, 50, seed=1).labels).all()
