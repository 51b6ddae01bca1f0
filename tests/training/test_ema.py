"""The weight average of training/ema.py: what it averages and what it leaves alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.ema import WeightAverage


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_average_moves_a_fraction_toward_the_current_weights() -> None:
    net = _net()
    average = WeightAverage(net, decay=0.9)
    before = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    d = average.current_decay()
    average.update(net)
    expected = d * before + (1 - d) * (before + 1.0)
    assert torch.allclose(average.model[0].weight, expected)
    assert not torch.allclose(average.model[0].weight, net[0].weight)


def test_decay_ramps_up_to_its_ceiling() -> None:
    average = WeightAverage(_net(), decay=0.99)
    first = average.current_decay()
    for _ in range(2000):
        average.updates += 1
    assert first == pytest.approx(0.1)
    assert average.current_decay() == pytest.approx(0.99)


def test_batchnorm_statistics_are_averaged_and_counters_copied() -> None:
    net = _net()
    average = WeightAverage(net, decay=0.5)
    net.train()
    net(torch.randn(16, 3) * 5 + 3)  # moves running_mean away from 0, counts one batch
    average.update(net)
    d = 0.1  # the first update's decay
    assert torch.allclose(average.model[1].running_mean, (1 - d) * net[1].running_mean)
    assert int(average.model[1].num_batches_tracked) == 1


def test_state_round_trip_and_bad_decay() -> None:
    net = _net()
    average = WeightAverage(net, decay=0.9)
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    average.update(net)
    restored = WeightAverage(_net(), decay=0.9)
    restored.load_state(average.state())
    assert restored.updates == 1
    assert torch.equal(restored.model[0].weight, average.model[0].weight)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(net, decay=1.0)
