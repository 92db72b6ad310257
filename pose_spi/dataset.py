"""Pose-SPI data: COCO keypoint JSON -> one grayscale SxS image and its largest person's keypoints.

Also renders the built-in set (64x64 grayscale single people on dark backgrounds, the toy set's 13 points)
into `data/pose_spi_synthetic_v2/` on first use. Look at augmented samples with their targets drawn:
    python pose_spi/dataset.py --show 16 [--data IMAGES --ann ANN.json]
"""
import argparse
import json
import math
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from common import synthetic
from common.data import drop_outside, exit_on_bad_input, load_coco_keypoints, read_image
from common.drawing import draw_keypoints, show_samples
from common.geometry import flip_keypoints
from common.keypoints import layout_from_coco_category
from common.runs import at_least, data_dir, output_dirs
from pose_spi.model import POSE_SPI13, generic_layout

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as the seed's grayscale conversion
# v2: people sized, placed and posed like the toy set's (the first renderer's were smaller, anywhere in the
# frame and in any pose); a new folder so that data rendered by the first one is not reused unnoticed
SYNTHETIC_NAME = "pose_spi_synthetic_v2"
SYNTHETIC_SEEDS = {"train": 1000, "val": 2000}  # disjoint seeds: no validation figure is a training figure
SYNTHETIC_SIZES = {"train": 4000, "val": 500}


def to_gray(image_rgb):
    gray = image_rgb.astype(np.float32) @ np.asarray(GRAY_WEIGHTS, np.float32)
    return gray / 255.0


def to_input_pixels(xy, size, input_size):
    """Original-image pixels -> resized-input pixels (pixel centers at integers, as cv2.resize)."""
    return (xy + 0.5) * input_size / np.asarray(size, np.float32) - 0.5


def to_image_pixels(xy, size, input_size):
    """Inverse of to_input_pixels: resized-input pixels -> original-image pixels."""
    return (xy + 0.5) * np.asarray(size, np.float32) / input_size - 0.5


def largest_people(coco, ann_file, image_ids=None):
    """{image_id: annotation of its largest person}; annotations without keypoints or area are skipped. A person
    split into a box-only annotation and a zero-area keypoint one (some COCO-style files) gets the box back, in
    `coco` too (COCO AP scales by it); an image left with no person is named in a warning."""
    chosen, skipped, recovered, left_out = {}, [], [], []
    area_of = lambda ann: ann.get("area") or (ann["bbox"][2] * ann["bbox"][3] if "bbox" in ann else 0)
    labelled = lambda ann: bool(ann.get("keypoints")) and any(ann["keypoints"][2::3])
    for image_id in image_ids if image_ids is not None else sorted(coco.getImgIds()):
        anns = [ann for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None)) if not ann.get("iscrowd")]
        boxes = [ann for ann in anns if not labelled(ann) and area_of(ann) > 0]
        flat = [ann for ann in anns if labelled(ann) and area_of(ann) <= 0]
        if len(anns) == 2 and len(boxes) == len(flat) == 1:     # one person in two halves, nobody else
            flat[0]["area"], flat[0]["bbox"] = area_of(boxes[0]), list(boxes[0]["bbox"])
            recovered.append(flat[0].get("id"))
        best = None
        for ann in anns:
            if not labelled(ann) or area_of(ann) <= 0:
                skipped.append(ann.get("id"))
            elif best is None or area_of(ann) > best[0]:
                best = (area_of(ann), ann)
        if best is not None:
            chosen[image_id] = best[1]
        else:
            left_out.append(image_id)
    for count, what, ids in ((len(skipped), "annotations without keypoints or with zero area skipped", skipped),
                             (len(recovered), "zero-area keypoint annotations took the box of a box-only annotation "
                              "of the same image", recovered),
                             (len(left_out), "images left out: no annotated person with keypoints and area", left_out)):
        if count:
            shown = ", ".join(str(i) for i in ids[:5]) + (" ..." if count > 5 else "")
            warnings.warn(f"{ann_file}: {count} {what} (ids {shown})", stacklevel=2)
    return chosen


def split_image_ids(coco, val_fraction=0.2, seed=0):
    """A fixed random train/val split of a file's images (the seed validated on its training images)."""
    ids = np.array(sorted(coco.getImgIds()))
    order = np.random.default_rng(seed).permutation(len(ids))
    num_val = max(1, int(round(len(ids) * val_fraction)))
    return sorted(ids[order[num_val:]].tolist()), sorted(ids[order[:num_val]].tolist())


