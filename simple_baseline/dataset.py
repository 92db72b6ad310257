"""Top-down single-person data for Simple Baselines: LIP CSV, MPII JSON and COCO keypoints readers,
and one `TopDownDataset` that crops a person (affine warp, never a squashing resize), augments it and
builds Gaussian heatmap targets.  `python simple_baseline/dataset.py --show 8` writes a grid of
augmented built-in samples with their targets drawn.
"""
import argparse
import csv
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.io import loadmat

from common.data import (IMAGENET_MEAN, IMAGENET_STD, BadImageError, drop_outside, load_coco_keypoints, normalize_image,
                         read_image)
from common.drawing import draw_heatmap_overlay, show_samples
from common.geometry import (affine_points, box_to_center_scale, flip_image, flip_keypoints,
                             get_affine_transform, warp_image)
from common.heatmaps import HeatmapCodec
from common.runs import output_dirs
from simple_baseline.crops import ensure_crops
from simple_baseline.model import LIP16

LIP_NUM_JOINTS = 16
PAPER_SIGMA = 2.0  # the paper's target sigma in heatmap pixels (chosen for 64x48 heatmaps)
NECK, HEAD_TOP = 8, 9  # MPII/LIP indices: neck-to-head-top is our (non-official) LIP head size


# ----------------------------------------------------------------------------------------------
# Readers. Each returns a list of records: {"image": path, "joints": (K, 3) float32 [x, y, w]
# (w = 1 labelled, 0 missing), and either "box" (x, y, w, h) or "center" + "height" (MPII)},
# plus "head_size" when the format defines one.


def read_lip_csv(csv_path, image_dir, check_images=True):
    """LIP pose CSV: no header, 49 columns `name, x0, y0, v0, ..., x15, y15, v15`, missing joints
    `nan,nan,nan`. A labelled joint has weight 1 whatever its v (LIP's v flags occlusion, not absence).
    Bad rows (wrong column count, unparsable numbers, missing image) are warned about and skipped."""
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    records, skipped = [], 0
    with open(csv_path, newline="") as f:
        for row_number, row in enumerate(csv.reader(f), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 1 + 3 * LIP_NUM_JOINTS:
                warnings.warn(f"{csv_path}: row {row_number}: expected {1 + 3 * LIP_NUM_JOINTS} columns, "
                              f"got {len(row)}; row skipped")
                skipped += 1
                continue
            try:
                values = np.array([float(cell) for cell in row[1:]], np.float64).reshape(LIP_NUM_JOINTS, 3)
            except ValueError as exc:
                warnings.warn(f"{csv_path}: row {row_number}: {exc}; row skipped")
                skipped += 1
                continue
            image_path = image_dir / row[0].strip()
            if check_images and not image_path.is_file():
                warnings.warn(f"{csv_path}: row {row_number}: image {image_path} not found; row skipped")
                skipped += 1
                continue
            labelled = np.isfinite(values[:, 0]) & np.isfinite(values[:, 1])
            joints = np.zeros((LIP_NUM_JOINTS, 3), np.float32)
            joints[labelled, :2] = values[labelled, :2]
            joints[labelled, 2] = 1.0
            records.append({"image": str(image_path), "joints": joints, "box": None,
                            "head_size": neck_to_head_top(joints)})
    if skipped:
        warnings.warn(f"{csv_path}: skipped {skipped} bad row(s), kept {len(records)}")
    return records, skipped


def neck_to_head_top(joints):
    """Upper-neck to head-top distance, our head size for LIP and for MPII without head boxes
    (NOT the official MPII PCKh normalizer, which is 0.6 x the head box diagonal)."""
    if joints[NECK, 2] > 0 and joints[HEAD_TOP, 2] > 0:
        return float(np.linalg.norm(joints[NECK, :2] - joints[HEAD_TOP, :2]))
    return float("nan")


def read_mpii_json(json_path, image_dir, head_boxes=None):
    """MPII in the Simple Baselines JSON layout (list of {image, center, scale, joints, joints_vis}).
    head_boxes: optional (N, 2, 2) array from the official gt_valid.mat (see `load_mpii_head_boxes`)."""
    json_path = Path(json_path)
    try:
        entries = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"{json_path}: cannot read MPII annotations: {exc}")
    if head_boxes is not None and len(head_boxes) != len(entries):
        raise SystemExit(f"{json_path}: {len(entries)} entries but {len(head_boxes)} head boxes")
    records = []
    for i, entry in enumerate(entries):
        joints = np.zeros((LIP_NUM_JOINTS, 3), np.float32)
        joints[:, :2] = np.asarray(entry["joints"], np.float32)
        joints[:, 2] = np.asarray(entry["joints_vis"], np.float32) > 0
        center = np.asarray(entry["center"], np.float32).copy()
        scale = float(entry["scale"])
        # MPII's center sits high and its scale is tight (person height / 200): the official code
        # moves the center down by 15 x scale and pads by 1.25 (our 1.25 padding below).
        center[1] += 15 * scale
        if head_boxes is not None:
            head_size = 0.6 * float(np.linalg.norm(head_boxes[i][1] - head_boxes[i][0]))
        else:
            head_size = neck_to_head_top(joints)
        records.append({"image": str(Path(image_dir) / entry["image"]), "joints": joints,
                        "center": center, "height": scale * 200.0, "head_size": head_size})
    return records


