"""The Cross Stage Partial stage: the one place where CSPNet's idea lives.

::

    in ─ down ─ base ─┬─ cross (part 1) ────────────────────────────────────────┐
                      └─ main (part 2) ─ blocks ─ partial_transition ─ concat ─ transition ─ out

Every family (ResNet, ResNeXt, Darknet, DenseNet, PeleeNet, MobileNet-v2) builds its stages
from this class and only says which blocks go inside and how wide each part is.

Fusion strategies (paper Fig. 3):

- ``csp``          transition -> concat -> transition  (CSPDenseNet, the official cfgs)
- ``fusion_first`` concat -> transition                (no partial transition)
- ``fusion_last``  transition -> concat                (no transition after the concat)
- ``none``         base -> blocks (-> transition): the plain stage of the non-CSP twin

Split modes:

- ``conv``  two 1x1 convolutions read the same base map (the official cfgs: ``[route] layers=-2``)
- ``slice`` the base map's channels ``[0, γ·C)`` bypass the blocks and ``[γ·C, C)`` go through
  them (the paper's figure), each made contiguous before use

The base map is the stage input after ``down``, or the output of an optional ``base`` layer: timm's
CSP stages compute it with one shared 1x1 expansion conv and then ``slice`` it (see docs/interop.md).

γ (``part_ratio``) is the fraction of base channels that *bypass* the blocks, so computation
falls as γ grows (paper Table 1). The concat order is ``[block path, cross path]`` as in the cfgs.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal, get_args

import torch
from torch import nn

from .layers import ConvBnAct, canonical_act, contiguous_like, recomputable_cat

# torch.fx records these calls as single nodes: they decide by the tensors' memory format and the
# autograd mode at run time (FX wraps a function by its name in the calling module). A traced graph
# keeps the `memory_efficient` setting its stages had when it was traced.
torch.fx.wrap("contiguous_like")
torch.fx.wrap("recomputable_cat")

Fusion = Literal["csp", "fusion_first", "fusion_last", "none"]
Split = Literal["conv", "slice"]
FUSIONS: tuple[str, ...] = get_args(Fusion)
SPLITS: tuple[str, ...] = get_args(Split)

BlockFactory = Callable[[int], tuple[nn.Module, int]]
"""Given the width of part 2, build the stage's blocks and return ``(blocks, out_chs)``."""

ConvFactory = Callable[[int, int], nn.Module]
"""Given ``(in_chs, out_chs)``, build a 1x1 split or transition layer."""


def check_part_ratio(part_ratio: float) -> float:
    if not isinstance(part_ratio, (int, float)) or not 0.0 < float(part_ratio) < 1.0:
        raise ValueError(f"part_ratio (γ) must lie in (0, 1), got {part_ratio!r}")
    return float(part_ratio)


def check_fusion(fusion: str) -> str:
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {', '.join(FUSIONS)}")
    return fusion


