"""Reading images and COCO annotations, and the ImageNet normalization every RGB model uses.

Bad input is one line, never a traceback: an unreadable image raises `BadImageError` naming the file (the loader
makes it a warning and a skipped sample), a malformed annotation file `AnnotationError` naming file and id; a
script's `main` run under `exit_on_bad_input` prints any `BadInput` (folders subclass it) or OSError as one line.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO

# ImageNet statistics of RGB in [0, 1] (torchvision's), used by every pretrained-style backbone here.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class BadInput(Exception):
    """Input the user can fix (a file, a flag); the message is one line naming it."""


class BadImageError(BadInput):
    """An image that cannot be read; the message is '<path>: <problem>'."""


class AnnotationError(BadInput):
    """A malformed annotation file; the message is '<file>: [annotation <id>: ]<problem>'."""


def exit_on_bad_input(main, *args, **kwargs):
    """Run a script's `main`; bad input, a folder that cannot be written or a full disk becomes one line on
    stderr and exit status 1, Ctrl-C outside training (which saves first, engine.py) status 130."""
    try:
        return main(*args, **kwargs)
    except BadInput as error:
        sys.exit(f"error: {error}")
    except OSError as error:
        problem = ("disk full: " if error.errno == errno.ENOSPC else "") + (error.strerror or str(error))
        sys.exit(f"error: {error.filename}: {problem}" if error.filename else f"error: {problem}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def normalize_image(image) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> float tensor (3, H, W) normalized with the ImageNet mean and std."""
    x = (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def read_image(path) -> np.ndarray:
    """Decode an image by its content (a .png may hold JPEG data) into RGB uint8 (H, W, 3): gray replicated, alpha
    composited over black (the Pose-SPI toy set removes backgrounds with alpha), 16 bits scaled to 8."""
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


def load_coco_keypoints(ann_file, num_keypoints=None) -> COCO:
    """A pycocotools COCO object for a keypoint file, checked once: it parses, has images, and every keypoint
    list holds 3 x K numbers (K = num_keypoints, else its category's keypoint count)."""
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
    sizes, outside = {image.get("id"): (image.get("width") or np.inf, image.get("height") or np.inf)
                      for image in dataset["images"]}, 0
    for ann in dataset["annotations"]:
        if "keypoints" not in ann:
            continue
        expected = num_keypoints or category_size.get(ann.get("category_id")) or len(ann["keypoints"]) // 3
        if len(ann["keypoints"]) != 3 * expected:
            raise AnnotationError(f"{ann_file}: annotation {ann.get('id')}: {len(ann['keypoints'])} keypoint "
                                  f"values, expected {3 * expected} ({expected} keypoints x 3)")
        kept = drop_outside(np.reshape(ann["keypoints"], (-1, 3)), *sizes.get(ann.get("image_id"), (np.inf, np.inf)))
        outside += np.count_nonzero(np.asarray(ann["keypoints"][2::3]) > 0) - np.count_nonzero(kept[:, 2] > 0)
    if outside:
        warnings.warn(f"{ann_file}: {outside} labelled keypoints lie outside their image (negative, or beyond its "
                      "width or height); training targets leave them out", stacklevel=2)
    return coco_from_dict(dataset)


def drop_outside(keypoints, width, height) -> np.ndarray:
    """(..., K, 3) keypoints as float32 with v = 0 where (x, y) is outside the image: no training target is made
    from a point its pixels cannot show."""
    keypoints = np.array(keypoints, np.float32)
    x, y = keypoints[..., 0], keypoints[..., 1]
    keypoints[..., 2] *= (x >= 0) & (y >= 0) & (x <= width) & (y <= height)
    return keypoints


def coco_from_dict(dataset: dict) -> COCO:
    """A pycocotools COCO object over an in-memory annotation dict (quietly: pycocotools prints progress)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
