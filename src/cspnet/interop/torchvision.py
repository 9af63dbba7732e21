"""torchvision state dicts -> cspnet models.

ResNets (``resnet50``, ``resnext50_32x4d`` -> ``resnet50_tv``, ``resnext50_tv``)::

    conv1, bn1                      stem.0.conv, stem.0.bn
    layerL.j.convK, layerL.j.bnK    stages.(L-1).blocks.j.convK.conv / .bn
    layerL.j.downsample.0 / .1      stages.(L-1).blocks.j.shortcut.conv / .bn
    fc                              head.fc
"""
from __future__ import annotations

from . import Conversion, Preprocess, StateDict, rename_keys

# torchvision's IMAGENET1K_V1 eval transform: resize 256, centre crop 224, bilinear.
_IMAGENET1K_V1 = Preprocess(input_size=224, crop_pct=0.875, interpolation="bilinear")


def _layer(m) -> str:
    return str(int(m.group(1)) - 1)


_RESNET_RULES = (
    (r"^conv1\.", "stem.0.conv."),
    (r"^bn1\.", "stem.0.bn."),
    (r"^layer(\d)\.(\d+)\.conv(\d)\.", lambda m: f"stages.{_layer(m)}.blocks.{m.group(2)}.conv{m.group(3)}.conv."),
    (r"^layer(\d)\.(\d+)\.bn(\d)\.", lambda m: f"stages.{_layer(m)}.blocks.{m.group(2)}.conv{m.group(3)}.bn."),
    (r"^layer(\d)\.(\d+)\.downsample\.0\.", lambda m: f"stages.{_layer(m)}.blocks.{m.group(2)}.shortcut.conv."),
    (r"^layer(\d)\.(\d+)\.downsample\.1\.", lambda m: f"stages.{_layer(m)}.blocks.{m.group(2)}.shortcut.bn."),
    (r"^fc\.", "head.fc."),
)


def convert_resnet(state: StateDict) -> StateDict:
    return rename_keys(state, _RESNET_RULES, "torchvision ResNet state dict")


CONVERSIONS = (
    Conversion("torchvision", "resnet50", "resnet50_tv", convert_resnet, _IMAGENET1K_V1),
    Conversion("torchvision", "resnext50_32x4d", "resnext50_tv", convert_resnet, _IMAGENET1K_V1),
)
