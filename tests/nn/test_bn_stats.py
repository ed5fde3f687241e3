"""The BatchNorm statistics component: typed store and calibration, snapshot/restore,
serialization, and the migration of layers pickled by earlier versions."""

import pickle

import torch
from usnet_testing import tiny_slimmable

import usnet
from usnet.nn import bn_stats
from usnet.nn.bn_stats import Calibration, WidthStats
from usnet.nn.norm import SlimmableBatchNorm2d


def bns(model):
    return [m for m in model.modules() if isinstance(m, SlimmableBatchNorm2d)]


def test_layers_pickled_with_the_positional_calibration_list_migrate():
    bn = SlimmableBatchNorm2d(4)
    mean, var = torch.randn(4), torch.rand(4) + 0.5
    # What an earlier usnet pickled: a plain dict store and the list [mean, var, batches, distributed].
    bn.__dict__["width_stats"] = {"k2": (mean[:2], var[:2])}
    bn.__dict__["_calibration"] = [mean.clone(), var.clone(), 3, False]
    restored = pickle.loads(pickle.dumps(bn))
    assert isinstance(restored.width_stats, WidthStats) and torch.equal(
        restored.width_stats["k2"][0], mean[:2]
    )
    assert isinstance(restored._calibration, Calibration) and restored._calibration.batches == 3
    assert (
        torch.equal(restored._calibration.mean, mean) and restored._calibration.distributed is False
    )


def test_snapshot_restore_puts_back_every_layers_statistics():
    model = tiny_slimmable()
    images = [torch.randn(8, 3, 8, 8)]
    usnet.calibrate(model, images, [0.5, 1.0], num_images=8, progress=False)
    before = {id(bn): (dict(bn.width_stats), bn.running_mean.clone()) for bn in bns(model)}
    saved = bn_stats.snapshot(model)
    usnet.calibrate(
        model, [torch.randn(8, 3, 8, 8) * 3 + 1], [0.25, 0.5, 1.0], num_images=8, progress=False
    )
    bn_stats.restore(model, saved, keep_new=[])
    for bn in bns(model):
        width_stats, running_mean = before[id(bn)]
        assert bn.width_stats.keys() == width_stats.keys()
        assert all(torch.equal(bn.width_stats[k][0], width_stats[k][0]) for k in width_stats)
        assert torch.equal(bn.running_mean, running_mean)


def test_serialize_round_trip_onto_another_model():
    model = tiny_slimmable()
    usnet.calibrate(model, [torch.randn(8, 3, 8, 8)], [0.25, 0.5], num_images=8, progress=False)
    entries = bn_stats.serialize(model)
    assert entries and all(
        t.device.type == "cpu" for e in entries.values() for m_v in e.values() for t in m_v
    )
    other = tiny_slimmable()
    bn_stats.load_serialized(other, entries)
    for a, b in zip(bns(model), bns(other)):
        assert a.width_stats.keys() == b.width_stats.keys()
        assert all(torch.equal(a.width_stats[k][1], b.width_stats[k][1]) for k in a.width_stats)