class PoseSPIDataset(Dataset):
    """One sample per image with a usable person: its largest one, resized to input_size x input_size.

    Returns {"image": (1,S,S) float in [0,1], "target": (K,3) float, "image_id", "size": (W,H) original}.
    target: x/S, y/S and v>0 (normalized, default) or the seed's raw pixels and raw v (normalize=False).
    augment: horizontal flip with left/right swap, shifts up to S/16 and scales 0.9-1.1.
    """

    def __init__(self, ann_file, image_dir, input_size=64, num_keypoints=None, image_ids=None, augment=False,
                 normalize=True, subset=None, coco=None, repeat=1):
        self.ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        self.coco = coco or load_coco_keypoints(ann_file, num_keypoints)
        self.input_size, self.augment, self.normalize = input_size, augment, normalize
        category = self.coco.dataset["categories"][0] if self.coco.dataset["categories"] else None
        people = largest_people(self.coco, self.ann_file, image_ids)
        self.image_ids = sorted(people)[:subset] if subset else sorted(people)
        self.people = [people[i] for i in self.image_ids]
        if not self.people:
            raise SystemExit(f"error: {ann_file}: no annotated person with keypoints")
        k = len(self.people[0]["keypoints"]) // 3
        if category is not None and len(category.get("keypoints", [])) == k:
            self.layout = layout_from_coco_category(category)
            self.category_id = category["id"]
        else:
            self.layout = generic_layout(k)
            self.category_id = self.people[0]["category_id"]
        self.num_keypoints = k
        self.repeat = max(1, int(repeat))  # one epoch = `repeat` passes (tiny sets: fewer epoch ends, saves)

    def __len__(self):
        return len(self.people) * self.repeat

    def input_keypoints(self, index):
        """Keypoints (K,3) of sample `index` in resized-input pixels, from the annotations alone."""
        index %= len(self.people)
        info = self.coco.loadImgs([self.image_ids[index]])[0]
        keypoints = drop_outside(np.reshape(self.people[index]["keypoints"], (-1, 3)), info["width"], info["height"])
        keypoints[:, :2] = to_input_pixels(keypoints[:, :2], (info["width"], info["height"]), self.input_size)
        return keypoints

    def load(self, index):
        """The resized grayscale image (S,S) and keypoints (K,3) in its pixels, before augmentation."""
        index %= len(self.people)
        info = self.coco.loadImgs([self.image_ids[index]])[0]
        image = read_image(self.image_dir / info["file_name"])
        h, w = image.shape[:2]
        s = self.input_size
        gray = cv2.resize(to_gray(image), (s, s), interpolation=cv2.INTER_AREA) if (h, w) != (s, s) else to_gray(image)
        keypoints = drop_outside(np.reshape(self.people[index]["keypoints"], (-1, 3)), w, h)  # no target from them
        keypoints[:, :2] = to_input_pixels(keypoints[:, :2], (w, h), s)  # the file's size, not the JSON's
        return gray, keypoints, (w, h)

    def augment_sample(self, gray, keypoints):
        s = self.input_size
        if np.random.rand() < 0.5:
            gray = gray[:, ::-1]
            keypoints = flip_keypoints(keypoints, s, self.layout.flip_index)
        scale = np.random.uniform(0.9, 1.1)
        shift = np.random.uniform(-s / 16, s / 16, size=2)
        matrix = cv2.getRotationMatrix2D((s / 2, s / 2), 0.0, scale)
        matrix[:, 2] += shift
        gray = cv2.warpAffine(np.ascontiguousarray(gray), matrix, (s, s), flags=cv2.INTER_LINEAR, borderValue=0)
        keypoints[:, :2] = keypoints[:, :2] @ matrix[:, :2].T + matrix[:, 2]
        return gray, keypoints

    def __getitem__(self, index):
        gray, keypoints, (w, h) = self.load(index)
        if self.augment:
            gray, keypoints = self.augment_sample(gray, keypoints)
        target = keypoints.copy()
        if self.normalize:
            target[:, :2] /= self.input_size
            target[:, 2] = keypoints[:, 2] > 0
        return {"image": torch.from_numpy(np.ascontiguousarray(gray, np.float32))[None],
                "target": torch.from_numpy(target), "image_id": self.image_ids[index % len(self.people)],
                "size": torch.tensor([w, h], dtype=torch.float32)}


# ---------------------------------------------------------------------------------------------
# Built-in data: single figures from common.synthetic, drawn in the toy set's style.

def synthetic_paths(data_root):
    root = Path(data_root) / SYNTHETIC_NAME
    return {split: (root / "images" / split, root / "annotations" / f"person_keypoints_{split}.json")
            for split in SYNTHETIC_SEEDS}


