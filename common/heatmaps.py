"""Gaussian heatmap targets and their decoding, and the codec that owns one folder's target settings.

Two center conventions exist in the literature and each model folder picks one:
- "truncate": the official HigherHRNet / Simple Baselines target generators put the peak on the
  pixel int(x), int(y), so a target is biased by up to one pixel towards the origin.
- "subpixel": the Gaussian is centered on the exact float position (no quantization bias).
Decoding is argmax plus the classic quarter-pixel step towards the higher neighbor.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def joint_centers(joints, heatmap_size, center="subpixel"):
    """Where make_heatmaps centers each joint: x, y, v (P, K) float64 and drawn (P, K) bool, the
    labelled joints whose center lies on the (W, H) map. joints: (K, 3) or (P, K, 3)."""
    if center not in ("subpixel", "truncate"):
        raise ValueError(f"center must be 'subpixel' or 'truncate', not {center!r}")
    joints = np.asarray(joints, dtype=np.float64)
    if joints.ndim == 2:
        joints = joints[None]
    width, height = int(heatmap_size[0]), int(heatmap_size[1])
    x, y, v = joints[..., 0], joints[..., 1], joints[..., 2]
    labelled = (v > 0) & np.isfinite(x) & np.isfinite(y)
    if center == "truncate":
        # official generators: a joint is drawn iff its truncated pixel lies on the map
        x, y = np.trunc(np.where(labelled, x, -1.0)), np.trunc(np.where(labelled, y, -1.0))
        lo_x, hi_x, lo_y, hi_y = 0, width, 0, height
    else:
        # sub-pixel: a joint belongs to the map iff it falls inside some pixel's area
        lo_x, hi_x, lo_y, hi_y = -0.5, width - 0.5, -0.5, height - 0.5
    return x, y, v, labelled & (x >= lo_x) & (x < hi_x) & (y >= lo_y) & (y < hi_y)


def make_heatmaps(joints, heatmap_size, sigma, center="subpixel", occluded_negative=False):
    """Gaussian targets for one image.

    joints: (K, 3) or (P, K, 3) array of (x, y, v) in heatmap pixels; heatmap_size: (W, H).
    Peak 1, support +-3 sigma; with several people the per-joint maximum is kept.
    occluded_negative: joints with v == 1 get a negative Gaussian (peak -1), the CPM seed's way to
    teach visibility. Returns heatmaps (K, H, W) float32 and weights (K,) float32: 1 where some
    person has the joint labelled (v > 0) with its center on the map.
    """
    x, y, v, drawn = joint_centers(joints, heatmap_size, center)
    num_joints = drawn.shape[1]
    width, height = int(heatmap_size[0]), int(heatmap_size[1])
    heatmaps = np.zeros((num_joints, height, width), np.float32)
    weights = np.zeros(num_joints, np.float32)
    if drawn.shape[0] == 0:
        return heatmaps, weights

    # Each drawn joint writes only its window of pixels within +-radius of the center: the same
    # float64 Gaussian per axis, cast to float32 and multiplied, as the full-map outer product gave.
    radius = 3 * sigma + 0.5
    person, joint = np.nonzero(drawn)
    span = int(np.floor(2 * radius)) + 2
    centers = np.stack([x[person, joint], y[person, joint]])             # (2, n): x then y
    pixels = np.ceil(centers - radius)[..., None] + np.arange(span)       # (2, n, span), float64
    offset = pixels - centers[..., None]
    gauss = np.exp(-(offset ** 2) / (2 * sigma ** 2)) * (np.abs(offset) <= radius)
    on_map = (pixels >= 0) & (pixels < np.array([width, height])[:, None, None])
    (win_x, win_y), (gx, gy) = np.where(on_map, pixels, 0).astype(np.int64), (gauss * on_map).astype(np.float32)
    values = gy[:, :, None] * gx[:, None, :]                                   # (n, span, span) float32
    index = (joint[:, None, None] * height + win_y[:, :, None]) * width + win_x[:, None, :]
    occluded = (v[person, joint] == 1) if occluded_negative else np.zeros(len(person), bool)
    np.maximum.at(heatmaps.reshape(-1), index[~occluded].reshape(-1), values[~occluded].reshape(-1))
    if occluded_negative:
        negative = np.zeros_like(heatmaps)
        np.maximum.at(negative.reshape(-1), index[occluded].reshape(-1), values[occluded].reshape(-1))
        heatmaps[:] = np.where(negative > heatmaps, -negative, heatmaps)
    weights[:] = drawn.any(0)
    return heatmaps, weights


def decode_heatmaps(heatmaps: torch.Tensor):
    """Argmax per map plus a quarter-pixel step towards the higher neighbor.

    heatmaps: (B, K, H, W). Returns coords (B, K, 2) float in heatmap pixels and maxvals (B, K).
    """
    batch, joints, height, width = heatmaps.shape
    flat = heatmaps.reshape(batch, joints, -1)
    maxvals, index = flat.max(dim=2)
    x = (index % width).float()
    y = torch.div(index, width, rounding_mode="floor").float()
    xi, yi = x.long(), y.long()

    def at(dx, dy):
        xx = (xi + dx).clamp(0, width - 1)
        yy = (yi + dy).clamp(0, height - 1)
        return flat.gather(2, (yy * width + xx).unsqueeze(2)).squeeze(2)

    dx = torch.sign(at(1, 0) - at(-1, 0)) * ((xi > 0) & (xi < width - 1))
    dy = torch.sign(at(0, 1) - at(0, -1)) * ((yi > 0) & (yi < height - 1))
    coords = torch.stack([x + 0.25 * dx, y + 0.25 * dy], dim=2)
    return coords, maxvals


@dataclass(frozen=True)
class HeatmapCodec:
    """The one owner of a folder's target settings (MMPose's heatmap-codec idea, without its registry): the
    input size (W, H), the heatmap size (W, H) it maps to, the Gaussian sigma in heatmap pixels and the
    center convention. Training encodes with it; checkpoints store `as_dict()`, eval and infer rebuild it."""
    input_size: tuple
    heatmap_size: tuple
    sigma: float
    center: str = "subpixel"

    def encode(self, joints, occluded_negative=False):
        """make_heatmaps of joints (x, y, v) given in heatmap pixels: (heatmaps (K, H, W), weights (K,))."""
        return make_heatmaps(joints, self.heatmap_size, self.sigma, self.center, occluded_negative)

    def as_dict(self) -> dict:
        return {"input_size": [int(v) for v in self.input_size], "heatmap_size": [int(v) for v in self.heatmap_size],
                "sigma": float(self.sigma), "center": self.center}

    @classmethod
    def from_dict(cls, d: dict) -> "HeatmapCodec":
        return cls(tuple(d["input_size"]), tuple(d["heatmap_size"]), float(d["sigma"]), d["center"])
