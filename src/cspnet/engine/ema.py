"""Exponential moving average of model weights (Polyak averaging), with YOLOv5's ramp of the decay."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """A shadow copy of a model whose floating-point state follows ``decay * ema + (1 - decay) * model``.

    The effective decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the
    average is not dominated by the random initial weights in short runs. BN running statistics
    are averaged like the weights; integer buffers (``num_batches_tracked``) are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        own, new = self.module.state_dict(), model.state_dict()
        floats = [key for key, value in own.items() if value.dtype.is_floating_point]
        others = [key for key, value in own.items() if not value.dtype.is_floating_point]
        # one fused call per kind instead of two kernels per tensor: the loop cost 4-7 % of a training step
        if floats:  # the fused calls refuse empty lists
            torch._foreach_lerp_([own[k] for k in floats], [new[k] for k in floats], 1 - d)
        if others:
            torch._foreach_copy_([own[k] for k in others], [new[k] for k in others])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "weights": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["weights"])
