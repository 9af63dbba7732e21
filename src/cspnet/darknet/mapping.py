"""Native models <-> Darknet weights.

The native models register their layers in the order the official cfgs list them (a
`cspnet.stage.CrossStage` holds down, cross, main, blocks, partial transition, transition; the
blocks hold their convs in order; the classifier ``head.fc`` is the cfg's final 1x1 conv with
bias). So the k-th Conv2d (with the BatchNorm that follows it) or Linear of a native model is the
k-th weighted layer of its cfg, and a ``.weights`` file maps onto it without the cfg. The tests
check this against every registered model's ``ModelSpec.darknet_cfg`` by comparing outputs.

resnet50.cfg applies its 1000-way conv *before* the global pool and the native model after it;
a 1x1 conv commutes with averaging, so the same weights give the same logits.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .build import DarknetNet, WeightRecord
from .weights import DarknetWeightsError, WeightsHeader, read_header, read_weights, write_weights


def native_records(model: nn.Module) -> list[WeightRecord]:
    """The weighted layers of a native model in module order, as ``.weights`` records.

    A Conv2d takes the BatchNorm2d registered right after it (its ``ConvBnAct``); a conv with
    neither BN nor bias, or a BN with no conv before it, cannot be expressed in Darknet's format.
    """
    records: list[WeightRecord] = []
    pending: tuple[str, nn.Conv2d] | None = None  # a bias-free conv waiting for its BN

    def close_pending() -> None:
        if pending is not None:
            raise ValueError(f"{pending[0]}: a convolution without bias or BatchNorm has no Darknet layout")

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            close_pending()
            if m.bias is None:
                pending = (name, m)
            else:
                records.append(WeightRecord(name, "conv", m.weight, m.bias, None))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if pending is None or pending[1].out_channels != m.num_features:
                raise ValueError(f"{name}: a BatchNorm that does not follow a bias-free convolution has no Darknet layout")
            records.append(WeightRecord(pending[0], "conv", pending[1].weight, m.bias, m))
            pending = None
        elif isinstance(m, nn.Linear):
            close_pending()
            if m.bias is None:
                raise ValueError(f"{name}: a Linear without bias has no Darknet layout")
            # The cfgs' classifier is a 1x1 [convolutional] with bias: a conv record.
            records.append(WeightRecord(name, "conv", m.weight, m.bias, None))
    close_pending()
    return records


def _describe(record: WeightRecord) -> str:
    bn = "+BN" if record.bn is not None else "+bias"
    return f"{record.name} {tuple(record.weight.shape)}{bn}"


def _flat_shape(shape: torch.Size) -> tuple[int, ...]:
    # A Linear's (out, in) weight is a 1x1 conv's (out, in, 1, 1).
    return tuple(shape[:2]) if len(shape) == 4 and tuple(shape[2:]) == (1, 1) else tuple(shape)


def check_records(src: list[WeightRecord], dst: list[WeightRecord]) -> None:
    """Raise `DarknetWeightsError` at the first pair of layers whose weights cannot be copied."""
    if len(src) != len(dst):
        raise DarknetWeightsError(f"{len(src)} weighted layers cannot map onto {len(dst)}")
    for k, (a, b) in enumerate(zip(src, dst)):
        if (a.bn is None) != (b.bn is None) or _flat_shape(a.weight.shape) != _flat_shape(b.weight.shape):
            raise DarknetWeightsError(f"weighted layer {k}: {_describe(a)} does not match {_describe(b)}")


def copy_records(src: list[WeightRecord], dst: list[WeightRecord]) -> None:
    """Copy weights, biases and BN state record by record, after `check_records`."""
    check_records(src, dst)
    with torch.no_grad():
        for a, b in zip(src, dst):
            for x, y in zip(a.tensors, b.tensors):
                y.copy_(x.reshape(y.shape))


def darknet_to_native(darknet: DarknetNet, native: nn.Module) -> None:
    """Copy a cfg-built model's weights into the matching native model."""
    copy_records(darknet.weight_records(), native_records(native))


def native_to_darknet(native: nn.Module, darknet: DarknetNet) -> None:
    """Copy a native model's weights into the cfg-built model of its official cfg."""
    copy_records(native_records(native), darknet.weight_records())


def official_cfg_named_by(path: str | os.PathLike) -> str | None:
    """The registered official cfg a weights file is named for: the longest ``darknet_cfg`` stem that opens
    the file name and ends at its end or a non-alphanumeric character (``csdarknet53-omega_final.weights``
    -> ``csdarknet53-omega.cfg``, ``csdarknet53.conv.104`` -> ``csdarknet53.cfg``), or None."""
    from ..registry import specs

    name = Path(path).name.lower()
    stems = {s.darknet_cfg: Path(s.darknet_cfg).stem.lower() for s in specs().values() if s.darknet_cfg}
    named = [(len(stem), cfg) for cfg, stem in stems.items()
             if name.startswith(stem) and (len(name) == len(stem) or not name[len(stem)].isalnum())]
    return max(named)[1] if named else None