class CrossStage(nn.Module):
    """One stage: optional downsampling, split into two parts, blocks on part 2, fusion.

    Args:
        base_chs: channels of the base layer (the output of ``down``, or the stage input).
        make_blocks: builds the blocks for a given input width (see ``BlockFactory``).
        down: module applied first (e.g. a 3x3 stride-2 conv); ``None`` for no downsampling.
        base: module applied after ``down`` that produces the ``base_chs``-wide base map (timm's
            shared 1x1 ``conv_exp``); ``None``: the base map is ``down``'s output or the input.
        fusion: ``csp`` | ``fusion_first`` | ``fusion_last`` | ``none``.
        split: ``conv`` | ``slice``.
        part_ratio: γ, the fraction of base channels that bypasses the blocks.
        cross_chs, main_chs: widths of parts 1 and 2 for the ``conv`` split (the cfgs give them
            explicitly; default from γ). For ``slice`` they follow from γ.
        split_act: activation of the two split convs (some cfg stages use ``linear``).
        partial_transition_chs: width of the partial transition (default: the blocks' width).
        transition_chs: width of the transition after the concat; ``None`` means there is none
            here (``fusion_last``, or a ``csp`` stage whose next layer is the transition, as in
            csresnet50.cfg). Required for ``fusion_first``.
        act: activation of the transition convs.
        conv_fn: factory for the 1x1 split/transition layers (default ConvBnAct 1x1 with ``act``).
        transition: a ready module to use as the transition (e.g. DenseNet's conv + avgpool);
            its output width must be given as ``transition_chs``.
        cross, main: ready modules for the two split layers of a ``conv`` split, used instead of
            1x1 convs (csmobilenet-v2.cfg splits with two strided depthwise convs); their output
            widths must be given as ``cross_chs`` and ``main_chs``.
    """

    memory_efficient = False  # `cspnet.layers.memory_efficient`: rebuild the concat in backward

    def __init__(
        self,
        base_chs: int,
        make_blocks: BlockFactory,
        *,
        down: nn.Module | None = None,
        base: nn.Module | None = None,
        fusion: Fusion = "csp",
        split: Split = "conv",
        part_ratio: float = 0.5,
        cross_chs: int | None = None,
        main_chs: int | None = None,
        split_act: str | None = None,
        partial_transition_chs: int | None = None,
        transition_chs: int | None = None,
        act: str = "leaky",
        conv_fn: ConvFactory | None = None,
        transition: nn.Module | None = None,
        cross: nn.Module | None = None,
        main: nn.Module | None = None,
    ):
        super().__init__()
        check_fusion(fusion)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        part_ratio = check_part_ratio(part_ratio)
        act = canonical_act(act)
        conv_fn = conv_fn or partial(ConvBnAct, kernel_size=1, act=act)
        self.fusion, self.split, self.part_ratio = fusion, split, part_ratio
        self.down = down
        self.base = base

        if (cross is not None or main is not None) and (
            fusion == "none" or split != "conv" or cross is None or main is None or cross_chs is None or main_chs is None
        ):
            raise ValueError("custom cross/main layers need a conv split, both modules and both cross_chs and main_chs")
        if fusion == "none":
            self.cross = self.main = None
            self.cross_chs, self.main_chs = 0, base_chs
        elif split == "slice":
            self.cross_chs = int(round(part_ratio * base_chs))
            self.main_chs = base_chs - self.cross_chs
            if self.cross_chs < 1 or self.main_chs < 1:
                raise ValueError(f"part_ratio {part_ratio} leaves an empty part of a {base_chs}-channel base")
            self.cross = self.main = None
        else:
            self.cross_chs = cross_chs if cross_chs is not None else max(1, int(round(part_ratio * base_chs)))
            self.main_chs = main_chs if main_chs is not None else max(1, base_chs - self.cross_chs)
            split_fn = partial(ConvBnAct, kernel_size=1, act=canonical_act(split_act)) if split_act else conv_fn
            self.cross = cross if cross is not None else split_fn(base_chs, self.cross_chs)
            self.main = main if main is not None else split_fn(base_chs, self.main_chs)

        self.blocks, blocks_out = make_blocks(self.main_chs)

        if fusion in ("csp", "fusion_last"):
            pt_chs = partial_transition_chs or blocks_out
            self.partial_transition = conv_fn(blocks_out, pt_chs)
        else:
            pt_chs = blocks_out
            self.partial_transition = None

        fused_chs = pt_chs if fusion == "none" else pt_chs + self.cross_chs
        if fusion == "fusion_first" and transition_chs is None and transition is None:
            raise ValueError("fusion_first needs a transition after the concat (transition_chs)")
        if fusion == "fusion_last" and (transition_chs is not None or transition is not None):
            raise ValueError("fusion_last has no transition after the concat")
        if transition is not None:
            if transition_chs is None:
                raise ValueError("give transition_chs with a custom transition module")
            self.transition = transition
        else:
            self.transition = conv_fn(fused_chs, transition_chs) if transition_chs else None
        self.out_chs = transition_chs if self.transition is not None else fused_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down is not None:
            x = self.down(x)
        if self.base is not None:
            x = self.base(x)
        if self.fusion == "none":
            x = self.blocks(x)
            return self.transition(x) if self.transition is not None else x
        if self.split == "slice":
            cross = contiguous_like(x[:, : self.cross_chs], x)
            main = contiguous_like(x[:, self.cross_chs :], x)
        else:
            cross, main = self.cross(x), self.main(x)
        main = self.blocks(main)
        if self.partial_transition is not None:
            main = self.partial_transition(main)
        x = recomputable_cat([main, cross], dim=1, memory_efficient=self.memory_efficient)
        return self.transition(x) if self.transition is not None else x
