"""Reading images and COCO annotations, and the DataLoader plumbing every training script shares.

Bad input never surfaces as a traceback from a worker: an unreadable image raises `BadImageError`
(one line naming the file), which the loader wrapper turns into a warning and a skipped sample;
a malformed annotation file raises `AnnotationError` at start-up, naming the file and annotation id.
"""
from __future__ import annotations

import contextlib
import io
import json
import random
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate


class BadImageError(Exception):
    """An image that cannot be read; the message is '<path>: <problem>'."""


class AnnotationError(Exception):
    """A malformed annotation file; the message is '<file>: [annotation <id>: ]<problem>'."""


def exit_on_bad_input(main, *args, **kwargs):
    """Run a script's `main`; bad input becomes one line on stderr and exit status 1."""
    try:
        return main(*args, **kwargs)
    except (BadImageError, AnnotationError) as error:
        sys.exit(f"error: {error}")


def read_image(path) -> np.ndarray:
    """Decode an image by its content (a .png may hold JPEG data) into RGB uint8 (H, W, 3).

    Grayscale is replicated to three channels, alpha is composited over black (the Pose-SPI toy
    set removes backgrounds with alpha), 16-bit images are scaled to 8 bits.
    """
    path = Path(path)
    if not path.is_file():
        raise BadImageError(f"{path}: file not found")
    data = path.read_bytes()
    if not data:
        raise BadImageError(f"{path}: empty file (0 bytes)")
    # OpenCV decodes what it can of a cut-off JPEG and only warns, so check the end marker
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-4096:]:
        raise BadImageError(f"{path}: truncated JPEG data (no end-of-image marker)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise BadImageError(f"{path}: cannot decode image (corrupt, truncated or not an image)")
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        alpha = image[..., 3:].astype(np.float32) / 255.0
        image = (image[..., :3].astype(np.float32) * alpha + 0.5).astype(np.uint8)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def load_coco_keypoints(ann_file, num_keypoints=None):
    """A pycocotools COCO object for a keypoint annotation file, validated once at start.

    Checks the JSON parses, has images/annotations/categories, and that every annotation's keypoint
    list holds 3 x K numbers (K = num_keypoints, else its category's keypoint count).
    """
    from pycocotools.coco import COCO

    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise AnnotationError(f"{ann_file}: annotation file not found")
    try:
        dataset = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AnnotationError(f"{ann_file}: malformed JSON ({error})") from None
    if not isinstance(dataset, dict) or "images" not in dataset:
        raise AnnotationError(f"{ann_file}: not a COCO file (no 'images' list)")
    dataset.setdefault("annotations", [])
    dataset.setdefault("categories", [])
    category_size = {c.get("id"): len(c.get("keypoints", [])) for c in dataset["categories"]}
    for ann in dataset["annotations"]:
        if "keypoints" not in ann:
            continue
        expected = num_keypoints or category_size.get(ann.get("category_id")) or len(ann["keypoints"]) // 3
        if len(ann["keypoints"]) != 3 * expected:
            raise AnnotationError(f"{ann_file}: annotation {ann.get('id')}: {len(ann['keypoints'])} keypoint "
                                  f"values, expected {3 * expected} ({expected} keypoints x 3)")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


# ---------------------------------------------------------------------------------------------
# DataLoader plumbing. The sampler hands every sample its own seed, derived from (seed, epoch,
# position in the epoch); the wrapper seeds random/numpy/torch from it before calling the
# dataset. Augmentation then depends only on the sample, not on which worker drew it, so a run
# resumed mid-epoch sees exactly the batches an uninterrupted run would have seen.

class ResumableSampler(DistributedSampler):
    """DistributedSampler that yields (index, sample_seed) and can start mid-epoch."""

    def __init__(self, dataset_len, shuffle=True, seed=0, num_replicas=None, rank=None, drop_last=False):
        if num_replicas is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            num_replicas = torch.distributed.get_world_size() if distributed else 1
            rank = torch.distributed.get_rank() if distributed else 0
        super().__init__(range(dataset_len), num_replicas=num_replicas, rank=rank or 0,
                         shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start_index = 0

    def set_epoch(self, epoch, start_index=0):
        """Choose the epoch's permutation; skip the first `start_index` samples of this rank."""
        super().set_epoch(epoch)
        self.start_index = start_index

    def __iter__(self):
        indices = list(super().__iter__())
        seeds = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(len(indices))
        for position in range(self.start_index, len(indices)):
            yield indices[position], int(seeds[position])

    def __len__(self):
        return self.num_samples - self.start_index


class SeededSamples(Dataset):
    """Seeds the global RNGs per sample and turns unreadable images into skipped samples."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, sample_seed = item if isinstance(item, tuple) else (item, item)
        random.seed(sample_seed)
        np.random.seed(sample_seed % 2**32)
        torch.manual_seed(sample_seed)
        try:
            return self.dataset[index]
        except BadImageError as error:
            warnings.warn(f"skipping sample {index}: {error}", stacklevel=1)
            return None


def collate_skip_bad(samples, collate=default_collate):
    """Collate the good samples; `batch['num_skipped']` counts the dropped (None) ones.

    A batch in which every sample was bad holds only 'num_skipped'; the training loop skips it.
    """
    good = [s for s in samples if s is not None]
    batch = collate(good) if good else {}
    batch["num_skipped"] = len(samples) - len(good)
    return batch


def seed_worker(worker_id):
    """Give each worker distinct numpy/random streams (the per-sample seeds override them)."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def make_loader(dataset, batch_size, shuffle, workers, seed=0, collate_fn=collate_skip_bad, drop_last=False,
                num_replicas=None, rank=None):
    """A DataLoader over `dataset` with a ResumableSampler (call `loader.sampler.set_epoch`)."""
    sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed, num_replicas=num_replicas,
                               rank=rank, drop_last=drop_last)
    return DataLoader(SeededSamples(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_fn, worker_init_fn=seed_worker, drop_last=drop_last,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


def show_samples(images, out_path, ncols=4):
    """Write a grid of RGB uint8 images (the `dataset.py --show N` pictures) and return its path."""
    from common.drawing import make_grid

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_path), cv2.cvtColor(make_grid(images, ncols=ncols), cv2.COLOR_RGB2BGR))
    return out_path