def render_toy_style_person(rng, size=64, supersample=2):
    """One toy-set-style image: a single figure facing the camera, near the center, its keypoints spanning
    50-80% of the image, on black (75%) or a dim cluttered background, drawn at
    `supersample` x the size and area-averaged down.

    The ranges follow the toy set's own statistics (103 people: keypoint-box center x 32 +- 3, y 34 +- 4 px;
    longest keypoint-box side 31-51 px for 90% of them; mean-pose baseline AP 0.05).
    Returns RGB uint8 (size, size, 3), keypoints (13, 3) in the POSE_SPI13 order (all v=2, inside the image,
    as in the toy set) and the person's box [x, y, w, h] from its drawn pixels.
    """
    big = size * supersample
    index = [synthetic.HUMAN_POINT_NAMES.index(n) for n in POSE_SPI13.names]
    while True:  # the toy set shows people facing the camera: drop back views, whose left/right are ambiguous
        # joint angles at 0.85 of the full human range: with it the mean-pose baseline scores AP 0.05 here,
        # as on the toy set (0.052); the full range (0.03) is harder than the toy set, 0.5 easier (0.12)
        fig = synthetic.random_human_figure(rng, 0.7 * big, (0, 0), angle_range=0.85)
        if math.cos(fig.yaw) > 0:
            break
    extent = fig.points[index].max(0) - fig.points[index].min(0)
    fig = fig.moved(rng.uniform(0.5, 0.8) * big / extent.max(), (0, 0))
    box_center = (fig.points[index].max(0) + fig.points[index].min(0)) / 2
    target = big * np.array([0.5 + rng.normal(0, 0.045), 0.53 + rng.normal(0, 0.06)])
    lo = fig.points.min(0) - fig.head_radius - box_center + target
    hi = fig.points.max(0) + fig.head_radius - box_center + target
    target += np.maximum(-lo, 0) - np.maximum(hi - big, 0)  # keep the whole figure in the image
    fig = fig.moved(1.0, target - box_center)
    if rng.random() < 0.75:  # the toy set's backgrounds were removed (black); some dim clutter for robustness
        canvas = np.zeros((big, big, 3), np.uint8)
    else:
        canvas = (synthetic.random_background(rng, (big, big)) * rng.uniform(0.05, 0.25)).astype(np.uint8)
    labels, colors, _ = synthetic.rasterize_human(fig, (0, 0), canvas.shape[:2])
    canvas[labels > 0] = colors[labels[labels > 0]]
    image = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    xy = (fig.points[index] + 0.5) / supersample - 0.5  # pixel centers at integers in both images
    keypoints = np.concatenate([np.clip(xy, 0, size - 1), np.full((len(index), 1), 2.0)], 1)
    ys, xs = np.nonzero(labels)
    x0, y0 = min(xs.min() / supersample, keypoints[:, 0].min()), min(ys.min() / supersample, keypoints[:, 1].min())
    x1 = max((xs.max() + 1) / supersample, keypoints[:, 0].max() + 1)
    y1 = max((ys.max() + 1) / supersample, keypoints[:, 1].max() + 1)
    return image, keypoints.astype(np.float32), [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def render_synthetic_split(image_dir, ann_file, num_images, seed, size=64):
    """Write num_images grayscale PNGs and their COCO JSON (13 Pose-SPI keypoints, category id 1).

    As in the toy set, `area` is the person box's area (the toy set's annotations are boxes).
    """
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    rng = np.random.default_rng(seed)
    for index in range(num_images):
        image, keypoints, box = render_toy_style_person(rng, size)
        name = f"{index:06d}.png"
        cv2.imwrite(str(image_dir / name), np.round(to_gray(image) * 255).astype(np.uint8))
        images.append({"id": index + 1, "file_name": name, "width": size, "height": size})
        annotations.append({
            "id": index + 1, "image_id": index + 1, "category_id": 1, "iscrowd": 0, "bbox": box,
            "area": box[2] * box[3], "keypoints": [round(float(v), 2) for v in keypoints.reshape(-1)],
            "num_keypoints": int((keypoints[:, 2] > 0).sum())})
    category = {"id": 1, "name": "person", "supercategory": "person", "keypoints": list(POSE_SPI13.names),
                "skeleton": [[a + 1, b + 1] for a, b in POSE_SPI13.skeleton]}
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = ann_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [category]}))
    tmp.replace(ann_file)  # the JSON appears last and atomically: its presence marks a finished split


def ensure_synthetic(data_root, sizes=None, size=64):
    """Render the built-in train/val sets under data_root on first use; returns synthetic_paths()."""
    sizes = sizes or SYNTHETIC_SIZES
    paths = synthetic_paths(data_root)
    for split, (image_dir, ann_file) in paths.items():
        if not ann_file.is_file():
            print(f"rendering {sizes[split]} built-in {split} images into {image_dir.parent.parent}")
            render_synthetic_split(image_dir, ann_file, sizes[split], SYNTHETIC_SEEDS[split], size)
    return paths


