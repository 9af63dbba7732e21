"""Per-image latency of a detector split into backbone / neck / head / NMS, with its BFLOPs.

The paper compares heads by BFLOPs and FPS (Table 2: EFM vs GFM vs PRN …; Table 5: GPU / CPU /
Jetson fps). `time_detector` measures the same split on this machine: each part is timed
separately in one batch-1 pass on random noise (``torch.inference_mode``), and the median over
``runs`` passes after `WARMUP` is reported in milliseconds. "head" includes the decode of the
raw maps; "nms" is `Detector.postprocess` (thresholding + `torchvision.ops.batched_nms`) at the
predict defaults `CONF_THRESH` / `IOU_THRESH` (with random input the NMS time depends on how many
boxes an untrained model lets through).
"""
from __future__ import annotations

import statistics
import time

import torch

from ..profile import profile
from .detector import Detector

PARTS = ("backbone", "neck", "head", "nms")
WARMUP = 2  # passes before timing: first calls allocate and pick kernels
CONF_THRESH, IOU_THRESH = 0.25, 0.45  # cspnet detect predict's defaults


@torch.inference_mode()
def time_detector(model: Detector, img_size: int = 416, runs: int = 10) -> dict[str, float]:
    """Median milliseconds per image of each part, their sum, fps, conv params and BFLOPs."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    was = model.training
    model.eval()
    x = torch.rand(1, model.in_chans, img_size, img_size)
    times: dict[str, list[float]] = {p: [] for p in PARTS}
    for i in range(WARMUP + runs):
        t0 = time.perf_counter()
        feats = model.backbone(x)
        t1 = time.perf_counter()
        maps = model.neck(feats)
        t2 = time.perf_counter()
        out = model.decode(model.head(maps))
        t3 = time.perf_counter()
        model.postprocess(out, CONF_THRESH, IOU_THRESH)
        t4 = time.perf_counter()
        if i >= WARMUP:
            for part, dt in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[part].append(1000 * dt)
    model.train(was)
    result = {f"{p}_ms": statistics.median(v) for p, v in times.items()}
    result["total_ms"] = sum(result[f"{p}_ms"] for p in PARTS)
    result["fps"] = 1000 / result["total_ms"]
    prof = profile(model, img_size)
    result["bflops"] = prof.bflops
    result["conv_params_m"] = prof.conv_params / 1e6
    return result
