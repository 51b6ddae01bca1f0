"""Exponential moving average of a model's weights (Polyak averaging).

Why: the validation set of a fold is small (120 utterances) and the
validation UAR of the raw weights swings by +/-5 points from one epoch to the
next (runs/cv3 logs of v0.2.0). An average of the recent weights is a cheap
ensemble of them and steadier to select an epoch on. Measured here it did
not raise test UAR: on CV folds 1-2 (30 epochs) it scored 64.5 / 68.0 against
64.8 / 71.9 without it (models/README.md); the longer schedule was the gain.
It costs one copy of the weights and nothing at inference.

Batch-norm running statistics are averaged the same way, so the averaged
weights are used with statistics that match them.
"""

from __future__ import annotations

import copy
from typing import Generic, TypeVar

import torch
from torch import nn

__all__ = ["WeightAverage"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class WeightAverage(Generic[ModuleT]):
    """``average = d * average + (1 - d) * current`` after every optimiser step.

    ``d`` ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates,
    so early averages are not dominated by the random initial weights.
    """

    def __init__(self, model: ModuleT, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"weight-average decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        averaged = self.model.state_dict()
        for name, value in model.state_dict().items():
            target = averaged[name]
            if value.dtype.is_floating_point:
                target.mul_(d).add_(value.detach(), alpha=1.0 - d)
            else:  # counters such as BatchNorm's num_batches_tracked
                target.copy_(value)
        self.updates += 1

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
