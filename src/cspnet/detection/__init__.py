"""Object detection on CSP backbones: YOLO head, SPP / FPN / PANet necks and the Exact Fusion Model."""
from .detector import Detector, DetectorCfg, create_detector
from .head import YOLOV3_ANCHORS, AnchorLayout, decode_boxes, encode_boxes, make_anchor_layout
from .loss import YoloLoss
from .necks import EFM, FPN, GFM, NECKS, PANet

__all__ = [
    "EFM", "FPN", "GFM", "NECKS", "YOLOV3_ANCHORS", "AnchorLayout", "Detector", "DetectorCfg", "PANet", "YoloLoss",
    "create_detector", "decode_boxes", "encode_boxes", "make_anchor_layout",
]
