"""Single-animal keypoint data for CPM: the seed's cats JSON, COCO animal sets and the built-in quadrupeds,
cropped around the animal with flip (left/right swapped) / crop / rotation augmentation and Gaussian
targets that are negative for occluded keypoints (`signed`, the seed's mode).

    python cpm_animal/dataset.py --show 8            # built-in quadrupeds
    python cpm_animal/dataset.py --show 8 dataset.kind=seed_json dataset.data_dir=../shared/data/cats_akd/train
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from common.data import (IMAGENET_MEAN, IMAGENET_STD, AnnotationError, BadImageError, drop_outside, load_coco_keypoints,
                         read_image)
from common.drawing import draw_keypoints, show_samples
from common.geometry import (affine_points, box_to_center_scale, flip_image, flip_keypoints,
                             get_affine_transform, invert_affine, warp_image)
from common.heatmaps import HeatmapCodec
from common.keypoints import KeypointLayout, get_layout, layout_from_coco_category
from common.runs import data_dir, output_dirs
from cpm_animal.model import (CAT16, LAYOUTS, SIGMA_SOURCES, CPMConfig, config_from_dict, heatmap_size,
                              input_to_heatmap, target_codec)
from cpm_animal.presets import load_preset
from cpm_animal.quadrupeds import ensure_quadrupeds

SEED_ANN_NAME = "train_keypoints_annotations.json"
MEAN, STD = IMAGENET_MEAN * 255, IMAGENET_STD * 255   # on 0-255 pixels


# ----------------------------------------------------------------------------------------------
# Annotation readers. A record is one animal: id, image path, original width/height, keypoints
# (K, 3) in original pixels with COCO visibility (2 visible, 1 occluded, 0 unlabelled), box or None.

def load_seed_json(ann_file, image_dir=None, layout: KeypointLayout = CAT16, quiet=False) -> list[dict]:
    """The seed's format: `images` {id: {file_name, width, height}} and `keypoints` {id: {name: [x/w, y/h, v]}}.

    x comes first (the seed README says otherwise); v = 1 visible, 0 occluded. Entries whose points lie
    outside the image or whose image file is missing are reported (one line each) and dropped.
    """
    ann_file = Path(ann_file)
    image_dir = Path(image_dir) if image_dir else ann_file.parent / "images"
    try:
        content = json.loads(ann_file.read_text())
        images, keypoints = content["images"], content["keypoints"]
    except FileNotFoundError:
        raise AnnotationError(f"{ann_file}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise AnnotationError(f"{ann_file}: not the seed's keypoint JSON ({error!r})") from None
    records = []
    for image_id in sorted(keypoints, key=lambda k: (len(k), k)):
        points = keypoints[image_id]
        info = images.get(image_id)
        if info is None:
            raise AnnotationError(f"{ann_file}: annotation {image_id}: no entry in 'images'")
        missing = [name for name in layout.names if name not in points]
        if missing:
            raise AnnotationError(f"{ann_file}: annotation {image_id}: missing keypoints {missing}")
        width, height = float(info["width"]), float(info["height"])
        fractions = np.array([points[name] for name in layout.names], np.float64)
        inside = (fractions[:, :2] >= 0).all(1) & (fractions[:, :2] <= 1).all(1)
        if not inside.all():
            if not quiet:
                print(f"{ann_file}: annotation {image_id} ({info['file_name']}): {int((~inside).sum())} of "
                      f"{len(inside)} keypoints outside the image (e.g. {fractions[~inside][0, :2].round(3).tolist()}"
                      f" of width/height); dropped")
            continue
        path = image_dir / info["file_name"]
        if not path.is_file():
            if not quiet:
                print(f"{path}: image of annotation {image_id} not found; dropped")
            continue
        kpts = np.zeros((len(layout.names), 3), np.float32)
        kpts[:, 0] = fractions[:, 0] * width
        kpts[:, 1] = fractions[:, 1] * height
        kpts[:, 2] = np.where(fractions[:, 2] > 0, 2, 1)  # seed: 1 visible / 0 occluded -> COCO 2 / 1
        records.append({"id": str(image_id), "image": path, "width": width, "height": height,
                        "keypoints": kpts, "box": None})
    return records


def load_coco_records(ann_file, image_dir, layout_name="from_file") -> tuple[list[dict], KeypointLayout]:
    """One record per annotated animal of a COCO keypoint file (AP-10K, Animal-Pose, Horse-10, MacaquePose)."""
    coco = load_coco_keypoints(ann_file)
    categories = coco.loadCats(coco.getCatIds())
    if layout_name == "from_file":
        if not categories:
            raise AnnotationError(f"{ann_file}: no categories to take a keypoint layout from")
        layout = layout_from_coco_category(categories[0], SIGMA_SOURCES)
    else:
        layout = get_layout(layout_name, LAYOUTS)
    records = []
    for ann in coco.loadAnns(coco.getAnnIds(iscrowd=False)):
        info = coco.imgs[ann["image_id"]]
        kpts = drop_outside(np.reshape(ann.get("keypoints", []), (-1, 3)), info["width"], info["height"])
        if len(kpts) != layout.num_keypoints:
            raise AnnotationError(f"{ann_file}: annotation {ann.get('id')}: {len(kpts)} keypoints, "
                                  f"layout {layout.name} has {layout.num_keypoints}")
        if (kpts[:, 2] > 0).sum() < 2:
            continue  # too few labelled points to crop or to normalize PCK by
        records.append({"id": str(ann["id"]), "image_id": ann["image_id"], "image": Path(image_dir) / info["file_name"],
                        "width": float(info["width"]), "height": float(info["height"]), "keypoints": kpts,
                        "box": [float(v) for v in ann["bbox"]] if ann.get("bbox") else None})
    return records, layout


def split_records(records, val_fraction, split_seed):
    """Fixed train/val split: ids sorted, then shuffled by `split_seed`; the first share is val."""
    order = sorted(range(len(records)), key=lambda i: records[i]["id"])
    np.random.default_rng(split_seed).shuffle(order)
    n_val = int(round(len(records) * val_fraction))
    val = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


def record_box(record) -> np.ndarray:
    """(x, y, w, h) in original pixels: the given box, else the labelled keypoints' bounding box."""
    if record.get("box") is not None:
        return np.asarray(record["box"], np.float32)
    kpts = record["keypoints"]
    labelled = kpts[kpts[:, 2] > 0, :2]
    x0, y0 = labelled.min(0)
    x1, y1 = labelled.max(0)
    return np.array([x0, y0, max(x1 - x0, 1.0), max(y1 - y0, 1.0)], np.float32)


