"""Evaluate a Simple Baselines checkpoint: PCKh table (LIP/MPII) or COCO AP, next to the mean-pose baseline.

    python simple_baseline/eval.py                         # newest checkpoint, built-in val split
    python simple_baseline/eval.py --checkpoint C.pt --data IMAGES --ann val.csv --format lip
    python simple_baseline/eval.py --visualize 8           # + 8 images: prediction red, ground truth blue
Test time: flip test (flip back, swap left/right channels, shift one pixel) and quarter-pixel refinement,
mapped back to original image pixels (simple_baseline/infer.py). Also holds the metric functions train.py uses.
"""
import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from common.data import BadImageError, exit_on_bad_input, read_image
from common.evaluation import coco_keypoint_ap, count_flops, count_parameters, pck, write_results_json
from common.geometry import affine_points, get_affine_transform
from common.heatmaps import HeatmapCodec
from common.keypoints import COCO17
from common.loader import make_loader
from common.runs import (add_common_args, at_least, checkpoint_or_exit, is_training_file, model_from_checkpoint,
                         output_dirs, pick_device)
from simple_baseline.dataset import TopDownDataset, load_split
from simple_baseline.infer import draw_prediction, heatmaps_to_image_coords, predict_heatmaps
from simple_baseline.model import LIP16, MODEL_NAME, architecture_mismatch, build_model, upgrade_checkpoint

# PCKh rows over MPII/LIP joint indices, as in the official MPII evaluation (left and right pooled).
PCKH_GROUPS = {"Head": (9,), "Shoulder": (12, 13), "Elbow": (11, 14), "Wrist": (10, 15),
               "Hip": (2, 3), "Knee": (1, 4), "Ankle": (0, 5)}
PELVIS, THORAX = 6, 7  # left out of the official mean


# ------------------------------------------------------------------------------------------ prediction

def run_predictions(model, dataset, flip_index, batch_size=32, workers=0, flip_test=True, flip_shift=True,
                    device=None):
    """Predict every sample of a (train=False) TopDownDataset. Returns a dict of numpy arrays:
    index (N,), pred (N, K, 2), scores (N, K), gt (N, K, 3), head_size (N,), center, size."""
    device = device or next(model.parameters()).device
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, workers=workers)
    parts = {k: [] for k in ("index", "pred", "scores", "gt", "head_size", "center", "size")}
    was_training = model.training
    model.eval()
    for batch in tqdm(loader, desc="eval", unit="batch", dynamic_ncols=True, leave=False):
        if "image" not in batch:  # every sample of this batch was unreadable (already warned)
            continue
        heatmaps = predict_heatmaps(model, batch["image"].to(device), flip_index, flip_test, flip_shift)
        coords, scores = heatmaps_to_image_coords(heatmaps, batch["center"].numpy(), batch["size"].numpy())
        parts["pred"].append(coords)
        parts["scores"].append(scores)
        for key, name in (("index", "index"), ("gt", "joints"), ("head_size", "head_size"),
                          ("center", "center"), ("size", "size")):
            parts[key].append(batch[name].numpy())
    model.train(was_training)
    if not parts["pred"]:
        raise SystemExit("no readable validation images (see the warnings above)")
    return {k: np.concatenate(v) for k, v in parts.items()}


# ------------------------------------------------------------------------------------------ metrics

def pckh_table(pred, gt, head_size):
    """PCKh rows (Head .. Ankle, Mean, Mean@0.1), in [0, 1]. gt: (N, K, 3) with labelled flag in column 2;
    samples without a head size are left out."""
    visible = (gt[..., 2] > 0) & np.isfinite(head_size)[:, None]
    norm = np.nan_to_num(head_size, nan=1.0)
    table = pck(pred, gt[..., :2], visible, norm, thresholds=(0.5, 0.1))
    per_joint = table[0.5][0]
    counts = visible.sum(0)
    rows = {}
    for name, joints in PCKH_GROUPS.items():
        joints = list(joints)
        hits = np.nansum(per_joint[joints] * counts[joints])
        rows[name] = float(hits / max(counts[joints].sum(), 1))
    # The official mean leaves out pelvis and thorax.
    mean_visible = visible.copy()
    mean_visible[:, [PELVIS, THORAX]] = False
    mean_table = pck(pred, gt[..., :2], mean_visible, norm, thresholds=(0.5, 0.1))
    rows["Mean"] = mean_table[0.5][1]
    rows["Mean@0.1"] = mean_table[0.1][1]
    return rows


def print_pckh(rows, title):
    """The title, then one line per row in percent."""
    width = max(len(name) for name in rows)
    print(title)
    for name, value in rows.items():
        print(f"  {name:<{width}}  {100 * value:6.2f}")