def check_weights_name(model: nn.Module, path: str | os.PathLike) -> None:
    """Refuse a file named for another official cfg than the model's (``csdarknet53-omega*.weights``, trained
    with Mish, into the leaky cspdarknet53): the shapes agree, so it would load and compute something else.
    A model built as that cfg's network by config overrides (cspdarknet53 with ``act="mish"``) takes it."""
    from ..registry import specs

    spec = specs().get(getattr(model, "model_name", None))
    named = official_cfg_named_by(path)
    if spec is None or spec.darknet_cfg is None or named is None or named == spec.darknet_cfg:
        return
    owners = [s for s in specs().values() if s.darknet_cfg == named]
    if any(s.cfg == getattr(model, "model_cfg", None) for s in owners):
        return
    raise DarknetWeightsError(
        f"{path}: the file is named for {named}, but model {spec.name!r} is {spec.darknet_cfg}'s network; "
        f"load it into model {owners[0].name!r}, or rename the file if it holds {spec.darknet_cfg}'s weights")


def layers_read(model: nn.Module, path: str | os.PathLike, header: WeightsHeader) -> tuple[int, int]:
    """``(read, total)``: how many of ``model``'s weighted layers (`native_records`) the ``.weights`` file
    ``path`` held. A partial read stops after a whole layer: the layers read are those whose floats fit."""
    floats = (os.path.getsize(path) - header.nbytes) // 4
    ends = torch.tensor([r.num_floats for r in native_records(model)]).cumsum(0)
    return int((ends <= floats).sum()), len(ends)


def load_darknet_weights(model: nn.Module, path: str | os.PathLike, *, partial: bool = False) -> WeightsHeader:
    """Load an official ``.weights`` file into a native model (e.g. ``csresnext50.weights`` into cspresnext50).

    ``partial=True`` accepts a file holding only the first layers (darknet ``partial``, e.g.
    ``csdarknet53.conv.104``, the backbone without the classifier); the rest keep their values.
    A model built without a classifier (``features_only``, ``num_classes=0``) also reads the whole
    ImageNet file: the classifier's weights at its end are skipped. A model whose classifier has
    another class count than the file's is refused, saying how to load the backbone alone.

    A file named for another registered model's official cfg than this model's is refused
    (`official_cfg_named_by`): ``csdarknet53-omega.weights`` has cspdarknet53's shapes but Mish.
    A ``features_only`` model that deleted the stages after its last level (`StagedNet.keep_levels`)
    reads the file as the whole backbone does, and keeps the stages it has.
    """
    check_weights_name(model, path)
    if getattr(model, "deleted_stages", ()):
        return _load_through_whole_backbone(model, path, partial)
    records = native_records(model)
    return read_weights(records, path, partial=partial, trailing=_file_classifier_floats(model, records, path))


def _load_through_whole_backbone(model: nn.Module, path: str | os.PathLike, partial: bool) -> WeightsHeader:
    # The file holds the deleted stages' layers between the model's and the classifier: the whole backbone,
    # built again, reads it with every length check, and hands the model the stages it has.
    from ..registry import specs

    spec = specs().get(getattr(model, "model_name", None))
    if spec is None:
        raise DarknetWeightsError(f"{path}: a model that deleted stages {list(model.deleted_stages)} reads Darknet "
                                  "weights only as a registered model (create_model), whose whole backbone is known")
    with torch.random.fork_rng(devices=[]):  # building it draws initial weights: leave the caller's random stream
        whole = spec.build(model.model_cfg, in_chans=model.in_chans, features_only=True)
    whole.load_state_dict(model.state_dict(), strict=False)  # a partial file leaves the model's own values
    header = load_darknet_weights(whole, path, partial=partial)
    model.load_state_dict(whole.state_dict())  # the deleted stages' tensors are skipped
    return header


def _file_classifier_floats(model: nn.Module, records: list[WeightRecord], path: str | os.PathLike) -> int:
    """The floats at the end of ``path`` that are a classifier the model does not read, else 0.

    The file's floats past the model's backbone are a classifier when they are K * (C + 1) (a 1x1 conv
    or connected layer with bias over the model's C last features). A model without a classifier
    skips them; a model whose classifier has other than K classes cannot take the file. Anything else
    is left to `read_weights`, which reports the length difference.
    """
    features = getattr(model, "num_features", 0)
    get_classifier = getattr(model, "get_classifier", None)
    if not features or get_classifier is None:
        return 0
    classifier = get_classifier()
    own = sum(t.numel() for t in classifier.parameters())  # 0 for the Identity of a model without one
    try:
        with open(path, "rb") as f:
            header = read_header(f.read(20), str(path))
        surplus = (os.path.getsize(path) - header.nbytes) // 4 - (sum(r.num_floats for r in records) - own)
    except (OSError, DarknetWeightsError):
        return 0  # read_weights says what is wrong with the file
    if surplus <= 0 or surplus % (features + 1) or surplus == own:
        return 0
    if own == 0:
        return surplus
    name = getattr(model, "model_name", type(model).__name__)
    classes = own // (features + 1)
    raise DarknetWeightsError(
        f"{path}: the classifier sizes differ: the file's classifier is {surplus // (features + 1)}-way, that of "
        f"model {name!r} {classes}-way (over {features} features). To load the backbone alone, build the model "
        f"with num_classes=0 or features_only=True (then reset_classifier({classes}) adds a fresh classifier)")


def save_darknet_weights(model: nn.Module, path: str | os.PathLike, header: WeightsHeader | None = None) -> Path:
    """Write a native model as a Darknet ``.weights`` file for its official cfg."""
    return write_weights(native_records(model), path, header=header)
