"""COCO keypoints + cached teacher maps for distillation, with one joint affine augmentation.

    python rtpe/dataset.py --show 8        # the seed's dataloader pictures, after augmentation

Each sample: image (3,S,S) ImageNet-normalized; at stride 4: ground-truth heatmaps (sigma 1.75),
teacher heatmaps warped by the same affine, person segmentation (union of non-crowd masks), loss
weights (0 on crowd regions and zero-keypoint people), and per-person flat joint indices for the
associative-embedding loss. Rotation +-45, scale 0.7-1.3, translation 10%, flip 0.5 with left/right
channels swapped (the seed flipped without swapping).
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from common.data import (IMAGENET_MEAN, IMAGENET_STD, drop_outside, exit_on_bad_input, load_coco_keypoints,
                         read_image)
from common.drawing import draw_heatmap_overlay, show_samples
from common.geometry import affine_points, get_affine_transform
from common.heatmaps import HeatmapCodec
from common.keypoints import COCO17
from common.loader import collate_skip_bad
from common.runs import output_dirs
from higher_hrnet.scenes import ensure_scenes
from rtpe.model import STRIDE
from rtpe.teacher_inference import ensure_builtin_cache, read_entry, read_index

GT_SIGMA = 1.75   # ground-truth heatmap sigma in map pixels (the seed's)
MEAN_RGB = tuple(int(round(255 * float(m))) for m in IMAGENET_MEAN)  # padding color: 0 after normalization


def target_codec(crop_size, sigma=GT_SIGMA) -> HeatmapCodec:
    """The ground truth's owner: Gaussians at the exact sub-pixel position on the stride-4 map of the crop."""
    return HeatmapCodec((crop_size, crop_size), (crop_size // STRIDE, crop_size // STRIDE), sigma, "subpixel")


def to_3x3(affine):
    return np.vstack([np.asarray(affine, np.float64), [0, 0, 1]])


def random_augmentation(image_size, crop_size, rotation=45, scale_range=(0.7, 1.3), translation=0.1,
                        flip_probability=0.5):
    """(center, box size, rotation, flip) of one random crop, drawn from `random` (seeded per sample)."""
    width, height = image_size
    scale = random.uniform(*scale_range)
    box = max(width, height) / scale
    center = (width / 2 + random.uniform(-translation, translation) * box,
              height / 2 + random.uniform(-translation, translation) * box)
    return center, box, random.uniform(-rotation, rotation), random.random() < flip_probability


def crop_affine(center, box, rotation, flip, crop_size):
    """Original pixels -> network input pixels (pixel centers on integers), mirrored when `flip`."""
    matrix = to_3x3(get_affine_transform(center, (box, box), rotation, (crop_size, crop_size)))
    if flip:
        matrix = np.array([[-1, 0, crop_size - 1], [0, 1, 0], [0, 0, 1]], np.float64) @ matrix
    return matrix[:2]


def input_to_map(affine):
    """Network input pixels -> stride-4 map pixels (map = input / 4, the convention of the whole folder)."""
    return (np.diag([1 / STRIDE, 1 / STRIDE, 1]) @ to_3x3(affine))[:2]


def warp_channels(maps, affine, size, interpolation=cv2.INTER_LINEAR):
    """Warp (C,h,w) float maps with a 2x3 affine to size (W,H); zero outside."""
    out = np.zeros((len(maps), size[1], size[0]), np.float32)
    for start in range(0, len(maps), 4):  # warpAffine handles up to 4 channels at once
        chunk = np.ascontiguousarray(maps[start:start + 4].transpose(1, 2, 0))
        warped = cv2.warpAffine(chunk, np.asarray(affine, np.float32), size, flags=interpolation,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        out[start:start + 4] = warped.reshape(size[1], size[0], -1).transpose(2, 0, 1)
    return out


def teacher_to_map(entry, image_to_map):
    """Affine taking the cached teacher map's pixels to this sample's map pixels."""
    return (to_3x3(image_to_map) @ np.linalg.inv(to_3x3(entry["affine"])))[:2]


def tag_indices(joints, map_size):
    """(P,K) flat indices y*w+x of the labelled joints inside the map, -1 elsewhere."""
    width, height = map_size
    x, y = np.round(joints[..., 0]).astype(np.int64), np.round(joints[..., 1]).astype(np.int64)
    inside = (joints[..., 2] > 0) & (x >= 0) & (x < width) & (y >= 0) & (y < height)
    return np.where(inside, y * width + x, -1)


class DistillationDataset(Dataset):
    """One COCO split (+ its teacher cache). `augment=False` gives the centered, unrotated crop."""

    def __init__(self, image_dir, ann_file, cache_dir=None, crop_size=448, augment=True,
                 image_ids=None, layout=COCO17, sigma=GT_SIGMA):
        self.image_dir, self.crop_size, self.augment = Path(image_dir), crop_size, augment
        self.layout, self.codec = layout, target_codec(crop_size, sigma)
        self.coco = load_coco_keypoints(ann_file, num_keypoints=layout.num_keypoints)
        self.image_ids = sorted(self.coco.getImgIds()) if image_ids is None else list(image_ids)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.cache_index = read_index(self.cache_dir) if self.cache_dir else None
        if self.cache_dir and self.cache_index is None:
            raise SystemExit(f"{self.cache_dir}: no teacher cache index.json (run rtpe/teacher_inference.py)")

    def __len__(self):
        return len(self.image_ids)

    def annotations(self, image_id):
        return self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))

    def __getitem__(self, index):
        image_id = self.image_ids[index]
        info = self.coco.loadImgs(image_id)[0]
        image = read_image(self.image_dir / info["file_name"])
        height, width = image.shape[:2]
        anns = self.annotations(image_id)
        size, map_size = self.crop_size, self.codec.heatmap_size

        if self.augment:
            center, box, rotation, flip = random_augmentation((width, height), size)
        else:
            center, box, rotation, flip = (width / 2, height / 2), max(width, height), 0.0, False
        to_input = crop_affine(center, box, rotation, flip, size)
        to_map = input_to_map(to_input)

        crop = cv2.warpAffine(image, to_input.astype(np.float32), (size, size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=MEAN_RGB)
        tensor = torch.from_numpy(crop).permute(2, 0, 1).float().div_(255)
        tensor = (tensor - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)

        people = [a for a in anns if not a.get("iscrowd", 0)]
        segmentation = np.zeros((height, width), np.uint8)
        ignore = np.zeros((height, width), np.uint8)
        for ann in anns:
            if not ann.get("segmentation"):
                continue
            mask = self.coco.annToMask(ann)
            if ann.get("iscrowd", 0) or ann.get("num_keypoints", 0) == 0:
                ignore |= mask      # crowds and unlabelled people: neither positive nor negative
            if not ann.get("iscrowd", 0):
                segmentation |= mask
        segmentation = cv2.warpAffine(segmentation.astype(np.float32), to_map.astype(np.float32), map_size,
                                      flags=cv2.INTER_LINEAR) > 0.5
        ignore = cv2.warpAffine(ignore.astype(np.float32), to_map.astype(np.float32), map_size,
                                flags=cv2.INTER_LINEAR) > 0
        weight = (~ignore).astype(np.float32)

        flip_index = self.layout.flip_index
        labelled = [a for a in people if a.get("num_keypoints", 0) > 0]
        joints = np.array([np.reshape(a["keypoints"], (-1, 3)) for a in labelled], np.float32)
        joints = drop_outside(joints.reshape(-1, self.layout.num_keypoints, 3), width, height)
        joints = affine_points(joints, to_map)
        if flip:
            joints = joints[:, flip_index]
        heatmaps, _ = self.codec.encode(joints)

        sample = {"image": tensor, "heatmaps": torch.from_numpy(heatmaps),
                  "segmentation": torch.from_numpy(segmentation.astype(np.float32))[None],
                  "weight": torch.from_numpy(weight)[None],
                  "tag_index": torch.from_numpy(tag_indices(joints, map_size)),
                  "image_id": image_id}
        if self.cache_dir is not None:
            entry_name = self.cache_index["images"].get(info["file_name"])
            if entry_name is None:
                raise SystemExit(f"{self.cache_dir}: no teacher maps for {info['file_name']}")
            entry = read_entry(self.cache_dir / entry_name)
            teacher = warp_channels(entry["heatmaps"], teacher_to_map(entry, to_map), map_size)
            if flip:
                teacher = teacher[flip_index]
            sample["teacher"] = torch.from_numpy(np.ascontiguousarray(teacher))
        return sample


def collate_people(samples):
    """collate_skip_bad, padding the per-person tag indices (P,K) to the batch's largest person count."""
    good = [s for s in samples if s is not None]
    people = max([1] + [len(s["tag_index"]) for s in good])
    for s in good:
        pad = torch.full((people - len(s["tag_index"]), s["tag_index"].shape[1]), -1, dtype=torch.long)
        s["tag_index"] = torch.cat([s["tag_index"].long(), pad])
    return collate_skip_bad(samples)


def sample_picture(sample):
    """The seed's dataloader picture: image | ignore mask | GT heatmaps | teacher heatmaps | segmentation."""
    image = sample["image"] * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    image = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    size = image.shape[1::-1]

    def gray(map_2d):
        up = cv2.resize(np.asarray(map_2d, np.float32), size, interpolation=cv2.INTER_NEAREST)
        return np.repeat((up.clip(0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)

    panels = [image, gray(sample["weight"][0])]
    panels.append(draw_heatmap_overlay(image, sample["heatmaps"].numpy()))
    if "teacher" in sample:
        panels.append(draw_heatmap_overlay(image, sample["teacher"].numpy()))
    panels.append(gray(sample["segmentation"][0]))
    return np.concatenate(panels, axis=1)


def main(args):
    if args.data:
        data, cache = Path(args.data), None
        ann = Path(args.ann) if args.ann else data / "annotations" / "person_keypoints_val2017.json"
        image_dir = data / "images" / "val2017"
    else:
        cache_root, _ = ensure_builtin_cache("auto", args.out)
        data = Path(ensure_scenes(args.out))
        ann, image_dir, cache = data / "annotations" / "person_keypoints_train.json", data / "images" / "train", \
            cache_root / "train"
    dataset = DistillationDataset(image_dir, ann, cache, crop_size=args.crop_size, augment=True)
    random.seed(args.seed)
    pictures = []
    for i in range(min(args.show, len(dataset))):
        random.seed(args.seed + i)
        pictures.append(sample_picture(dataset[i]))
    out = output_dirs("rtpe", "dataset_show", args.out)["outputs"] / "dataset_show.jpg"
    show_samples(pictures, out, ncols=1)
    print(f"wrote {len(pictures)} samples (image | loss weight | GT | teacher | segmentation) to {out}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--show", type=int, default=4, help="number of augmented samples to draw (default: %(default)s)")
    p.add_argument("--data", default=None, help="COCO-style folder (default: the built-in scenes)")
    p.add_argument("--ann", default=None, help="annotation file (default: <data>/annotations/...val2017.json)")
    p.add_argument("--crop-size", type=int, default=256, help="crop side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="augmentation seed (default: %(default)s)")
    p.add_argument("--out", default=None, help="output root (default: $POSE_OUTPUT_ROOT, else .)")
    return p.parse_args(argv)


if __name__ == "__main__":
    exit_on_bad_input(main, parse_args())
