"""torchvision state dicts -> cspnet models.

ResNets (``resnet50``, ``resnext50_32x4d`` -> ``resnet50_tv``, ``resnext50_tv``)::

    conv1, bn1                      stem.0.conv, stem.0.bn
    layerL.j.convK, layerL.j.bnK    stages.(L-1).blocks.j.convK.conv / .bn
    layerL.j.downsample.0 / .1      stages.(L-1).blocks.j.shortcut.conv / .bn
    fc                              head.fc

DenseNets (``densenet121/169/201`` -> cspnet's ``densenet121/169/201``, which hold
torchvision's modules one for one)::

    features.conv0, features.norm0              stem.0.conv, stem.0.bn
    features.denseblockB.denselayerL.X          stages.(B-1).blocks.layers.(L-1).X
    features.transitionT.{norm,conv}            stages.(T-1).transition.{norm,conv}
    features.norm5                              stages.3.transition.norm
    classifier                                  head.fc

torchvision's own DenseNet weight files predate its current module names (``norm.1`` for
``norm1``); those keys are accepted too. Its published DenseNet and ResNet files also predate
BatchNorm's ``num_batches_tracked`` buffers, which `cspnet.weights.load_into` fills in as torch does.
"""
from __future__ import annotations

from . import Conversion, Preprocess, StateDict, rename_keys

# torchvision's IMAGENET1K_V1 eval transform: resize 256, centre crop 224, bilinear.
_IMAGENET1K_V1 = Preprocess(input_size=224, crop_pct=0.875, interpolation="bilinear")


def _index(group: str) -> str:
    # torchvision counts layers / blocks from 1, cspnet's stages from 0
    return str(int(group) - 1)


_RESNET_RULES = (
    (r"^conv1\.", "stem.0.conv."),
    (r"^bn1\.", "stem.0.bn."),
    (r"^layer(\d)\.(\d+)\.conv(\d)\.", lambda m: f"stages.{_index(m.group(1))}.blocks.{m.group(2)}.conv{m.group(3)}.conv."),
    (r"^layer(\d)\.(\d+)\.bn(\d)\.", lambda m: f"stages.{_index(m.group(1))}.blocks.{m.group(2)}.conv{m.group(3)}.bn."),
    (r"^layer(\d)\.(\d+)\.downsample\.0\.", lambda m: f"stages.{_index(m.group(1))}.blocks.{m.group(2)}.shortcut.conv."),
    (r"^layer(\d)\.(\d+)\.downsample\.1\.", lambda m: f"stages.{_index(m.group(1))}.blocks.{m.group(2)}.shortcut.bn."),
    (r"^fc\.", "head.fc."),
)


def convert_resnet(state: StateDict) -> StateDict:
    return rename_keys(state, _RESNET_RULES, "torchvision ResNet state dict")


_DENSENET_RULES = (
    (r"^features\.conv0\.", "stem.0.conv."),
    (r"^features\.norm0\.", "stem.0.bn."),
    (r"^features\.denseblock(\d)\.denselayer(\d+)\.(norm|conv)\.?([12])\.",
     lambda m: f"stages.{_index(m.group(1))}.blocks.layers.{_index(m.group(2))}.{m.group(3)}{m.group(4)}."),
    (r"^features\.transition(\d)\.", lambda m: f"stages.{_index(m.group(1))}.transition."),
    (r"^features\.norm5\.", "stages.3.transition.norm."),
    (r"^classifier\.", "head.fc."),
)


def convert_densenet(state: StateDict) -> StateDict:
    return rename_keys(state, _DENSENET_RULES, "torchvision DenseNet state dict")


CONVERSIONS = (
    Conversion("torchvision", "resnet50", "resnet50_tv", convert_resnet, _IMAGENET1K_V1),
    Conversion("torchvision", "resnext50_32x4d", "resnext50_tv", convert_resnet, _IMAGENET1K_V1),
    *(Conversion("torchvision", n, n, convert_densenet, _IMAGENET1K_V1) for n in ("densenet121", "densenet169", "densenet201")),
)