def mean_pose_in_crop(records, dataset):
    """Mean position of each joint over the training records, in the crop's heatmap coordinates
    (the 'mean pose' baseline: every validation person gets this pose, placed in its own crop)."""
    total = np.zeros((len(dataset.flip_index), 2))
    count = np.zeros(len(dataset.flip_index))
    for record in records:
        if record.get("box") is None and "center" not in record and (record["joints"][:, 2] > 0).sum() < 2:
            continue  # its crop would need the image size; the mean does not need every record
        center, size = dataset.crop_box(record, 1, 1)
        matrix = get_affine_transform(center, size, 0.0, dataset.heatmap_size)
        joints = affine_points(record["joints"], matrix)
        labelled = joints[:, 2] > 0
        total[labelled] += joints[labelled, :2]
        count[labelled] += 1
    return (total / np.maximum(count, 1)[:, None]).astype(np.float32)


def mean_pose_predictions(mean_pose, predictions, heatmap_size):
    out = np.empty_like(predictions["pred"])
    for i, (center, size) in enumerate(zip(predictions["center"], predictions["size"])):
        out[i] = affine_points(mean_pose, get_affine_transform(center, size, 0.0, heatmap_size, inverse=True))
    return out


def coco_results(predictions, records, score_threshold=0.2):
    """COCO results: keypoints [x, y, heatmap max] and, as in the paper, the box score times the mean
    of the joint scores above a threshold."""
    results = []
    for index, coords, scores in zip(predictions["index"], predictions["pred"], predictions["scores"]):
        record = records[int(index)]
        confident = scores[scores > score_threshold]
        keypoints = np.concatenate([coords, scores[:, None]], 1).reshape(-1)
        results.append({"image_id": int(record["image_id"]), "category_id": 1,
                        "keypoints": keypoints.tolist(),
                        "score": float(record.get("score", 1.0)) * float(confident.mean() if confident.size else 0.0)})
    return results


def evaluate_split(model, dataset, records, data_format, mean_pose=None, coco_gt=None, batch_size=32,
                   workers=0, flip_test=True, flip_shift=True, json_path=None, quiet=False):
    """Predict the split, print the metric table(s) and return flat metrics for TensorBoard."""
    flip_index = dataset.flip_index
    predictions = run_predictions(model, dataset, flip_index, batch_size, workers, flip_test, flip_shift)
    if data_format == "coco":
        metrics = coco_keypoint_ap(coco_gt, coco_results(predictions, records), COCO17.sigmas,
                                   print_table=not quiet)
        if mean_pose is not None:
            baseline = dict(predictions, pred=mean_pose_predictions(mean_pose, predictions, dataset.heatmap_size))
            base = coco_keypoint_ap(coco_gt, coco_results(baseline, records, -1.0), COCO17.sigmas, print_table=False)
            metrics["baseline_AP"] = base["AP"]
            if not quiet:
                print(f"mean-pose baseline on the same boxes: AP {base['AP']:.4f}")
    else:
        official = data_format == "mpii" and getattr(dataset, "official_head_boxes", False)
        label = "PCKh (head box x 0.6)" if official else "PCKh (neck-to-head-top normalized, NOT the official MPII PCKh)"
        rows = pckh_table(predictions["pred"], predictions["gt"], predictions["head_size"])
        metrics = {f"PCKh@0.5/{k}" if k != "Mean@0.1" else "PCKh@0.1/Mean": v for k, v in rows.items()}
        metrics["PCKh@0.5"] = rows["Mean"]
        if not quiet:
            print_pckh(rows, f"{label} @0.5, {len(predictions['pred'])} people")
        if mean_pose is not None:
            base_rows = pckh_table(mean_pose_predictions(mean_pose, predictions, dataset.heatmap_size),
                                   predictions["gt"], predictions["head_size"])
            metrics["baseline_PCKh@0.5"] = base_rows["Mean"]
            if not quiet:
                print(f"  mean-pose baseline on the same split: Mean {100 * base_rows['Mean']:.2f}  "
                      f"Mean@0.1 {100 * base_rows['Mean@0.1']:.2f}")
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(metrics, indent=2))
    return metrics, predictions


# ------------------------------------------------------------------------------------------ drawing