def box_diagonal(record) -> float:
    _, _, w, h = record_box(record)
    return float(math.hypot(w, h))


# ----------------------------------------------------------------------------------------------
# Decoded-once image cache: photos up to 47 MP are read once and stored downsized under data/.

class ImageCache:
    def __init__(self, cache_dir, max_side: int):
        self.cache_dir = Path(cache_dir) / f"max{max_side}"
        self.max_side = max_side

    def cached_path(self, source: Path) -> Path:
        stat = source.stat()
        key = hashlib.sha1(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return self.cache_dir / f"{source.stem}_{key}.png"

    def prepare(self, records, quiet=False):
        """Decodes every large photo once; returns the records whose image could be read."""
        good = []
        todo = [r for r in records if r["image"].is_file() and max(r["width"], r["height"]) > self.max_side
                and not self.cached_path(r["image"]).is_file()]
        for record in tqdm(todo, desc="caching downsized images", disable=quiet or not todo):
            try:
                self.load(record)
            except BadImageError as error:
                print(f"warning: {error}; dropped")
                record["bad"] = True
        for record in records:
            if record.get("bad"):
                continue
            if not record["image"].is_file():
                print(f"warning: {record['image']}: file not found; dropped")
                continue
            good.append(record)
        return good

    @staticmethod
    def check_size(source, image, record):
        """Keypoints are fractions of the annotated size: a differently shaped image would misplace them."""
        height, width = image.shape[:2]
        if abs(width / height - record["width"] / record["height"]) > 0.02:
            raise BadImageError(f"{source}: decoded {width}x{height} but annotated "
                                f"{int(record['width'])}x{int(record['height'])}")

    def load(self, record) -> tuple[np.ndarray, float]:
        """(RGB image, scale) where scale = cached pixels per original pixel."""
        source = Path(record["image"])
        if max(record["width"], record["height"]) <= self.max_side:
            image = read_image(source)
            self.check_size(source, image, record)
            return image, image.shape[1] / record["width"]
        cached = self.cached_path(source) if source.is_file() else None
        if cached is not None and cached.is_file():
            image = cv2.imread(str(cached), cv2.IMREAD_COLOR)
            if image is not None:
                return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), image.shape[1] / record["width"]
        image = read_image(source)
        self.check_size(source, image, record)
        height, width = image.shape[:2]
        scale = self.max_side / max(width, height)
        if scale < 1:
            image = cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        cached = self.cached_path(source)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.stem + ".tmp.png")
        cv2.imwrite(str(tmp), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        tmp.replace(cached)
        return image, image.shape[1] / record["width"]


# ----------------------------------------------------------------------------------------------
# Augmentation. `all` ops change the crop geometry (image and keypoints), `image` ops the pixels,
# `target` ops the labels. Each is a dict {name, p, ...} from the YAML lists.

GEOMETRIC_OPS = ("random_crop", "rotation", "hflip", "vflip")
IMAGE_OPS = ("color_jitter", "blur")
TARGET_OPS = ("ignore_occluded",)


def check_augmentations(augmentations: dict) -> None:
    for group, allowed in (("all", GEOMETRIC_OPS), ("image", IMAGE_OPS), ("target", TARGET_OPS)):
        for op in augmentations.get(group) or []:
            if op.get("name") not in allowed:
                raise ValueError(f"augmentation {op.get('name')!r} is not a `{group}` op; choose from {allowed}")


def fires(op) -> bool:
    return random.random() < float(op.get("p", 1.0))


def color_jitter(image, op):
    image = image.astype(np.float32)
    brightness = 1 + random.uniform(-1, 1) * op.get("brightness", 0)
    contrast = 1 + random.uniform(-1, 1) * op.get("contrast", 0)
    saturation = 1 + random.uniform(-1, 1) * op.get("saturation", 0)
    image = image * brightness
    image = (image - image.mean()) * contrast + image.mean()
    gray = image.mean(2, keepdims=True)
    image = (image - gray) * saturation + gray
    return np.clip(image, 0, 255).astype(np.uint8)


class KeypointCrops(Dataset):
    """Crops of single animals with targets: the seed's sample dict plus what evaluation needs.

    Sample: image (3, H, W) float normalized; keypoints (K, 3) input pixels, COCO visibility (2 visible,
    1 occluded, 0 unlabelled or pushed out of the crop), or (K, 2); heatmap (K, h, w) and target_weight
    (K,) when heatmap_size is set; index; inverse (2, 3) input -> original pixels; gt (K, 3) original
    pixels; norm = box diagonal in original pixels.
    """

    def __init__(self, records, layout: KeypointLayout, model_config: CPMConfig, augmentations: dict,
                 image_cache: ImageCache, codec: HeatmapCodec | None = None, target_mode="signed",
                 produce_visibility=True, box_padding=1.25):
        check_augmentations(augmentations)
        if target_mode not in ("signed", "positive"):
            raise ValueError(f"dataset.target_mode must be signed or positive, got {target_mode!r}")
        self.records, self.layout, self.model_config = records, layout, model_config
        self.augmentations, self.image_cache = augmentations, image_cache
        self.codec, self.signed = codec, target_mode == "signed"     # codec None: no heatmap targets
        self.produce_visibility, self.box_padding = produce_visibility, box_padding
        self.input_size = tuple(model_config.input_size)

    def __len__(self):
        return len(self.records)

    def crop_transform(self, record, geometric_ops=()):
        """(matrix original -> input, flipped, vflipped) for the record's box and sampled geometric ops."""
        width, height = self.input_size
        center, size = box_to_center_scale(record_box(record), width / height, self.box_padding)
        rotation, flipped, vflipped = 0.0, False, False
        for op in geometric_ops:
            if not fires(op):
                continue
            if op["name"] == "random_crop":
                low, high = op.get("scale", (0.8, 1.2))
                size = size * random.uniform(low, high)
                shift = op.get("shift", 0.1)
                center = center + np.array([random.uniform(-shift, shift), random.uniform(-shift, shift)]) * size
            elif op["name"] == "rotation":
                degrees = op.get("degrees", 30)
                rotation = random.uniform(-degrees, degrees)
            elif op["name"] == "hflip":
                flipped = True
            elif op["name"] == "vflip":
                vflipped = True
        matrix = get_affine_transform(center, size, rotation, self.input_size)
        return matrix, flipped, vflipped

    def input_keypoints(self, record):
        """The record's keypoints in un-augmented input pixels (no image read: the mean-shape baseline)."""
        matrix, _, _ = self.crop_transform(record)
        return affine_points(record["keypoints"], matrix)

    def __getitem__(self, index):
        record = self.records[index]
        image, scale = self.image_cache.load(record)
        matrix, flipped, vflipped = self.crop_transform(record, self.augmentations.get("all") or [])
        width, height = self.input_size
        # the crop is computed in original pixels; the cached image is `scale` times smaller
        to_cached = np.array([[1 / scale, 0, 0], [0, 1 / scale, 0], [0, 0, 1]], np.float64)
        image_matrix = (np.vstack([matrix, [0, 0, 1]]) @ to_cached)[:2].astype(np.float32)
        crop = warp_image(image, image_matrix, self.input_size, border_value=tuple(int(v) for v in MEAN))
        keypoints = affine_points(record["keypoints"], matrix)
        full_matrix = np.vstack([matrix, [0, 0, 1]])
        if flipped:
            crop = flip_image(crop)
            keypoints = flip_keypoints(keypoints, width, self.layout.flip_index)
            full_matrix = np.array([[-1, 0, width - 1], [0, 1, 0], [0, 0, 1]]) @ full_matrix
        if vflipped:  # up/down mirror: no left/right swap
            crop = np.ascontiguousarray(crop[::-1])
            keypoints[:, 1] = height - 1 - keypoints[:, 1]
            full_matrix = np.array([[1, 0, 0], [0, -1, height - 1], [0, 0, 1]]) @ full_matrix
        # pushed out of the crop: unlabelled (weight 0), not occluded
        outside = (keypoints[:, 0] < -0.5) | (keypoints[:, 0] > width - 0.5) | \
                  (keypoints[:, 1] < -0.5) | (keypoints[:, 1] > height - 0.5)
        keypoints[outside, 2] = 0
        for op in self.augmentations.get("image") or []:
            if not fires(op):
                continue
            if op["name"] == "color_jitter":
                crop = color_jitter(crop, op)
            elif op["name"] == "blur":
                kernel = int(op.get("kernel", 3)) | 1
                crop = cv2.GaussianBlur(crop, (kernel, kernel), 0)
        target_keypoints = keypoints.copy()
        for op in self.augmentations.get("target") or []:
            if op["name"] == "ignore_occluded" and fires(op):
                target_keypoints[target_keypoints[:, 2] == 1, 2] = 0

        sample = {
            "image": torch.from_numpy(((crop.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1).copy()),
            "keypoints": torch.from_numpy(keypoints if self.produce_visibility else keypoints[:, :2].copy()),
            "index": index,
            "inverse": torch.from_numpy(invert_affine(full_matrix[:2]).astype(np.float32)),
            "gt": torch.from_numpy(record["keypoints"].astype(np.float32)),
            "norm": torch.tensor(box_diagonal(record), dtype=torch.float32),
        }
        if self.codec is not None:
            joints = target_keypoints.copy()
            joints[:, :2] = input_to_heatmap(joints[:, :2], self.model_config)
            heatmaps, weights = self.codec.encode(joints, occluded_negative=self.signed)
            sample["heatmap"] = torch.from_numpy(heatmaps)
            sample["target_weight"] = torch.from_numpy(weights)
        return sample


def denormalize(image_tensor) -> np.ndarray:
    """Normalized (3, H, W) tensor -> RGB uint8 (H, W, 3) for drawing."""
    image = image_tensor.detach().cpu().numpy().transpose(1, 2, 0) * STD + MEAN
    return np.clip(image, 0, 255).astype(np.uint8)


def signed_heatmap_overlay(image, heatmaps, alpha=0.6) -> np.ndarray:
    """Positive maps (visible keypoints) in green, negative ones (occluded, signed mode) in purple."""
    heatmaps = np.asarray(heatmaps, np.float32)
    positive = cv2.resize(np.clip(heatmaps, 0, 1).max(0), (image.shape[1], image.shape[0]))
    negative = cv2.resize(np.clip(-heatmaps, 0, 1).max(0), (image.shape[1], image.shape[0]))
    green, purple = np.array([40, 220, 60], np.float32), np.array([170, 40, 210], np.float32)
    color = positive[..., None] * green + negative[..., None] * purple
    weight = alpha * np.clip(positive + negative, 0, 1)[..., None]
    return np.clip(image * (1 - weight) + color * weight, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Building the data sets a preset asks for.

def check_heatmap_size(preset: dict, model_config: CPMConfig):
    """The preset's dataset.heatmap_size must equal what the model produces; stop with the right value."""
    wanted = preset["dataset"].get("heatmap_size")
    actual = heatmap_size(model_config)
    if wanted is None:
        return None
    wanted_wh = (wanted, wanted) if isinstance(wanted, int) else tuple(wanted)
    if tuple(wanted_wh) != actual:
        right = actual[0] if actual[0] == actual[1] else list(actual)
        raise SystemExit(f"error: dataset.heatmap_size={wanted} disagrees with the model "
                         f"(input {list(model_config.input_size)} -> {list(actual)}); set dataset.heatmap_size={right}")
    return actual


def resolve_sources(preset: dict, data_root: Path, quiet=False):
    """(train_records, val_records, layout) for the configured data set."""
    ds = preset["dataset"]
    kind = ds["kind"]
    if kind == "builtin":
        folder = Path(ds["data_dir"]) if ds.get("data_dir") else data_root / "quadrupeds"
        train_ann, val_ann = ensure_quadrupeds(folder, ds["builtin_train_images"], ds["builtin_val_images"],
                                               ds["builtin_image_size"], ds["builtin_seed"], quiet=quiet)
        return load_seed_json(train_ann, quiet=quiet), load_seed_json(val_ann, quiet=quiet), CAT16
    if kind == "seed_json":
        if not ds.get("data_dir") and not ds.get("ann_file"):
            raise SystemExit("error: dataset.kind=seed_json needs dataset.data_dir (folder with "
                             f"{SEED_ANN_NAME} and images/)")
        ann = Path(ds["ann_file"]) if ds.get("ann_file") else Path(ds["data_dir"]) / SEED_ANN_NAME
        image_dir = Path(ds["data_dir"]) / "images" if ds.get("data_dir") else None
        records = load_seed_json(ann, image_dir, quiet=quiet)
        if ds.get("val_ann_file"):
            return records, load_seed_json(ds["val_ann_file"], quiet=quiet), CAT16
        train, val = split_records(records, ds["val_fraction"], ds["split_seed"])
        return train, val, CAT16
    if kind == "coco":
        if not ds.get("ann_file") or not ds.get("data_dir"):
            raise SystemExit("error: dataset.kind=coco needs dataset.ann_file and dataset.data_dir (image folder)")
        records, layout = load_coco_records(ds["ann_file"], ds["data_dir"], ds["layout"])
        if ds.get("val_ann_file"):
            val, _ = load_coco_records(ds["val_ann_file"], ds["data_dir"], ds["layout"])
            return records, val, layout
        train, val = split_records(records, ds["val_fraction"], ds["split_seed"])
        return train, val, layout
    raise SystemExit(f"error: dataset.kind must be builtin, seed_json or coco, got {kind!r}")


def build_datasets(preset: dict, model_config: CPMConfig, data_root: Path, quiet=False):
    """(train_set, val_set, layout) as KeypointCrops; val uses test_augmentations."""
    ds = preset["dataset"]
    map_size = check_heatmap_size(preset, model_config)
    train_records, val_records, layout = resolve_sources(preset, data_root, quiet)
    if layout.num_keypoints != model_config.num_keypoints or layout.num_keypoints != ds["n_keypoints"]:
        raise SystemExit(f"error: layout {layout.name} has {layout.num_keypoints} keypoints; set "
                         f"dataset.n_keypoints={layout.num_keypoints} (the model follows it)")
    cache = ImageCache(data_root / "image_cache", ds["cache_max_side"])
    train_records = cache.prepare(train_records, quiet)
    val_records = cache.prepare(val_records, quiet)
    codec = target_codec(model_config, ds["sigma"]) if map_size is not None else None
    common = dict(layout=layout, model_config=model_config, image_cache=cache, codec=codec,
                  target_mode=ds["target_mode"], produce_visibility=ds["produce_visibility"],
                  box_padding=ds["box_padding"])
    train_set = KeypointCrops(train_records, augmentations=preset["train_augmentations"], **common)
    val_set = KeypointCrops(val_records, augmentations=preset["test_augmentations"], **common)
    return train_set, val_set, layout


def show(preset: dict, model_config: CPMConfig, data_root: Path, count: int, out_dir: Path, seed: int) -> Path:
    """The seed's pictures: crops with keypoints and skeleton, and their heatmap overlays."""
    train_set, _, layout = build_datasets(preset, model_config, data_root)
    rng = random.Random(seed)
    pictures = []
    for index in rng.sample(range(len(train_set)), min(count, len(train_set))):
        random.seed(rng.random())
        np.random.seed(rng.randrange(2**32))
        sample = train_set[index]
        image = denormalize(sample["image"])
        keypoints = sample["keypoints"].numpy()
        drawn = draw_keypoints(image, keypoints[:, :3] if keypoints.shape[1] == 3 else keypoints,
                               layout.skeleton, threshold=0.0, scores=False)
        # occluded points get a purple ring so visibility is visible in the picture
        for x, y, v in keypoints if keypoints.shape[1] == 3 else []:
            if v == 1:
                cv2.circle(drawn, (int(round(x)), int(round(y))), 4, (170, 40, 210), 1, cv2.LINE_AA)
        pictures.append(drawn)
        if "heatmap" in sample:
            pictures.append(signed_heatmap_overlay(image, sample["heatmap"].numpy()))
    return show_samples(pictures, out_dir / "cpm_animal_samples.png", ncols=4)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--show", type=int, default=8, metavar="N", help="write N augmented training samples")
    parser.add_argument("--preset", default="cpu", help="cpu, seed or a YAML file (default: %(default)s)")
    parser.add_argument("--out", default=None, help="output root (else $POSE_OUTPUT_ROOT, else .)")
    parser.add_argument("--seed", type=int, default=0, help="which samples and augmentations to draw")
    parser.add_argument("overrides", nargs="*", help="preset overrides group.key=value")
    args = parser.parse_args(argv)
    preset = load_preset(args.preset, args.overrides)
    model_config = config_from_dict({**preset["model"], "num_keypoints": preset["dataset"]["n_keypoints"]})
    out_dir = output_dirs("cpm_animal", "show", args.out)["outputs"]
    path = show(preset, model_config, data_dir(args.out) / "cpm_animal", args.show, out_dir, args.seed)
    print(f"wrote {args.show} samples and their heatmaps to {path}")


if __name__ == "__main__":
    main()