def add_data_args(parser):
    """Data flags, plus the seed's names as aliases (--data_path, --annotation_path, --batch, --output_dir)."""
    g = parser.add_argument_group("data", "the seed's flag names work too: --data_path, --annotation_path, --epochs, "
                                  "--batch, --lr, --output_dir, --num_keypoints")
    g.add_argument("--data_path", dest="data", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    g.add_argument("--annotation_path", dest="ann", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    g.add_argument("--batch", dest="batch_size", type=at_least(1), default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    g.add_argument("--output_dir", dest="out", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    g.add_argument("--val-data", help="validation image folder (default: --data)")
    g.add_argument("--val-ann", help="validation annotations (default: a fixed 20%% split of --ann)")
    g.add_argument("--val-fraction", type=at_least(0.0, above=True), default=0.2,
                   help="share of --ann held out when no --val-ann")
    g.add_argument("--subset", type=at_least(1), default=None, help="train on the first N images only (overfit check)")
    g.add_argument("--repeat", type=at_least(1), default=1,
                   help="passes over the training images per epoch (tiny sets: fewer per-epoch saves)")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="turn flip/shift/scale off")
    g.add_argument("--raw-targets", action="store_true",
                   help="the seed's targets: raw pixel x,y and v regressed as a float (no BCE on visibility)")
    return parser


def build_datasets(args, data_root):
    """(train_set, val_set) from --data/--ann (with a fixed split unless --val-ann), else the built-in set."""
    common = dict(input_size=args.input_size, num_keypoints=args.num_keypoints, normalize=not args.raw_targets)
    if args.ann is None:
        if args.data is not None:
            raise SystemExit("error: --data needs --ann (the COCO keypoint JSON of those images)")
        paths = ensure_synthetic(data_root, size=args.input_size)
        (train_dir, train_ann), (val_dir, val_ann) = paths["train"], paths["val"]
        train = PoseSPIDataset(train_ann, train_dir, augment=args.augment, subset=args.subset,
                               repeat=args.repeat, **common)
        val = PoseSPIDataset(val_ann, val_dir, **common)
        return train, val
    image_dir = Path(args.data) if args.data else Path(args.ann).parent
    if args.val_ann:
        train = PoseSPIDataset(args.ann, image_dir, augment=args.augment, subset=args.subset,
                               repeat=args.repeat, **common)
        val = PoseSPIDataset(args.val_ann, Path(args.val_data or image_dir), **common)
        return train, val
    coco = load_coco_keypoints(args.ann, args.num_keypoints)
    train_ids, val_ids = split_image_ids(coco, args.val_fraction)
    train = PoseSPIDataset(args.ann, image_dir, image_ids=train_ids, augment=args.augment, subset=args.subset,
                           coco=coco, repeat=args.repeat, **common)
    val = PoseSPIDataset(args.ann, image_dir, image_ids=val_ids, coco=coco, **common)
    return train, val


def show(dataset, count, out_path):
    """Write a grid of `count` augmented samples with their target keypoints drawn."""
    tiles = []
    for index in range(min(count, len(dataset))):
        sample = dataset[index]
        image = cv2.cvtColor(np.round(sample["image"][0].numpy() * 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)
        keypoints = sample["target"].numpy().copy()
        if dataset.normalize:
            keypoints[:, :2] *= dataset.input_size
        tile = cv2.resize(image, (4 * image.shape[1], 4 * image.shape[0]), interpolation=cv2.INTER_NEAREST)
        keypoints[:, :2] *= 4
        tiles.append(draw_keypoints(tile, keypoints, dataset.layout.skeleton, scores=False))
    return show_samples(tiles, out_path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="image folder (default: the built-in set)")
    parser.add_argument("--ann", help="COCO keypoint JSON (default: the built-in set)")
    parser.add_argument("--out", help="output root (default $POSE_OUTPUT_ROOT or .)")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--num-keypoints", "--num_keypoints", type=int, default=None)
    parser.add_argument("--show", type=at_least(1), default=16, help="number of augmented samples to draw")
    add_data_args(parser)
    args = parser.parse_args()
    train, _ = build_datasets(args, data_dir(args.out))
    path = show(train, args.show, output_dirs("pose_spi", "show", args.out)["outputs"] / "show_samples.png")
    print(f"{len(train)} training samples; wrote {args.show} drawn samples to {path}")


if __name__ == "__main__":
    exit_on_bad_input(main)
