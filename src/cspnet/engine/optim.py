"""Optimizers and learning-rate schedules (per optimizer step, as Darknet counts ``batches``).

The schedule is Darknet's: ``burn_in`` warm-up steps with ``lr * (n / burn_in) ** burn_in_power``
(the cfgs use power 4) where ``n = step + 1`` is Darknet's batch number (it counts an update once it
is done, so its first update already has a small rate, never 0), then ``cosine``, ``step``,
``poly`` (``lr * (1 - step / total) ** power``, power 4 in the official CSPNet classifier cfgs) or
``constant``. The decays count steps from 0, as torch's schedulers do (and equal them).

The warm-up is capped at half the run's steps (`capped_burn_in`): a fixed ``burn_in`` longer than a
short run would otherwise keep the whole run below ``lr``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SCHEDULES = ("cosine", "step", "poly", "constant")
OPTIMIZERS = ("sgd", "adamw")


def capped_burn_in(burn_in: int, total_steps: int) -> int:
    """The warm-up steps a run of ``total_steps`` takes: ``burn_in``, at most half the run."""
    return min(burn_in, total_steps // 2)


@dataclass(frozen=True)
class LrSchedule:
    """Multiplier of the base learning rate at optimizer step ``step`` (a `LambdaLR` lambda).

    A callable dataclass rather than a closure so that `LambdaLR.state_dict` stores its fields
    (plain numbers), which checkpoints keep as JSON. ``burn_in`` is the requested warm-up; the steps
    taken are derived from it (`capped_burn_in`), so a checkpoint records the option as given.
    """

    total_steps: int
    kind: str = "cosine"
    burn_in: int = 0
    burn_in_power: float = 4.0
    power: float = 4.0
    min_ratio: float = 0.0
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.kind!r}")
        if self.total_steps < 1 or self.burn_in < 0:
            raise ValueError(f"need total_steps >= 1 and burn_in >= 0, got {self.total_steps}, {self.burn_in}")

    @property
    def burn_in_steps(self) -> int:
        return capped_burn_in(self.burn_in, self.total_steps)

    def __call__(self, step: int) -> float:
        burn_in = self.burn_in_steps
        if step < burn_in:
            return ((step + 1) / burn_in) ** self.burn_in_power
        if self.kind == "constant":
            return 1.0
        if self.kind == "poly":  # Darknet: policy=poly counts from step 0, warm-up included
            return max(0.0, 1.0 - step / self.total_steps) ** self.power
        if self.kind == "step":
            return self.gamma ** sum(step >= m * self.total_steps for m in self.milestones)
        t = min(1.0, (step - burn_in) / max(1, self.total_steps - burn_in))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: conv / linear weights decay, BN parameters and biases (1-D tensors) do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    nesterov: bool = False) -> torch.optim.Optimizer:
    """SGD (momentum, optionally Nesterov) or AdamW, without weight decay on BN and biases."""
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