def load_mpii_head_boxes(mat_path):
    """(N, 2, 2) head boxes [[x1, y1], [x2, y2]] from the official MPII gt_valid.mat."""
    boxes = loadmat(mat_path)["headboxes_src"]  # (2, 2, N)
    return np.transpose(boxes, (2, 1, 0)).astype(np.float32)


def read_coco_topdown(ann_file, image_dir, detections=None, num_keypoints=17, min_score=0.0):
    """COCO keypoints, one record per person: ground-truth boxes of non-crowd people with at least
    one labelled keypoint, or (detections = a results JSON of boxes) one record per detected box."""
    coco = load_coco_keypoints(ann_file, num_keypoints=num_keypoints)
    records = []
    if detections is None:
        for ann in coco.loadAnns(coco.getAnnIds(iscrowd=False)):
            x, y, w, h = ann["bbox"]
            if ann.get("num_keypoints", 0) == 0 or w < 1 or h < 1:
                continue
            info = coco.imgs[ann["image_id"]]
            joints = drop_outside(np.reshape(ann["keypoints"], (-1, 3)), info["width"], info["height"])
            joints[:, 2] = joints[:, 2] > 0
            records.append({"image": str(Path(image_dir) / info["file_name"]), "joints": joints,
                            "box": (x, y, w, h), "image_id": ann["image_id"], "score": 1.0})
    else:
        boxes = json.loads(Path(detections).read_text())
        for det in boxes:
            if det.get("category_id", 1) != 1 or det.get("score", 1.0) < min_score:
                continue
            info = coco.imgs[det["image_id"]]
            records.append({"image": str(Path(image_dir) / info["file_name"]),
                            "joints": np.zeros((num_keypoints, 3), np.float32), "box": tuple(det["bbox"]),
                            "image_id": det["image_id"], "score": float(det.get("score", 1.0))})
    return records, coco


def load_split(data_format, data, ann, split, data_root=None, head_boxes=None, detections=None,
               quiet=False, missing_ok=False, builtin_sizes=None):
    """Records of one split. With `data` and `ann` unset: the built-in single-person crops
    (common.synthetic, rendered under <data_root>/data on first use) as a LIP CSV or COCO JSON.
    Returns {"records", "coco" (COCO only), "official_head_boxes"} or None (missing_ok, files absent)."""
    if data is None and ann is None:
        if data_format == "mpii":
            raise SystemExit("--format mpii: there is no built-in MPII data; give --data IMAGES --ann FILE.json")
        root = Path(ensure_crops(data_root, **(builtin_sizes or {})))
        data = root / "images" / split
        ann = root / "annotations" / (f"lip_{split}.csv" if data_format == "lip" else f"person_keypoints_{split}.json")
    if ann is None or data is None:
        raise SystemExit(f"give both --data (image folder) and --ann (annotation file) for the {split} split")
    if not Path(ann).is_file():
        if missing_ok:
            return None
        raise SystemExit(f"{ann}: annotation file not found")
    if data_format == "lip":
        records, _ = read_lip_csv(ann, data)
        result = {"records": records}
    elif data_format == "mpii":
        boxes = load_mpii_head_boxes(head_boxes) if head_boxes else None
        result = {"records": read_mpii_json(ann, data, boxes), "official_head_boxes": boxes is not None}
    elif data_format == "coco":
        records, coco = read_coco_topdown(ann, data, detections)
        result = {"records": records, "coco": coco}
    else:
        raise SystemExit(f"unknown --format {data_format!r}; choose lip, mpii or coco")
    if not result["records"]:
        raise SystemExit(f"{ann}: no usable people in the {split} split")
    if not quiet:
        print(f"{split}: {len(result['records'])} people from {ann}")
    return result


# ----------------------------------------------------------------------------------------------
# The dataset


def joints_extent_box(joints, image_width, image_height):
    """LIP has no person boxes: the labelled joints' extent, or the whole image when fewer than two
    joints are labelled (LIP images are already person crops)."""
    labelled = joints[:, 2] > 0
    if labelled.sum() >= 2:
        x0, y0 = joints[labelled, :2].min(0)
        x1, y1 = joints[labelled, :2].max(0)
        if x1 - x0 >= 2 or y1 - y0 >= 2:
            return (x0, y0, max(x1 - x0, 1.0), max(y1 - y0, 1.0))
    return (0.0, 0.0, float(image_width), float(image_height))


