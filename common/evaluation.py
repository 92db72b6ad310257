"""Metrics every model folder reports: COCO keypoint AP/AR (pycocotools), PCK/PCKh, params and FLOPs."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval
from torch.utils.flop_counter import FlopCounterMode

from common.data import load_coco_keypoints

COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def coco_keypoint_ap(coco_gt, results, sigmas, print_table=True, image_ids=None):
    """COCO keypoint AP/AR through pycocotools' COCOeval with the layout's sigmas (any keypoint count).

    coco_gt: a pycocotools COCO object or an annotation file path. results: a list of
    {"image_id", "category_id", "keypoints": [x, y, score] * K, "score"}. Every image of the
    ground truth is evaluated unless `image_ids` narrows it (images without people count too).
    Returns the 10 summary numbers by name.
    """
    if isinstance(coco_gt, (str, Path)):
        coco_gt = load_coco_keypoints(coco_gt)
    if not results:  # pycocotools cannot load an empty result list
        if print_table:
            print("no detections: every COCO metric is 0")
        return {name: 0.0 for name in COCO_METRIC_NAMES}
    quiet = contextlib.nullcontext() if print_table else contextlib.redirect_stdout(io.StringIO())
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds ids/areas in place
    evaluator = COCOeval(coco_gt, coco_dt, "keypoints")
    evaluator.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
    if image_ids is not None:
        evaluator.params.imgIds = list(image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    with quiet:
        evaluator.summarize()
    return {name: float(value) for name, value in zip(COCO_METRIC_NAMES, evaluator.stats)}


def write_results_json(results, path):
    """Write COCO-format keypoint results (floats rounded to 2 decimals, scores to 5)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rounded = [{**r, "keypoints": [round(float(v), 2) for v in r["keypoints"]],
                "score": round(float(r["score"]), 5)} for r in results]
    path.write_text(json.dumps(rounded))
    return path


def pck(pred, gt, visible, norm, thresholds=(0.5,)):
    """Percentage of correct keypoints: distance / norm <= threshold, over labelled joints.

    pred, gt: (N, K, 2); visible: (N, K) bool (which joints count); norm: (N,) per-sample length
    (head segment for PCKh, box size for PCK). Returns {threshold: (per_joint (K,), mean)}, the
    mean being over all counted joints (as the MPII evaluation weights it), NaN per joint without any.
    """
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    visible = np.asarray(visible, bool)
    norm = np.asarray(norm, np.float64).reshape(-1, 1)
    distance = np.linalg.norm(pred - gt, axis=-1) / np.maximum(norm, 1e-12)
    counts = visible.sum(0)
    table = {}
    for threshold in thresholds:
        hits = (distance <= threshold) & visible
        with np.errstate(invalid="ignore", divide="ignore"):
            per_joint = hits.sum(0) / counts
        mean = hits.sum() / max(counts.sum(), 1)
        table[threshold] = (per_joint, float(mean))
    return table


def count_parameters(model, trainable_only=False) -> int:
    """Parameter count (BatchNorm buffers excluded); works on meta-device models."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model, example_input) -> int:
    """FLOPs of one forward pass (torch.utils.flop_counter: a multiply-add counts as 2)."""
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    with torch.no_grad(), counter:
        model(example_input)
    model.train(was_training)
    return int(counter.get_total_flops())
