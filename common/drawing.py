"""Drawing keypoints, skeletons and heatmaps with OpenCV (RGB uint8 images in, copies out).

Used for TensorBoard images, every `dataset.py --show N` and every inference script.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

RED, BLUE, GREEN, PURPLE = (230, 40, 40), (40, 90, 230), (40, 200, 60), (160, 40, 200)


def draw_keypoints(image, keypoints, skeleton=(), color=RED, threshold=0.0, radius=None, thickness=None,
                   scores=True):
    """Draw one person: joints with score/visibility > threshold and the edges between them.

    keypoints: (K, 2) or (K, 3) with a score or visibility in column 2. With `scores`, each drawn
    joint's circle shrinks with its score so confident joints stand out.
    """
    image = np.ascontiguousarray(image).copy()
    keypoints = np.asarray(keypoints, np.float32)
    if keypoints.shape[-1] == 2:
        keypoints = np.concatenate([keypoints, np.ones_like(keypoints[:, :1])], 1)
    side = max(image.shape[:2])
    radius = radius or max(1, side // 100)
    thickness = thickness or max(1, side // 200)
    shown = (keypoints[:, 2] > threshold) & np.isfinite(keypoints[:, :2]).all(1)
    for a, b in skeleton:
        if shown[a] and shown[b]:
            pa = tuple(int(round(v)) for v in keypoints[a, :2])
            pb = tuple(int(round(v)) for v in keypoints[b, :2])
            cv2.line(image, pa, pb, color, thickness, cv2.LINE_AA)
    for x, y, score in keypoints[shown]:
        r = radius if not scores else max(1, int(round(radius * (0.5 + 0.5 * min(float(score), 1.0)))))
        cv2.circle(image, (int(round(x)), int(round(y))), r, color, -1, cv2.LINE_AA)
    return image


def person_color(index):
    """A distinct RGB color for the index-th person (golden-ratio steps around the hue circle)."""
    hue = int(179 * ((index * 0.618) % 1.0))
    return tuple(int(c) for c in cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2RGB)[0, 0])


def draw_people(image, people, skeleton=(), threshold=0.0):
    """Draw several people (P, K, >=3), each in its own color."""
    for index, person in enumerate(people):
        image = draw_keypoints(image, np.asarray(person)[:, :3], skeleton, person_color(index), threshold)
    return image


def draw_heatmap_overlay(image, heatmaps, alpha=0.5):
    """Overlay the per-pixel maximum over heatmap channels (resized to the image) as a JET map.

    Negative values (occluded joints in the CPM seed's signed targets) are shown by magnitude.
    """
    heatmaps = np.abs(np.asarray(heatmaps, np.float32))
    peak = heatmaps.max(0) if heatmaps.ndim == 3 else heatmaps
    peak = cv2.resize(np.clip(peak, 0, 1), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    colored = cv2.cvtColor(cv2.applyColorMap((peak * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    base = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(base.astype(np.uint8), 1 - alpha, colored, alpha, 0)


def make_grid(images, ncols=4, pad=2):
    """Tile RGB (or gray) uint8 images of any sizes into one image, each cell as large as the largest."""
    images = [img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) for img in images]
    if not images:
        return np.zeros((1, 1, 3), np.uint8)
    cell_h = max(img.shape[0] for img in images)
    cell_w = max(img.shape[1] for img in images)
    ncols = max(1, min(ncols, len(images)))
    nrows = (len(images) + ncols - 1) // ncols
    grid = np.full((nrows * (cell_h + pad) + pad, ncols * (cell_w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        y, x = pad + r * (cell_h + pad), pad + c * (cell_w + pad)
        grid[y:y + img.shape[0], x:x + img.shape[1]] = img
    return grid


def show_samples(images, out_path, ncols=4):
    """Write a grid of RGB uint8 images (the `dataset.py --show N` pictures) and return its path."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_path), cv2.cvtColor(make_grid(images, ncols=ncols), cv2.COLOR_RGB2BGR))
    return out_path
