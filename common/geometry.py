"""Affine crops around a center, their inverse, and horizontal flips.

A crop is described by a center (x, y) and a size (w, h) in original-image pixels, plus a
rotation; `get_affine_transform` maps that box onto the network input. The same matrix warps the
image, masks and keypoints, and its inverse maps predictions back to original pixels.
(higher_hrnet/inference.py holds the official repositories' float64 construction, for its test pipeline.)
"""
from __future__ import annotations

import cv2
import numpy as np


def box_to_center_scale(box_xywh, aspect_ratio, padding=1.25):
    """Center and (w, h) of a box grown to `aspect_ratio` (w / h), then padded (x1.25 in the papers)."""
    x, y, w, h = [float(v) for v in box_xywh]
    center = np.array([x + w * 0.5, y + h * 0.5], np.float32)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    else:
        w = h * aspect_ratio
    return center, np.array([w * padding, h * padding], np.float32)


def get_affine_transform(center, size, rotation_deg, output_size, inverse=False):
    """2x3 matrix taking the box (`center`, `size` = w,h) rotated by `rotation_deg` to `output_size` (W, H).

    The box's x axis spans the output width; rotation is counter-clockwise in image coordinates,
    as in the official pose repositories. inverse=True returns output -> original.
    """
    center = np.asarray(center, np.float64)
    out_w, out_h = float(output_size[0]), float(output_size[1])
    scale = out_w / float(size[0])
    theta = np.deg2rad(rotation_deg)
    cos, sin = np.cos(theta), np.sin(theta)
    # original -> output: translate center to origin, rotate, scale, move to output center
    linear = scale * np.array([[cos, sin], [-sin, cos]])
    offset = np.array([out_w * 0.5, out_h * 0.5]) - linear @ center
    matrix = np.hstack([linear, offset[:, None]]).astype(np.float32)
    return invert_affine(matrix) if inverse else matrix


def invert_affine(matrix):
    return cv2.invertAffineTransform(np.asarray(matrix, np.float64)).astype(np.float32)


def affine_points(points, matrix):
    """Apply a 2x3 matrix to the x, y of points (..., >=2), in float32; other columns are kept."""
    points = np.array(points, dtype=np.float32, copy=True)
    xy = points[..., :2]
    points[..., :2] = xy @ np.asarray(matrix, np.float32)[:, :2].T + np.asarray(matrix, np.float32)[:, 2]
    return points


def warp_image(image, matrix, output_size, interpolation=cv2.INTER_LINEAR, border_value=0):
    """cv2.warpAffine with the matrix as given: OpenCV computes in float64 either way, so a float64
    matrix (higher_hrnet.inference.official_affine_transform) must not be rounded to float32 on the way."""
    matrix = np.asarray(matrix)
    if matrix.dtype not in (np.float32, np.float64):
        matrix = matrix.astype(np.float64)
    return cv2.warpAffine(image, matrix, (int(output_size[0]), int(output_size[1])),
                          flags=interpolation, borderMode=cv2.BORDER_CONSTANT, borderValue=border_value)


def flip_image(image):
    return np.ascontiguousarray(image[:, ::-1])


def flip_keypoints(keypoints, image_width, flip_index):
    """Mirror x (x -> width - 1 - x, pixel-center convention) and swap left/right joints."""
    keypoints = np.array(keypoints, dtype=np.float32, copy=True)
    keypoints[..., 0] = image_width - 1 - keypoints[..., 0]
    return keypoints[..., list(flip_index), :]
