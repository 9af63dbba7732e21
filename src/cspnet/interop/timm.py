"""timm ``cspnet.py`` state dicts -> the ``*_timm`` models (`cspnet.models.timm_variants`).

Key correspondence (timm -> cspnet)::

    stem.conv1.{conv,bn}            stem.0.* (stem with max-pool) / stem.* (darknets)
    stages.i.conv_down              stages.i.down
    stages.i.conv_exp               stages.i.base          (the shared 1x1 expansion)
    stages.i.blocks.j.convK         stages.i.blocks.j.convK
    stages.i.conv_transition_b      stages.i.partial_transition
    stages.i.conv_transition        stages.i.transition    (input halves swapped, see below)
    head.fc                         head.fc

The state dicts of timm's ``features_only=True`` models convert too: they name the stem and
stages ``stem_conv1`` / ``stages_i`` (FeatureListNet, FeatureHookNet) or ``model.stem.conv1`` /
``model.stages.i`` (FeatureGetterNet), and hold no head.

timm's stage concatenates ``[cross, blocks]`` and `CrossStage` ``[blocks, cross]``; both halves
are ``exp_chs // 2`` wide, so swapping the two halves of the transition conv's input channels
gives the same output.
"""
from __future__ import annotations

import re

import torch

from . import Conversion, Preprocess, StateDict, rename_keys

# timm's pretrained_cfg for the default tags (the ``ra_in1k`` weights, timm 1.0.31).
_RA_IN1K = Preprocess(input_size=256, crop_pct=0.887, interpolation="bilinear")
_C2NS_IN1K = Preprocess(input_size=256, crop_pct=0.887, interpolation="bicubic")

_TRANSITION_WEIGHT = re.compile(r"^stages\.\d+\.transition\.conv\.weight$")


def _rules(stem: str) -> tuple[tuple[str, str], ...]:
    # `[._]` and `model.`: the names of timm's features_only wrappers (module docstring)
    stage = r"^(?:model\.)?stages[._](\d+)\."
    return (
        (r"^(?:model\.)?stem[._]conv1\.", stem),
        (stage + r"conv_down\.", r"stages.\1.down."),
        (stage + r"conv_exp\.", r"stages.\1.base."),
        (stage + r"conv_transition_b\.", r"stages.\1.partial_transition."),
        (stage + r"conv_transition\.", r"stages.\1.transition."),
        (stage + r"blocks\.(\d+)\.(conv[123])\.", r"stages.\1.blocks.\2.\3."),
        (r"^head\.fc\.", "head.fc."),
    )


def _swap_input_halves(w: torch.Tensor) -> torch.Tensor:
    half = w.shape[1] // 2
    return torch.cat([w[:, half:], w[:, :half]], dim=1)


def _converter(stem: str, csp: bool):
    rules = _rules(stem)

    def convert(state: StateDict) -> StateDict:
        out = rename_keys(state, rules, "timm state dict")
        if csp:
            out = {k: _swap_input_halves(v) if _TRANSITION_WEIGHT.match(k) else v for k, v in out.items()}
        return out

    return convert


CONVERSIONS = (
    Conversion("timm", "cspresnet50", "cspresnet50_timm", _converter("stem.0.", csp=True), _RA_IN1K),
    Conversion("timm", "cspresnext50", "cspresnext50_timm", _converter("stem.0.", csp=True), _RA_IN1K),
    Conversion("timm", "cspdarknet53", "cspdarknet53_timm", _converter("stem.", csp=True), _RA_IN1K),
    Conversion("timm", "darknet53", "darknet53_timm", _converter("stem.", csp=False), _C2NS_IN1K),
)