def target_codec(input_size, stride, sigma) -> HeatmapCodec:
    """The targets' owner: heatmaps are the crop at 1/stride, Gaussians centered at the exact sub-pixel
    position (heatmap x = input x / stride, so the heatmap's inverse affine maps a peak to original pixels)."""
    width, height = int(input_size[0]), int(input_size[1])
    return HeatmapCodec((width, height), (width // stride, height // stride), sigma, center="subpixel")


class TopDownDataset(torch.utils.data.Dataset):
    """Crops one person per record to the codec's input size (W, H) and returns
    image (3, H, W) ImageNet-normalized RGB, target (K, H/s, W/s), target_weight (K,), and what
    evaluation needs to map predictions back: center, size (the crop box in original pixels),
    joints (K, 3) in original pixels, head_size, index.

    The heatmap grid is the crop box mapped onto the codec's heatmap size by the same affine as the input.
    """

    def __init__(self, records, flip_index, codec: HeatmapCodec, train=False, scale_factor=0.25,
                 rotation_factor=30.0, rotation_prob=0.6, flip_prob=0.5, padding=1.25):
        self.records = records
        self.flip_index = list(flip_index)
        self.codec = codec
        self.input_size, self.heatmap_size = codec.input_size, codec.heatmap_size
        self.train = train
        self.scale_factor, self.rotation_factor = scale_factor, rotation_factor
        self.rotation_prob, self.flip_prob, self.padding = rotation_prob, flip_prob, padding

    def __len__(self):
        return len(self.records)

    def crop_box(self, record, image_width, image_height):
        """Centre and (w, h) of the crop in original pixels, at the input's aspect ratio, padded."""
        aspect = self.input_size[0] / self.input_size[1]
        if "center" in record:  # MPII: center + person height
            h = record["height"] * self.padding
            return np.asarray(record["center"], np.float32), np.array([h * aspect, h], np.float32)
        box = record["box"] or joints_extent_box(record["joints"], image_width, image_height)
        return box_to_center_scale(box, aspect, self.padding)

    def __getitem__(self, index):
        record = self.records[index]
        try:
            image = read_image(record["image"])
        except BadImageError as exc:
            warnings.warn(f"{exc}; sample skipped")
            return None
        joints = record["joints"].copy()
        image_height, image_width = image.shape[:2]
        center, size = self.crop_box(record, image_width, image_height)
        rotation = 0.0
        if self.train:
            # Paper augmentation: scale, rotation (with probability), horizontal flip with left/right swap.
            sf, rf = self.scale_factor, self.rotation_factor
            size = size * np.clip(np.random.randn() * sf + 1, 1 - sf, 1 + sf)
            if np.random.rand() < self.rotation_prob:
                rotation = float(np.clip(np.random.randn() * rf, -2 * rf, 2 * rf))
            if np.random.rand() < self.flip_prob:
                image = flip_image(image)
                joints = flip_keypoints(joints, image_width, self.flip_index)
                center = np.array([image_width - 1 - center[0], center[1]], np.float32)

        input_matrix = get_affine_transform(center, size, rotation, self.input_size)
        crop = warp_image(image, input_matrix, self.input_size)
        heatmap_matrix = get_affine_transform(center, size, rotation, self.heatmap_size)
        joints_on_heatmap = affine_points(joints, heatmap_matrix)
        target, target_weight = self.codec.encode(joints_on_heatmap)
        return {
            "image": normalize_image(crop),
            "target": torch.from_numpy(target),
            "target_weight": torch.from_numpy(target_weight),
            "center": torch.from_numpy(np.asarray(center, np.float32)),
            "size": torch.from_numpy(np.asarray(size, np.float32)),
            "joints": torch.from_numpy(record["joints"].astype(np.float32)),
            "head_size": torch.tensor(record.get("head_size", float("nan")), dtype=torch.float32),
            "index": torch.tensor(index),
        }


def denormalize(image_tensor):
    """(3, H, W) normalized tensor -> (H, W, 3) uint8 RGB, for drawing."""
    pixels = image_tensor.detach().cpu().numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(pixels * 255.0, 0, 255).astype(np.uint8)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--show", type=int, default=8, help="how many augmented training samples to draw")
    parser.add_argument("--input-size", type=int, nargs=2, default=(128, 128), metavar=("W", "H"))
    parser.add_argument("--out", default=None, help="output root (default $POSE_OUTPUT_ROOT or .)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    np.random.seed(args.seed)
    dirs = output_dirs("simple_baseline", "show", args.out)
    records = load_split("lip", None, None, "train", dirs["root"])["records"]
    dataset = TopDownDataset(records, LIP16.flip_index, target_codec(args.input_size, 4, PAPER_SIGMA), train=True)
    tiles = []
    for i in range(min(args.show, len(dataset))):
        sample = dataset[i]
        if sample is None:
            continue
        tiles.append(draw_heatmap_overlay(denormalize(sample["image"]), sample["target"].numpy()))
    out_path = Path(dirs["outputs"]) / "dataset_samples.png"
    show_samples(tiles, out_path)
    print(f"wrote {len(tiles)} augmented samples with their targets to {out_path}")


if __name__ == "__main__":
    main()