def write_visualizations(predictions, records, count, out_dir, skeleton, threshold, show_gt, layout):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for index, pred, scores, gt in zip(predictions["index"], predictions["pred"], predictions["scores"],
                                       predictions["gt"]):
        if written >= count:
            break
        record = records[int(index)]
        try:
            image = read_image(record["image"])
        except BadImageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        drawn = draw_prediction(image, pred, scores, gt if show_gt else None, skeleton, threshold, layout)
        cv2.imwrite(str(out_dir / f"{written:04d}_{Path(record['image']).stem}.jpg"),
                    cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        written += 1
    return written


def load_checked_model(args, device):
    """The newest (or --checkpoint) model; --backbone / --deconv-filters make a different architecture an error."""
    checkpoint = checkpoint_or_exit(args.checkpoint, MODEL_NAME, "python simple_baseline/train.py", args.out)
    model, saved = model_from_checkpoint(checkpoint, build_model, MODEL_NAME, upgrade_checkpoint, device)
    requested = {k: v for k, v in (("backbone", args.backbone), ("deconv_filters", args.deconv_filters))
                 if v is not None}
    mismatch = architecture_mismatch(saved["arch"], {**saved["arch"], **requested})
    if mismatch:
        raise SystemExit(f"{checkpoint}: checkpoint of another architecture: {mismatch}")
    return checkpoint, model, saved


def evaluation_data(args, saved, dirs):
    """(dataset, records, split, mean pose or None) of the split to evaluate, with the checkpoint's codec."""
    config, settings = saved["config"], saved["settings"]
    data_format = args.format or settings["format"]
    builtin = config.get("builtin_sizes") if args.data is None and args.ann is None else None
    split = load_split(data_format, args.data, args.ann, "val", data_root=dirs["root"],
                       head_boxes=args.head_boxes, detections=args.detections, builtin_sizes=builtin)
    if args.ann:
        is_training_file(args.ann, settings, warn=True)
    layout = COCO17 if data_format == "coco" else LIP16
    dataset = TopDownDataset(split["records"], layout.flip_index, HeatmapCodec.from_dict(settings["codec"]))
    dataset.official_head_boxes = split.get("official_head_boxes", False)
    mean_pose = None
    if not args.no_baseline and settings["format"] == data_format:
        # The mean pose comes from the split the checkpoint was trained on (when it is still there).
        train_split = load_split(data_format, config.get("data"), config.get("ann"), "train",
                                 data_root=dirs["root"], quiet=True, missing_ok=True,
                                 builtin_sizes=config.get("builtin_sizes"))
        if train_split is not None:
            mean_pose = mean_pose_in_crop(train_split["records"], dataset)
    return dataset, split, layout, mean_pose


def main(args):
    device = pick_device(args.device)
    checkpoint, model, saved = load_checked_model(args, device)
    dirs = output_dirs(MODEL_NAME, f"eval-{checkpoint.parent.name}", args.out)
    dataset, split, layout, mean_pose = evaluation_data(args, saved, dirs)
    data_format, (width, height) = args.format or saved["settings"]["format"], dataset.input_size
    print(f"checkpoint {checkpoint}: {saved['arch']['backbone']} + deconv {saved['arch']['deconv_filters']}, "
          f"input {width}x{height}")
    flops = count_flops(model, torch.zeros(1, 3, height, width, device=device))
    print(f"parameters {count_parameters(model):,}  GFLOPs {flops / 1e9:.3f} (one {width}x{height} crop, "
          f"multiply-add = 2)")
    metrics, predictions = evaluate_split(
        model, dataset, split["records"], data_format, mean_pose, split.get("coco"), args.batch_size,
        args.workers, not args.no_flip_test, not args.no_flip_shift, json_path=dirs["outputs"] / "metrics.json")
    if data_format == "coco":
        results = write_results_json(coco_results(predictions, split["records"]), dirs["outputs"] / "results.json")
        print(f"COCO results: {results}")
    if args.visualize:
        written = write_visualizations(predictions, split["records"], args.visualize, dirs["outputs"] / "vis",
                                       not args.no_skeleton, args.threshold, not args.no_gt, layout)
        print(f"wrote {written} images (prediction red, ground truth blue) to {dirs['outputs'] / 'vis'}")
    print(f"metrics written to {dirs['outputs'] / 'metrics.json'}")
    return metrics


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, role="eval", batch_size=32, workers=0)
    parser.add_argument("--format", choices=("lip", "mpii", "coco"), default=None,
                        help="annotation format (default: the one the checkpoint was trained on)")
    parser.add_argument("--head-boxes", default=None, help="MPII gt_valid.mat for the official PCKh head sizes")
    parser.add_argument("--detections", default=None, help="COCO: person boxes as a results JSON (default: GT boxes)")
    parser.add_argument("--backbone", default=None, help="expected backbone; an error if the checkpoint differs")
    parser.add_argument("--deconv-filters", type=at_least(1), nargs="+", default=None, help="expected deconv widths")
    parser.add_argument("--no-flip-test", action="store_true", help="one forward pass instead of two")
    parser.add_argument("--no-flip-shift", action="store_true", help="flip test without the one-pixel shift")
    parser.add_argument("--no-baseline", action="store_true", help="skip the mean-pose baseline")
    parser.add_argument("--visualize", type=at_least(0), default=0, metavar="N", help="write N validation images")
    parser.add_argument("--no-skeleton", action="store_true", help="joints only in --visualize images")
    parser.add_argument("--no-gt", action="store_true", help="leave ground truth out of --visualize images")
    parser.add_argument("--threshold", type=float, default=0.2, help="hide joints scoring below this")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_bad_input(main, parse_args())
