"""The trainer's in-memory batches (usnet.train.data.TensorBatches) are the DataLoader's batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from usnet.train.config import load_config
from usnet.train.data import FashionMNIST, TensorBatches, as_tensors
from usnet.train.trainer import Trainer

FASHION = Path(__file__).resolve().parents[2] / "configs" / "fashion_mnist.yaml"


def loader_batches(dataset, sampler, batch_size):
    return list(DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True))


@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2)])
def test_tensor_batches_equal_the_data_loader(rank, world):
    data = FashionMNIST(train=True, limit=300)
    sampler = DistributedSampler(
        data, num_replicas=world, rank=rank, shuffle=True, seed=5, drop_last=True
    )
    sampler.set_epoch(3)
    expected = loader_batches(data, sampler, 32 // world)
    got = list(TensorBatches(*as_tensors(data), list(sampler), 32 // world))
    assert (
        len(got)
        == len(expected)
        == len(TensorBatches(*as_tensors(data), list(sampler), 32 // world))
    )
    for (xi, yi), (xe, ye) in zip(got, expected):
        assert torch.equal(xi, xe) and torch.equal(yi, ye)


def test_a_subset_gives_its_items_in_its_order():
    data = FashionMNIST(train=True, limit=50)
    subset = torch.utils.data.Subset(data, [7, 3, 41, 0])
    images, labels = as_tensors(subset)
    for i, (x, y) in enumerate(subset):
        assert torch.equal(images[i], x) and int(labels[i]) == y
    assert (
        as_tensors(torch.utils.data.Subset(torch.utils.data.TensorDataset(torch.zeros(2, 1)), [0]))
        is None
    )


def test_augmented_or_transformed_data_stays_per_item():
    assert as_tensors(FashionMNIST(train=True, limit=10, transform=lambda x: x)) is None
    assert as_tensors(torch.utils.data.TensorDataset(torch.zeros(2, 1))) is None  # no tensors()


def test_trainer_slices_in_memory_data_like_its_loader(tmp_path):
    config = load_config(FASHION, ["data.limit_train=256", "batch_size=64", "epochs=1"])
    trainer = Trainer(config, tmp_path / "run", progress=False, log=lambda s: None)
    batches = trainer.train_loader(2)
    assert isinstance(batches, TensorBatches)
    sampler = DistributedSampler(trainer.train_set, num_replicas=1, rank=0, shuffle=True,
                                 seed=config.seed * 100_003, drop_last=True)  # fmt: skip
    sampler.set_epoch(2)
    expected = loader_batches(trainer.train_set, sampler, 64)
    assert len(list(batches)) == len(expected) == 4
    for (xi, yi), (xe, ye) in zip(batches, expected):
        assert torch.equal(xi, xe) and torch.equal(yi, ye)
    augmented = Trainer(load_config(FASHION, ["data.limit_train=256", "data.augment=true"]),
                        tmp_path / "aug", progress=False, log=lambda s: None)  # fmt: skip
    assert isinstance(augmented.train_loader(0), DataLoader)