# ---------------------------------------------------------------------------------------------
# Inference inputs: every infer.py takes an image, a folder of images or a video.

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}


def iter_inputs(source, limit=None, errors=None, detail=False):
    """Yield (name, RGB uint8 image) for an image file, a folder of images (sorted) or a video's frames.

    An unreadable image prints one error line naming the file (also appended to `errors` when that is a
    list) and the others continue. `limit` keeps a folder's first N files; a video is never cut short.
    detail=True yields (name, image, path, frame): the file read, and the frame index (None for an image).
    """
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit or None]
    elif source.suffix.lower() in VIDEO_SUFFIXES:
        capture = cv2.VideoCapture(str(source))
        if not capture.isOpened():
            raise BadImageError(f"{source}: cannot open video")
        index = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            name, image = f"{source.stem}_{index:06d}", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            yield (name, image, source, index) if detail else (name, image)
            index += 1
        capture.release()
        return
    else:
        paths = [source]
    for path in paths:
        try:
            image = read_image(path)
        except BadImageError as error:
            print(f"error: {error}", file=sys.stderr)
            if errors is not None:
                errors.append(str(error))
            continue
        yield (path.stem, image, path, None) if detail else (path.stem, image)


def video_properties(source):
    """(frames per second, frame count) of a video file, for writing an output of the same length."""
    capture = cv2.VideoCapture(str(source))
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    capture.release()
    return fps, count


class VideoWriter:
    """mp4 writer taking RGB frames; opened lazily at the first frame's size."""

    def __init__(self, path, fps=25.0):
        self.path, self.fps, self.writer = Path(path), fps, None

    def write(self, rgb):
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                          (rgb.shape[1], rgb.shape[0]))
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def close(self):
        if self.writer is not None:
            self.writer.release()
