"""Darknet ``.cfg`` + ``.weights`` -> cspnet safetensors, as the native model (a classifier, or a detector for a cfg
with ``[yolo]`` layers) or as the cfg-built network."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..weights import model_metadata, save_weights
from .build import DarknetNet, build_model
from .mapping import check_records, check_weights_name, copy_records, native_records, official_cfg_named_by
from .weights import DarknetWeightsError, WeightsHeader, default_cutoff, read_weights

CHECK_SIZE = 64  # input side of the equivalence check after a native conversion
UNREAD_FILL_SEED = 0  # torch seed of the initial values that the layers a partial file lacks are written with


@dataclass(frozen=True)
class DarknetConversion:
    path: Path
    header: WeightsHeader
    records: int  # the weighted layers read from the file
    records_total: int  # the network's weighted layers; more than ``records`` for a partial file
    model: str | None  # the registered model written (a detector's backbone-neck name), or None for the cfg-built layout
    model_kwargs: dict[str, int] = dataclasses.field(default_factory=dict)  # create_model's, for the cfg's head and input
    detector: bool = False  # a native detector, rebuilt by cspnet.weights.load_model (cspnet detect --weights)


def model_for_cfg(cfg_path: str | os.PathLike) -> str | None:
    """The registered model whose official cfg has this file name (``csresnext50.cfg`` -> cspresnext50)."""
    from ..registry import get_spec, list_models

    name = os.path.basename(cfg_path)
    matches = [m for m in list_models() if get_spec(m).darknet_cfg == name]
    return matches[0] if len(matches) == 1 else None


# The official detector cfgs name their backbone's cfg, then the neck (the necks with a Darknet cfg layout,
# `Detector.cfg_layer_order`): csresnext50-panet-spp.cfg,
# in-progress/csresnext50-fpn-spp.cfg, in-progress/csresnext50-yolo-spp.cfg (YOLOv3's path).
CFG_NECK_WORDS = {"panet": "panet", "fpn": "fpn", "yolo": "yolov3"}


def detector_for_cfg(cfg_path: str | os.PathLike) -> tuple[str | None, str | None]:
    """The registered backbone and the neck a detector cfg's file name says (``csresnext50-panet-spp.cfg`` ->
    cspresnext50, panet); ``yolov3-spp.cfg`` is YOLOv3 on Darknet-53. None for what the name does not say."""
    stem = Path(cfg_path).stem.lower()
    if stem.split("-")[0] == "yolov3":
        return "darknet53", "yolov3"
    backbone_cfg = official_cfg_named_by(cfg_path)
    rest = stem[len(Path(backbone_cfg).stem):] if backbone_cfg else stem
    neck = next((CFG_NECK_WORDS[w] for w in rest.split("-") if w in CFG_NECK_WORDS), None)
    return (model_for_cfg(backbone_cfg) if backbone_cfg else None), neck


def _detector(darknet: DarknetNet, backbone: str | None, neck: str | None):
    """The native detector of a cfg with ``[yolo]`` layers: its backbone and neck (as given, else from the cfg's
    name), and the ``[yolo]`` layers' classes, anchors, strides, ``scale_x_y`` and the cfg's input channels."""
    from ..detection.detector import Detector, DetectorCfg

    cfg_name = os.path.basename(darknet.cfg_path)
    named_backbone, named_neck = detector_for_cfg(cfg_name)
    backbone, neck = backbone or named_backbone, neck or named_neck
    if backbone is None or neck is None:
        raise DarknetWeightsError(
            f"{cfg_name}: a detector cfg whose name does not say its {'backbone' if backbone is None else 'neck'} "
            "(as csresnext50-panet-spp.cfg does); give --model BACKBONE and --neck panet|fpn|yolov3, or convert with "
            "--raw to keep the cfg-built network's layout")
    yolos = sorted((darknet.layers[i] for i in darknet.yolo_indices), key=lambda layer: layer.stride)  # finest first
    if len({layer.num_classes for layer in yolos}) > 1:
        raise DarknetWeightsError(f"{cfg_name}: its [yolo] layers predict {[y.num_classes for y in yolos]} classes; "
                                  "a detector predicts one set of classes at every level")
    scales = tuple(layer.scale_x_y for layer in yolos)
    try:
        det = Detector(DetectorCfg(
            backbone, neck, yolos[0].num_classes, anchors=tuple(a for layer in yolos for a in layer.anchors),
            strides=tuple(layer.stride for layer in yolos), scale_x_y=scales[0] if len(set(scales)) == 1 else scales,
            in_chans=darknet.in_chans))
    except ValueError as e:
        raise DarknetWeightsError(f"{cfg_name}: no {backbone}-{neck} detector has its [yolo] layers ({e})") from None
    # The raw map's anchor blocks follow the cfg's mask order; the detector sorts its anchors by area
    # (make_anchor_layout), so it decodes them with the cfg's anchors only if that order is the cfg's.
    for level, layer in enumerate(yolos):
        got = [tuple(a) for a in det.layout.level_anchors(level).tolist()]
        if got != [tuple(map(float, a)) for a in layer.anchors]:
            raise DarknetWeightsError(
                f"{cfg_name}:{layer.line}: the [yolo] layer at stride {layer.stride} decodes anchors {list(layer.anchors)} "
                f"(its mask), but a detector spreads its anchors over the levels smallest first by area, which gives "
                f"it {got}")
    return det


def _coco_or_numbered_classes(num_classes: int) -> dict[str, list | None]:
    """The class names and category ids a converted detector records: the COCO ones for the official cfgs'
    80 classes, else the class indices as names (``"0"``, ``"1"`` …), as YOLO labels without a names file."""
    from ..data.detection import COCO_CATEGORY_IDS, COCO_CLASSES

    if num_classes == len(COCO_CLASSES):
        return {"class_names": list(COCO_CLASSES), "category_ids": list(COCO_CATEGORY_IDS)}
    return {"class_names": [str(k) for k in range(num_classes)], "category_ids": None}


def _check_same_function(darknet: DarknetNet, native: torch.nn.Module, model: str) -> None:
    # Equal shapes do not make equal networks (an activation or a pooling may differ, as between
    # csdarknet53.cfg and csdarknet53-omega.cfg): compare outputs on a random image.
    darknet.eval()
    native.eval()
    x = torch.randn(1, darknet.in_chans, CHECK_SIZE, CHECK_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if darknet.yolo_indices:  # the [yolo] layers' inputs (finest first) and the detector's raw head maps
            outputs = zip(sorted(darknet(x), key=lambda t: -t.shape[-1]), native.forward_raw(x))
        else:
            outputs = [(darknet(x), native(x))]
    if any(a.shape != b.shape or (a - b).abs().max() > 1e-3 * max(1.0, a.abs().max().item()) for a, b in outputs):
        raise DarknetWeightsError(
            f"{os.path.basename(darknet.cfg_path)} and model {model!r} have the same weight shapes but compute "
            "different outputs (another activation or layer order?); convert with --raw")


def convert_weights(
    cfg_path: str | os.PathLike,
    weights_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    model: str | None = None,
    neck: str | None = None,
    raw: bool = False,
    cutoff: int | None = None,
) -> DarknetConversion:
    """Read ``weights_path`` for ``cfg_path`` and write ``out_path`` (safetensors, atomically).

    Unless ``raw``, the weights go into the registered ``model`` (default: the one whose
    ``darknet_cfg`` is this cfg's file name), built with the cfg's class count and input channels
    (a fine-tuned cfg's), after checking that the cfg-built network and the native model compute
    the same function; otherwise the cfg-built network's state is written.

    With ``cutoff`` (or a ``.conv.N`` file) the layers after it keep their initial values, drawn with torch seed
    `UNREAD_FILL_SEED` (the caller's random stream is left as it was), so that converting the same file twice
    writes the same file; the metadata's ``darknet_records_read`` / ``darknet_records_total`` say how many
    weighted layers hold the file's weights.

    A cfg with ``[yolo]`` layers (``csresnext50-panet-spp.cfg``) becomes a native detector on the backbone
    ``model`` with ``neck`` (default: what the cfg's name says, `detector_for_cfg`), with the cfg's anchors,
    classes, strides and ``scale_x_y``; its file records what `cspnet.export.export_record` records of a
    detector, the cfg's input size and the COCO class names and category ids of an 80-class cfg, so that
    ``cspnet.weights.load_model`` rebuilds it and ``cspnet detect predict / eval --weights`` run it. Its
    ``.weights`` file must hold every layer: a neck and head left at random values detect nothing.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(UNREAD_FILL_SEED)
        return _convert(cfg_path, weights_path, out_path, model, neck, raw, cutoff)


def _convert(cfg_path: str | os.PathLike, weights_path: str | os.PathLike, out_path: str | os.PathLike,
             model: str | None, neck: str | None, raw: bool, cutoff: int | None) -> DarknetConversion:
    from ..export import export_record
    from ..registry import create_model

    darknet = build_model(cfg_path)
    if neck is not None and not darknet.yolo_indices:
        raise ValueError(f"{os.path.basename(cfg_path)} has no [yolo] layers: a classifier's cfg takes no neck")
    detector = bool(darknet.yolo_indices) and not raw
    if detector:  # built before the (large) weights file is read: a cfg no detector takes is refused at once
        native = _detector(darknet, model, neck)
        check_weights_name(native.backbone.body, weights_path)  # as Detector.load_darknet_weights does
    if cutoff is None:
        cutoff = default_cutoff(weights_path)
    header = read_weights(darknet, weights_path, cutoff=cutoff)
    records, records_total = len(darknet.weight_records(cutoff)), len(darknet.weight_records())
    source = {
        "source": "darknet",
        "darknet_cfg": os.path.basename(cfg_path),
        "darknet_weights": os.path.basename(weights_path),
        "darknet_header": dataclasses.asdict(header),
        "darknet_layers_read": cutoff if cutoff is not None else len(darknet.layers),
        "darknet_records_read": records,
        "darknet_records_total": records_total,
        "input_size": list(darknet.net_size),
        # Darknet feeds its networks RGB scaled to [0, 1], nothing subtracted or divided
        "mean": [0.0] * darknet.in_chans,
        "std": [1.0] * darknet.in_chans,
    }
    name = None if raw or detector else (model or model_for_cfg(cfg_path))
    if name is None and not detector:
        # Shared convs appear under several names; safetensors stores each tensor once per name.
        state = {k: v.clone() for k, v in darknet.state_dict().items()}
        path = save_weights(out_path, state, {**source, "layout": "darknet"})
        return DarknetConversion(path, header, records, records_total, None)
    if detector:
        if records < records_total:
            raise DarknetWeightsError(
                f"{weights_path}: holds the first {records} of the {records_total} weighted layers of "
                f"{os.path.basename(cfg_path)}; a detector needs them all (a backbone's file starts a detector's "
                "training: cspnet detect train --backbone-weights)")
        name, kwargs, native_side = native.model_name, {}, native.darknet_records()
        metadata = export_record(native, {**source, **_coco_or_numbered_classes(native.num_classes)})
    else:
        # a fine-tuned cfg has its own class count (the last conv's filters) and maybe another input depth
        kwargs = {"num_classes": darknet.layers[-1].out_shape[0], "in_chans": darknet.in_chans}
        native = create_model(name, **kwargs)
        native_side = native_records(native)
        metadata = {**model_metadata(native), **source}
    try:
        check_records(darknet.weight_records(), native_side)
    except DarknetWeightsError as e:
        raise DarknetWeightsError(f"{os.path.basename(cfg_path)} does not map onto model {name!r} ({e}); convert "
                                  "with --raw to keep the cfg-built network's layout") from None
    copy_records(darknet.weight_records(), native_side)
    _check_same_function(darknet, native, name)
    path = save_weights(out_path, native, {**metadata, "layout": "native"})
    return DarknetConversion(path, header, records, records_total, name, kwargs, detector)
