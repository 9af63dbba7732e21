"""Detector pieces: neck shapes and anchor bookkeeping, box coding, loss assignment, NMS, COCO mAP."""
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou, complete_box_iou_loss, nms

import cspnet
from cspnet.darknet.mapping import save_darknet_weights
from cspnet.darknet.weights import DarknetWeightsError
from cspnet.detection import NECKS, YOLOV3_ANCHORS, create_detector, decode_boxes, encode_boxes, make_anchor_layout
from cspnet.detection.detector import DetectorCfg
from cspnet.detection.head import decode_level, fit_anchors
from cspnet.detection.loss import YoloLoss
from cspnet.detection.metrics import coco_evaluate

TINY = {"backbone_width": 0.25, "neck_width": 64}  # cspresnet10 at a quarter width: fast


@pytest.mark.parametrize("neck", NECKS)
def test_neck_shapes_and_anchor_bookkeeping(neck):
    det = create_detector("cspresnet10", neck, num_classes=7, **TINY)
    layout = det.layout
    assert layout.strides == (8, 16, 32)
    # the cfgs' masks 0,1,2 / 3,4,5 / 6,7,8 with the COCO anchors sorted by area
    assert layout.masks == ((0, 1, 2), (3, 4, 5), (6, 7, 8))
    assert layout.anchors == tuple(sorted(YOLOV3_ANCHORS, key=lambda a: a[0] * a[1]))
    x = torch.rand(2, 3, 64, 96)  # not square: H and W must not be mixed up
    det.train()
    raw = det(x)
    assert [tuple(r.shape) for r in raw] == [(2, 3 * (5 + 7), 64 // s, 96 // s) for s in (8, 16, 32)]
    maps = det.neck(det.backbone(x))
    assert [m.shape[1] for m in maps] == det.neck.out_chs == [16, 32, 64]
    det.eval()
    with torch.no_grad():
        out = det(x)
    assert out.shape == (2, sum(3 * (64 // s) * (96 // s) for s in (8, 16, 32)), 5 + 7)
    assert torch.all((out[..., 4:] >= 0) & (out[..., 4:] <= 1))  # probabilities
    assert torch.all(out[..., 2] > out[..., 0]) and torch.all(out[..., 3] > out[..., 1])


def test_efm_reads_one_more_scale_and_gfm_fuses_all():
    efm = create_detector("cspresnet10", "efm", num_classes=3, **TINY)
    assert efm.backbone.strides == [4, 8, 16, 32]  # scale s-1 of the stride-8 output
    gfm = create_detector("cspresnet10", "gfm", num_classes=3, **TINY)
    assert gfm.backbone.strides == [8, 16, 32]
    # EFM compresses with Maxout (no weights) before concatenating (paper §3.2)
    from cspnet.layers import Maxout

    assert any(isinstance(m, Maxout) for m in efm.neck.modules())
    sam = create_detector("cspresnet10", "efm-sam", num_classes=3, **TINY)
    assert sam.neck.attention is not None and len(sam.neck.attention) == 3
    spp = create_detector("cspresnet10", "efm-spp", num_classes=3, **TINY)
    from cspnet.layers import SPP

    assert sum(isinstance(m, SPP) for m in spp.neck.modules()) == 1
    assert not any(isinstance(m, SPP) for m in efm.neck.modules())


def test_custom_anchors_and_two_levels():
    anchors = [(5, 6), (50, 60), (10, 12), (30, 20)]
    det = create_detector("cspresnet10", "panet", num_classes=2, anchors=anchors, strides=(16, 32), **TINY)
    assert det.layout.masks == ((0, 1), (2, 3))
    assert det.layout.anchors == ((5, 6), (10, 12), (30, 20), (50, 60))
    det.train()
    raw = det(torch.rand(1, 3, 64, 64))
    assert [tuple(r.shape) for r in raw] == [(1, 2 * 7, 4, 4), (1, 2 * 7, 2, 2)]
    with pytest.raises(ValueError, match="cannot be split evenly"):
        create_detector("cspresnet10", "panet", anchors=anchors[:2], **TINY)
    with pytest.raises(ValueError, match="unknown neck"):
        create_detector("cspresnet10", "bifpn")
    with pytest.raises(ValueError, match="no feature map at stride 64"):
        create_detector("cspresnet10", "fpn", strides=(16, 32, 64))


def test_cspresnet50_taps_follow_its_cfg():
    # csresnet50-panet-spp.cfg routes layers 38 and 65: 256 ch at stride 8, 512 at stride 16
    det = create_detector("cspresnet50", "fpn", num_classes=1, neck_width=64)
    assert det.backbone.out_chs == [256, 512, 1024]
    x = torch.rand(1, 3, 64, 64)
    feats = det.backbone(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(256, 8, 8), (512, 4, 4), (1024, 2, 2)]


def test_detector_refuses_backbone_level_options():
    # the detector keeps the levels its strides tap; a features_only body cut elsewhere could not give them
    with pytest.raises(ValueError, match=r"backbone_kwargs \['out_indices'\]: the detector takes"):
        create_detector("cspresnet10", "panet", num_classes=1, neck_width=64, backbone_kwargs={"out_indices": (2, 3, 4)})


def test_cspresnet50_dilated_taps_are_at_the_strides_they_feed():
    # output_stride=8 puts stage 2's output, which the cfg's stride-16 tap reads, at stride 8
    det = create_detector("cspresnet50", "fpn", num_classes=1, neck_width=64, strides=(4, 8),
                          anchors=YOLOV3_ANCHORS[:6], backbone_kwargs={"output_stride": 8})
    x = torch.rand(1, 3, 64, 64)
    assert [tuple(f.shape[-2:]) for f in det.backbone(x)] == [(16, 16), (8, 8)]
    assert [tuple(o.shape[-2:]) for o in det(x)] == [(16, 16), (8, 8)]
    with pytest.raises(ValueError, match="no feature map at stride 16"):
        create_detector("cspresnet50", "fpn", num_classes=1, neck_width=64, strides=(8, 16),
                        anchors=YOLOV3_ANCHORS[:6], backbone_kwargs={"output_stride": 8})


@pytest.mark.parametrize("backbone, options, stages", [
    ("darknet_ref", {}, 5),  # its stride-64 level (stages.5) feeds no level
    ("cspresnet10", {"strides": (8, 16), "anchors": YOLOV3_ANCHORS[:6]}, 3),
    # the cfg's stride-16 tap opens stages.3 (one conv of it would run): the coarsest tap is a stage output
    ("cspresnet50", {"strides": (8, 16), "anchors": YOLOV3_ANCHORS[:6]}, 3),
])
def test_detector_holds_only_the_backbone_stages_its_taps_read(backbone, options, stages):
    # a stage whose maps no tap reads takes no part in the loss (DistributedDataParallel refuses such parameters)
    det = create_detector(backbone, "panet", num_classes=2, **TINY, **options).train()
    assert len(det.backbone.body.stages) == stages and all(isinstance(t, int) for t in det.backbone.taps[-1:])
    sum(r.mean() for r in det(torch.randn(1, 3, 64, 64))).backward()  # batch 1: a 1x1 stride-64 map fails BN
    assert [n for n, p in det.named_parameters() if p.grad is None] == []
    profiled = {layer.name.split(".")[3] for layer in cspnet.profile(det.eval(), 64).layers
                if layer.name.startswith("backbone.body.stages.")}
    assert profiled == {str(i) for i in range(stages)}


def test_darknet_ref_detector_reads_the_whole_imagenet_file(tmp_path):
    # darknet.weights holds the stride-64 stage the detector does not keep, then the classifier
    torch.manual_seed(1)
    source = cspnet.create_model("darknet_ref").eval()
    path = save_darknet_weights(source, tmp_path / "darknet.weights")
    det = create_detector("darknet_ref", num_classes=2, neck_width=64)
    assert det.load_backbone_weights(path) == []
    backbone = cspnet.create_model("darknet_ref", features_only=True, out_indices=(3, 4, 5), darknet_weights=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = source.forward_levels(x)[3:]
        assert all(torch.equal(a, b) for a, b in zip(det.backbone.eval()(x), want[:3]))
        assert all(torch.equal(a, b) for a, b in zip(backbone(x), want[:3]))
    (tmp_path / "odd.weights").write_bytes(path.read_bytes() + bytes(4 * 3))  # its length is still checked
    with pytest.raises(DarknetWeightsError, match="more weights than this network"):
        det.load_backbone_weights(tmp_path / "odd.weights")


@pytest.mark.parametrize("scale_x_y", [1.0, 1.2])
def test_decode_inverts_encode(scale_x_y):
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(500, 2, generator=g) * 600
    wh = torch.rand(500, 2, generator=g) * 300 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    stride = 16
    cells = ((boxes[:, :2] + boxes[:, 2:]) / 2 / stride).floor()
    anchors = torch.tensor(YOLOV3_ANCHORS, dtype=torch.float32)[torch.randint(9, (500,), generator=g)]
    t = encode_boxes(boxes, cells, anchors, stride, scale_x_y)
    torch.testing.assert_close(decode_boxes(t, cells, anchors, stride, scale_x_y), boxes, rtol=1e-4, atol=1e-2)


CFG_ROOT = Path(__file__).resolve().parents[2] / "shared" / "darknet-cfg" / "cfg"


def test_default_anchors_and_masks_are_the_official_cfgs():
    text = (CFG_ROOT / "csresnext50-panet-spp.cfg").read_text()
    values = [float(v) for v in re.search(r"^anchors\s*=\s*(.+)$", text, re.M).group(1).split(",")]
    anchors = list(zip(values[::2], values[1::2]))  # Darknet's biases: width, height
    assert YOLOV3_ANCHORS == tuple(anchors)
    masks = [tuple(int(v) for v in m.split(",")) for m in re.findall(r"^mask\s*=\s*(.+)$", text, re.M)]
    layout = make_anchor_layout(None, (8, 16, 32))  # the cfg's [yolo] layers run finest first
    for level, mask in enumerate(masks):
        assert layout.level_anchors(level).tolist() == [list(anchors[a]) for a in mask]


@pytest.mark.parametrize("scale_x_y", [1.0, 1.1])
def test_decode_is_darknets_get_yolo_box(scale_x_y):
    # Darknet: x = (i + logistic(tx) * k - (k - 1) / 2) * stride, w = exp(tw) * biases[2n] (the width)
    anchors = torch.tensor([[116.0, 90.0], [156.0, 198.0], [373.0, 326.0]])
    raw = torch.zeros(1, 3 * (5 + 1), 2, 3)
    gy, gx, tx, ty, tw, th = 1, 2, 0.3, -0.2, 0.5, -0.4
    raw[0, :4, gy, gx] = torch.tensor([tx, ty, tw, th])
    row = decode_level(raw, anchors, 32, scale_x_y)[0, gy * 3 + gx]
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    cx = (gx + sig(tx) * scale_x_y - (scale_x_y - 1) / 2) * 32
    cy = (gy + sig(ty) * scale_x_y - (scale_x_y - 1) / 2) * 32
    w, h = math.exp(tw) * 116, math.exp(th) * 90
    assert row[:4].tolist() == pytest.approx([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], rel=1e-6)


def test_decode_level_uses_darknet_channel_order():
    # One raw map holding encoded boxes at chosen (anchor, cell) places: decode_level must return
    # them at row anchor * H * W + gy * W + gx, with objectness and class probabilities after.
    num_classes, h, w, stride = 4, 5, 6, 8
    anchors = torch.tensor([[10.0, 14.0], [24.0, 20.0], [40.0, 44.0]])
    raw = torch.zeros(1, 3 * (5 + num_classes), h, w)
    places = [(0, 1, 2), (2, 4, 5), (1, 0, 0)]
    boxes = torch.tensor([[12.0, 9.0, 20.0, 22.0], [35.0, 30.0, 60.0, 50.0], [1.0, 2.0, 6.0, 5.0]])
    for (a, gy, gx), box in zip(places, boxes):
        t = encode_boxes(box[None], torch.tensor([[gx, gy]], dtype=torch.float32), anchors[a][None], stride)[0]
        base = a * (5 + num_classes)
        raw[0, base:base + 4, gy, gx] = t
        raw[0, base + 4, gy, gx] = 3.0
        raw[0, base + 5 + a, gy, gx] = 2.0
    rows = decode_level(raw, anchors, stride)[0]
    for (a, gy, gx), box in zip(places, boxes):
        row = rows[a * h * w + gy * w + gx]
        torch.testing.assert_close(row[:4], box, atol=1e-3, rtol=1e-4)
        assert row[4] == pytest.approx(1 / (1 + math.exp(-3)))
        assert row[5 + a] == pytest.approx(1 / (1 + math.exp(-2)))


def _random_outputs(n=3, rows=400, num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, rows, 2, generator=g) * 200
    wh = torch.rand(n, rows, 2, generator=g) * 60 + 2
    return torch.cat([xy, xy + wh, torch.rand(n, rows, 1 + num_classes, generator=g)], dim=-1)


@pytest.mark.parametrize("multi_label", [True, False])
def test_postprocess_equals_torchvision_nms_per_class(multi_label):
    out = _random_outputs()
    conf, iou = 0.3, 0.5
    mine = create_detector("cspresnet10", "fpn", num_classes=5, **TINY).postprocess(out, conf, iou, max_det=10_000, multi_label=multi_label)
    for rows, got in zip(out, mine):
        scores = rows[:, 4:5] * rows[:, 5:]
        expect = []
        for c in range(scores.shape[1]):
            if multi_label:
                idx = (scores[:, c] > conf).nonzero().flatten()
            else:
                idx = ((scores.argmax(1) == c) & (scores.max(1).values > conf)).nonzero().flatten()
            keep = nms(rows[idx, :4], scores[idx, c], iou)  # plain per-class NMS, independent of batched_nms
            expect += [(c, float(scores[i, c])) + tuple(rows[i, :4].tolist()) for i in idx[keep].tolist()]
        have = [(int(c), float(s)) + tuple(b.tolist()) for b, s, c in zip(got["boxes"], got["scores"], got["labels"])]
        assert len(have) > 10
        assert sorted(have) == sorted(expect)
        assert torch.all(got["scores"][:-1] >= got["scores"][1:])  # best first


def _gt(num_images=6, per_image=5, seed=0):
    rng = random.Random(seed)
    images, anns = [], []
    for i in range(num_images):
        images.append({"id": i, "width": 256, "height": 256, "file_name": f"{i}.png"})
        for _ in range(per_image):
            x, y, w, h = rng.uniform(0, 180), rng.uniform(0, 180), rng.uniform(20, 70), rng.uniform(20, 70)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": rng.randrange(1, 4), "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
    return {"images": images, "annotations": anns, "categories": cats}


def test_coco_map_of_perfect_predictions_is_one_and_of_shuffled_ones_low():
    gt = _gt()
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
               for a in gt["annotations"]]
    m = coco_evaluate(gt, perfect)
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
    # the same boxes given to the wrong images
    rng = random.Random(1)
    ids = [d["image_id"] for d in perfect]
    rng.shuffle(ids)
    shuffled = [{**d, "image_id": i, "score": rng.random()} for d, i in zip(perfect, ids)]
    assert coco_evaluate(gt, shuffled)["AP50"] < 0.25
    assert coco_evaluate(gt, [])["AP"] == 0.0
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_evaluate(gt, [{**perfect[0], "image_id": 999}])


def test_loss_assigns_best_anchor_at_centre_cell():
    layout = make_anchor_layout(None, (8, 16, 32))
    loss_fn = YoloLoss(layout, num_classes=3)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=g) * 300
    wh = torch.rand(40, 2, generator=g) * 250 + 4
    boxes = torch.cat([xy, xy + wh], 1)
    targets = [{"boxes": boxes[:25], "labels": torch.zeros(25, dtype=torch.long)},
               {"boxes": boxes[25:], "labels": torch.ones(15, dtype=torch.long)}]
    shapes = [(416 // s, 416 // s) for s in layout.strides]
    assigned = loss_fn.assign(targets, shapes, "cpu")
    # independent: IoU of each box with each anchor, both centred at the origin (torchvision box_iou)
    anchors = layout.all_anchors()
    centred = lambda s: torch.cat([-s / 2, s / 2], 1)  # noqa: E731
    best = box_iou(centred(wh), centred(anchors)).argmax(1)
    seen = []
    for level, pos in enumerate(assigned):
        for i, a, cell in zip(pos["gt"].tolist(), pos["anchor"].tolist(), pos["cells"]):
            assert layout.masks[level][a] == int(best[i])
            centre = (boxes[i, :2] + boxes[i, 2:]) / 2 / layout.strides[level]
            assert torch.equal(cell, centre.floor().clamp(max=shapes[level][0] - 1))
            seen.append(i)
    assert sorted(seen) == list(range(40))  # every box exactly once (iou_thresh=1: best anchor only)
    extra = YoloLoss(layout, 3, iou_thresh=0.2).assign(targets, shapes, "cpu")
    assert sum(len(p["image"]) for p in extra) > 40  # the "optimal" cfg's extra anchors above iou_thresh


@pytest.mark.parametrize("box_loss", ["mse", "giou", "diou", "ciou"])
def test_loss_parts_and_gradients(box_loss):
    det = create_detector("cspresnet10", "efm", num_classes=3, **TINY)
    det.train()
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 20.0, 60.0, 62.0]]), "labels": torch.tensor([0, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    loss_fn = YoloLoss(det.layout, 3, box_loss=box_loss, label_smoothing=0.1)
    loss, parts = loss_fn(det(torch.rand(2, 3, 64, 64)), targets)
    assert torch.isfinite(loss) and loss > 0
    assert set(parts) == {"box", "obj", "cls"} and all(v > 0 for v in parts.values())
    loss.backward()
    assert det.head.preds[0].weight.grad is not None and det.head.preds[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="targets\\[1\\]"):
        loss_fn(det(torch.rand(2, 3, 64, 64)), [targets[0], {"boxes": torch.zeros(2, 4)}])


def _one_truth_outputs():
    """Zero raw maps for a 128 px input and one 10 x 12 truth, whose best anchor is level 0's first."""
    layout = make_anchor_layout(None, (8, 16, 32))
    raw = [torch.zeros(1, 3 * 8, 128 // s, 128 // s) for s in (8, 16, 32)]
    box = torch.tensor([[100.0, 100.0, 110.0, 112.0]])
    cell = ((box[:, :2] + box[:, 2:]) / 2 / 8).floor()
    return layout, raw, box, cell, [{"boxes": box, "labels": torch.tensor([0])}]


def test_an_unassigned_prediction_over_the_ignore_threshold_has_no_objectness_loss():
    layout, raw, box, cell, targets = _one_truth_outputs()
    gx, gy = cell[0].long().tolist()
    # level 0's second anchor (16, 30), same cell, predicts the truth exactly: IoU 1 > ignore_thresh
    raw[0][0, 8:12, gy, gx] = encode_boxes(box, cell, torch.tensor([[16.0, 30.0]]), 8)[0]
    def obj_loss(logit: float, ignore_thresh: float) -> float:
        raw[0][0, 12, gy, gx] = logit
        return YoloLoss(layout, 3, ignore_thresh=ignore_thresh)(raw, targets)[1]["obj"]

    assert obj_loss(6.0, 0.7) == pytest.approx(obj_loss(-6.0, 0.7), rel=1e-6)
    assert obj_loss(6.0, 1.01) - obj_loss(-6.0, 1.01) > 0.01  # nothing ignored: the slot's logit counts


def test_label_smoothing_targets_are_darknets():
    # Darknet's label_smooth_eps for per-class sigmoids: y * (1 - eps) + eps / 2
    layout, raw, box, cell, targets = _one_truth_outputs()
    gx, gy = cell[0].long().tolist()
    logits = torch.tensor([2.0, -1.0, 0.5])
    raw[0][0, 5:8, gy, gx] = logits
    expect = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([0.95, 0.05, 0.05]))
    assert YoloLoss(layout, 3, label_smoothing=0.1)(raw, targets)[1]["cls"] == pytest.approx(float(expect), rel=1e-6)


@pytest.mark.parametrize("scale_x_y", [1.0, (1.2, 1.1, 1.05)])  # the "optimal" cfg's, one per level
def test_ciou_box_loss_is_torchvisions_on_decoded_positives(scale_x_y):
    layout = make_anchor_layout(None, (8, 16, 32))
    loss_fn = YoloLoss(layout, 2, box_loss="ciou", scale_x_y=scale_x_y)
    raw = [torch.randn(1, 3 * 7, 52 // (s // 8), 52 // (s // 8)) * 0.5 for s in (8, 16, 32)]
    box = torch.tensor([[100.0, 120.0, 180.0, 170.0]])
    targets = [{"boxes": box, "labels": torch.tensor([1])}]
    pos = loss_fn.assign(targets, [r.shape[-2:] for r in raw], "cpu")
    level = next(i for i, p in enumerate(pos) if len(p["image"]))
    p = pos[level]
    stride = layout.strides[level]
    a, (gx, gy) = int(p["anchor"][0]), p["cells"][0].long().tolist()
    t = raw[level].view(1, 3, 7, *raw[level].shape[-2:])[0, a, :4, gy, gx]
    k = scale_x_y[level] if isinstance(scale_x_y, tuple) else scale_x_y
    pred = decode_boxes(t[None], p["cells"], p["anchor_wh"], stride, k)
    expect = complete_box_iou_loss(pred, box, reduction="mean")
    _, parts = loss_fn(raw, targets)
    assert parts["box"] == pytest.approx(float(expect), rel=1e-5)


def test_fit_anchors_recovers_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 10.0], [40.0, 20.0], [90.0, 100.0]])
    wh = torch.cat([c + torch.randn(50, 2, generator=g) for c in centres])
    got = torch.tensor(fit_anchors(wh.numpy(), 3))
    torch.testing.assert_close(got, centres, atol=1.0, rtol=0)
    with pytest.raises(ValueError, match="at least 9 boxes"):
        fit_anchors(wh[:5].numpy(), 9)


def test_boxes_in_image_clips_and_drops_boxes_in_the_letterbox_padding():
    from cspnet.detection.predict import boxes_in_image

    # a 100 x 25 image letterboxed to 64 (ratio 0.64): input rows 16 and below are padding
    det = {"boxes": torch.tensor([[10.0, 2, 30, 20], [50, 30, 60, 40], [-5, 5, 70, 10]]),
           "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([1, 2, 3])}
    out = boxes_in_image(det, 0.64, 100, 25)
    torch.testing.assert_close(out["boxes"], torch.tensor([[15.625, 3.125, 46.875, 25], [0, 7.8125, 100, 15.625]]))
    assert out["scores"].tolist() == pytest.approx([0.9, 0.7]) and out["labels"].tolist() == [1, 3]


def test_predict_and_eval_report_no_box_outside_a_wide_image():
    from cspnet.data.detection import DetectionDataset, DetectionRecord
    from cspnet.detection.predict import detect_image
    from cspnet.detection.train import predict_dataset

    torch.manual_seed(0)
    det = create_detector("cspresnet10", "efm", num_classes=2, backbone_width=0.25, neck_width=32).eval()
    image = np.full((100, 400, 3), 90, np.uint8)  # three quarters of the 64 x 64 input are padding
    boxes = detect_image(det, image, 64, conf_thresh=0.0)["boxes"]
    assert len(boxes) and torch.all(boxes[:, 2:] > boxes[:, :2])
    assert torch.all(boxes >= 0) and torch.all(boxes[:, 2] <= 400) and torch.all(boxes[:, 3] <= 100)
    record = DetectionRecord(1, "wide.png", 400, 100, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), image=image)
    results = predict_dataset(det, DetectionDataset([record], ("a", "b"), 64), conf_thresh=0.0)
    assert results
    for r in results:
        x, y, w, h = r["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 400 + 1e-3 and y + h <= 100 + 1e-3


def test_evaluation_maps_input_pixels_back_to_each_images_own(monkeypatch):
    # A 256 x 128 image at a 64 px input is scaled by 1/4: a detection at input pixels (16, 8)-(32, 24)
    # is the image's (64, 32)-(128, 96), and an image at full score must then have AP 1.
    from cspnet.data.detection import DetectionDataset, DetectionRecord, coco_ground_truth
    from cspnet.detection.train import evaluate_detector, predict_dataset

    det = create_detector("cspresnet10", "fpn", num_classes=2, **TINY).eval()
    found = {"boxes": torch.tensor([[16.0, 8.0, 32.0, 24.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    monkeypatch.setattr(det, "postprocess", lambda outputs, *args: [found] * len(outputs))
    truth = np.array([[64.0, 32.0, 128.0, 96.0]], np.float32)
    record = DetectionRecord(3, "big.png", 256, 128, truth, np.array([1]), image=np.zeros((128, 256, 3), np.uint8))
    dataset = DetectionDataset([record], ("a", "b"), 64)
    [result] = predict_dataset(det, dataset)
    assert result["image_id"] == 3 and result["category_id"] == 1 and result["bbox"] == pytest.approx([64, 32, 64, 64])
    assert evaluate_detector(det, dataset, coco_ground_truth([record], ("a", "b")))["AP"] == pytest.approx(1.0)


def test_predict_files_gives_inputs_sharing_a_stem_their_own_drawn_image(tmp_path):
    import json

    from PIL import Image

    from cspnet.detection.predict import predict_files

    paths = []
    for i, rel in enumerate(("d1/x.png", "d2/x.png", "d3/x_2.png")):
        path = tmp_path / rel
        path.parent.mkdir()
        Image.new("RGB", (40 + 8 * i, 32), (60 * i, 0, 0)).save(path)
        paths.append(path)
    det = create_detector("cspresnet10", "efm", num_classes=1, backbone_width=0.25, neck_width=32)
    results = predict_files(det, paths, tmp_path / "out", 64, ("a",), conf_thresh=1.0)
    drawn = [Path(r["drawn"]).name for r in results]
    assert drawn == ["x_det.png", "x_2_det.png", "x_2_2_det.png"]
    assert json.loads((tmp_path / "out" / "detections.json").read_text()) == results
    for r, path in zip(results, paths):  # each drawn image is its own input's
        assert np.array_equal(np.asarray(Image.open(r["drawn"])), np.asarray(Image.open(path)))


def test_cfg_taps_under_gradient_checkpointing_keep_nothing_after_backward():
    # cspresnet50's cfg taps a module inside a stage; checkpointing reruns it in the backward pass.
    import copy

    det = create_detector("cspresnet50", "panet", num_classes=2, backbone_width=0.25, neck_width=64).train()
    det.backbone.body.set_grad_checkpointing(True)
    sum(o.sum() for o in det(torch.randn(2, 3, 64, 64))).backward()
    assert not [n for n, m in det.named_modules() if hasattr(m, "tap_output")]
    copy.deepcopy(det)  # an EMA copy after a step: a kept non-leaf map would refuse this


def test_scale_x_y_per_level_decodes_each_level_with_its_own():
    scales = (1.2, 1.1, 1.05)  # csresnext50-panet-spp-original-optimal.cfg, finest level first
    det = create_detector("cspresnet10", "fpn", num_classes=2, scale_x_y=list(scales), **TINY).eval()
    assert det.cfg.scale_x_y == scales and DetectorCfg.from_dict(det.cfg.to_dict()) == det.cfg
    raw = det.forward_raw(torch.rand(1, 3, 64, 64))
    expect = torch.cat([decode_level(r, det.layout.level_anchors(i), s, k)
                        for i, (r, s, k) in enumerate(zip(raw, det.strides, scales))], 1)
    torch.testing.assert_close(det.decode(raw), expect)
    uniform = create_detector("cspresnet10", "fpn", num_classes=2, scale_x_y=1.2, **TINY).eval()
    assert not torch.allclose(uniform.decode(raw), expect)  # the coarser levels differ
    with pytest.raises(ValueError, match="scale_x_y gives 2 values for 3 output levels"):
        create_detector("cspresnet10", "fpn", num_classes=2, scale_x_y=(1.2, 1.1), **TINY)


def test_detector_options_that_cannot_work_are_named():
    for kwargs, message in (
        (dict(strides=(32, 16, 8)), "strides must be increasing"), (dict(strides=(8, 8, 8)), "strides must be increasing"),
        (dict(strides=(8, 16, 64)), "twice the stride"), (dict(strides=(16, 32)), "the cfgs' 9 COCO anchors \\(the default\\)"),
        (dict(anchors=(10, 13, 16, 30, 33, 23)), "anchors must be \\(width, height\\) pairs"),
        (dict(anchors=((10, 13, 1),) * 3), "anchors must be"), (dict(anchors=((10, -13),) * 3), "must be positive"),
        (dict(scale_x_y=0.0), "scale_x_y must be positive"),
    ):
        with pytest.raises(ValueError, match=message):
            create_detector("cspresnet10", "fpn", backbone_width=0.25, neck_width=32, **kwargs)
    det = create_detector("cspresnet10", "fpn", backbone_width=0.25, neck_width=32).train()
    with pytest.raises(ValueError, match="call model.eval"):
        det.postprocess(det(torch.randn(1, 3, 64, 64)))



@pytest.mark.parametrize("multi_label", [True, False])
def test_postprocess_sends_only_the_best_candidates_to_nms(monkeypatch, multi_label):
    from cspnet.detection import detector as detector_mod

    out = _random_outputs(n=2, rows=300)
    conf, iou = 0.05, 0.5
    postprocess = create_detector("cspresnet10", "fpn", num_classes=5, **TINY).postprocess
    real_nms, sizes = detector_mod.batched_nms, []

    def counting_nms(boxes, *args):
        sizes.append(len(boxes))
        return real_nms(boxes, *args)

    monkeypatch.setattr(detector_mod, "batched_nms", counting_nms)
    for rows in out:
        scores = rows[:, 4:5] * rows[:, 5:]
        if not multi_label:  # only each row's best class is a candidate
            scores = torch.where(scores == scores.max(1, keepdim=True).values, scores, torch.zeros(()))
        idx, labels = (scores > conf).nonzero(as_tuple=True)
        n = len(idx)
        assert n > 100
        sizes.clear()
        [full] = postprocess(rows[None], conf, iou, max_det=10_000, multi_label=multi_label, max_candidates=10**9)
        # as many candidates as the cap: the result is unchanged
        [same] = postprocess(rows[None], conf, iou, max_det=10_000, multi_label=multi_label, max_candidates=n)
        assert sizes == [n, n] and all(torch.equal(same[k], full[k]) for k in full)
        # more than the cap: NMS sees only the cap's best-scoring candidates, and the result is plain NMS over them
        sizes.clear()
        [capped] = postprocess(rows[None], conf, iou, max_det=10_000, multi_label=multi_label, max_candidates=50)
        assert sizes == [50]
        best = scores[idx, labels].topk(50).indices
        idx, labels = idx[best], labels[best]
        expect = set()
        for c in labels.unique().tolist():
            of_c = idx[labels == c]
            expect |= {(c, float(scores[i, c])) for i in of_c[nms(rows[of_c, :4], scores[of_c, c], iou)].tolist()}
        assert {(int(c), float(s)) for s, c in zip(capped["scores"], capped["labels"])} == expect
        assert len(capped["scores"]) < len(full["scores"])


def test_postprocess_caps_the_nms_input_at_30000_candidates_by_default(monkeypatch):
    from cspnet.detection import detector as detector_mod

    sizes = []
    monkeypatch.setattr(detector_mod, "batched_nms", lambda boxes, *args: sizes.append(len(boxes)) or torch.arange(len(boxes)))
    rows = _random_outputs(n=1, rows=35_000, num_classes=1).clamp_(min=0.01)  # every row a candidate
    detector_mod.Detector.postprocess(rows, conf_thresh=0.0)
    assert sizes == [30_000]


def test_total_loss_is_the_documented_weighting_of_hand_computed_parts():
    # One 10 x 12 truth on a 128 px input: its anchor is level 0's first (10, 13), at cell (13, 13). Every
    # level's logits sit around another value, so the per-level objectness weights 4 / 1 / 0.4 show.
    layout = make_anchor_layout(None, (8, 16, 32))
    g = torch.Generator().manual_seed(0)
    raw = [torch.randn(1, 3 * 8, 128 // s, 128 // s, generator=g) * 0.5 + shift for s, shift in zip((8, 16, 32), (1.0, -0.5, -2.0))]
    box = torch.tensor([[100.0, 100.0, 110.0, 112.0]])
    targets = [{"boxes": box, "labels": torch.tensor([2])}]
    total, parts = YoloLoss(layout, 3, box_loss="mse", ignore_thresh=1.01)(raw, targets)  # 1.01: no cell ignored

    tx, ty, tw, th, _, *cls_logits = raw[0][0, :8, 13, 13].tolist()
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    # Darknet's MSE: sigmoid offsets against the centre's place in its cell (105 / 8, 106 / 8), log sizes
    # against the anchor's; YOLOv3 weighs it by 2 - (box area / image area)
    err = (sig(tx) - 0.125) ** 2 + (sig(ty) - 0.25) ** 2 + (tw - math.log(10 / 10)) ** 2 + (th - math.log(12 / 13)) ** 2
    box_loss = (2 - 10 * 12 / 128**2) * err
    bce = lambda x, y: -(y * math.log(sig(x)) + (1 - y) * math.log(1 - sig(x)))  # noqa: E731
    cls_loss = sum(bce(x, y) for x, y in zip(cls_logits, (0, 0, 1))) / 3
    obj_loss = 0.0
    for level, balance in enumerate((4.0, 1.0, 0.4)):
        logits = raw[level][0, 4::8]  # (anchor, y, x) objectness logits
        target = torch.zeros_like(logits)
        if level == 0:
            target[0, 13, 13] = 1
        obj_loss += balance * float(torch.nn.functional.binary_cross_entropy_with_logits(logits, target))
    assert parts == pytest.approx({"box": box_loss, "obj": obj_loss, "cls": cls_loss}, rel=1e-5)
    # the documented weights: box 0.05, objectness 1, class 0.5
    assert float(total) == pytest.approx(0.05 * box_loss + obj_loss + 0.5 * cls_loss, rel=1e-5)


def test_postprocess_keeps_at_most_max_det_boxes_the_best_scoring():
    # 400 disjoint 10 x 10 boxes (NMS removes none), each with one class above the threshold and its own score
    g = torch.Generator().manual_seed(0)
    xy = torch.stack(torch.meshgrid(torch.arange(20.0), torch.arange(20.0), indexing="xy"), -1).reshape(-1, 2) * 20
    score = torch.randperm(400, generator=g).float() / 400 + 1e-3
    label = torch.randint(2, (400,), generator=g)
    cls = torch.nn.functional.one_hot(label, 2).float() * score[:, None]
    rows = torch.cat([xy, xy + 10, torch.ones(400, 1), cls], 1)[None]
    postprocess = create_detector("cspresnet10", "fpn", num_classes=2, **TINY).postprocess
    [every] = postprocess(rows, 0.0, 0.5, max_det=1000)
    assert len(every["scores"]) == 400
    best = score.argsort(descending=True)
    for max_det in (7, 300):
        kw = {"max_det": max_det} if max_det != 300 else {}  # 300: the default
        [kept] = postprocess(rows, 0.0, 0.5, **kw)
        assert len(kept["scores"]) == max_det
        torch.testing.assert_close(kept["scores"], score[best[:max_det]])
        torch.testing.assert_close(kept["boxes"], rows[0, best[:max_det], :4])
        assert torch.equal(kept["labels"], label[best[:max_det]])
