"""The official HigherHRNet test pipeline: image -> people in image pixels (lib/core/inference.py, tools/valid.py).

API (rtpe imports these):
    config = INFERENCE_SETTINGS["official"]   # or "seed" (detection 0.05, tag 0.5, no flip), or InferenceConfig(...)
    people, scores = predict_people(model, image_rgb, config, layout=COCO17)
    heatmaps, tags, center, box = predict_maps(model, image_rgb, config, flip_index)   # maps only
    people, scores = maps_to_people(heatmaps, tags, center, box, config)                # grouping + inverse affine
    model = prepare_for_inference(model)  # BatchNorm folded, channels_last: faster, within 1e-4
people: float32 (N, K, 3 + L) = (x, y, score, tag...) in original image pixels; scores (N,).
Steps: short side resized to input_size with both sides aligned to multiples of 64 (the official float64
affine matrix); every output with >= K channels gives heatmaps (upsampled to the largest output,
averaged), outputs with more give tags; flip test with the flip index; optional extra scales (tags from
scale 1 only); maps projected to input resolution; grouping (higher_hrnet.grouping); the official
inverse affine to image pixels. With the plain network each step equals the official code's bit for bit.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass, field, replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from common.data import normalize_image
from common.geometry import warp_image
from common.keypoints import COCO17
from higher_hrnet.grouping import GroupingParams, group_by_tags, group_by_tags_reference


@dataclass
class InferenceConfig:
    input_size: int = 512
    scales: tuple = (1.0,)
    flip: bool = True
    project_to_image: bool = True     # group on input-resolution maps (official PROJECT2IMAGE)
    detection_threshold: float = 0.1
    tag_threshold: float = 1.0
    max_num_people: int = 30
    nms_kernel: int = 5
    adjust: bool = True
    refine: bool = True
    use_detection_val: bool = True
    ignore_too_much: bool = False
    reference_grouping: bool = False  # the slow step-by-step parser (same output)
    extra: dict = field(default_factory=dict)

    def grouping_params(self, num_joints):
        return GroupingParams(num_joints=num_joints, max_num_people=self.max_num_people,
                              detection_threshold=self.detection_threshold, tag_threshold=self.tag_threshold,
                              use_detection_val=self.use_detection_val, ignore_too_much=self.ignore_too_much,
                              nms_kernel=self.nms_kernel, adjust=self.adjust, refine=self.refine)

    def as_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# Test settings by name (--inference): official = w32_512_adam_lr1e-3.yaml's TEST section; seed = the
# re-implementation we follow.
INFERENCE_SETTINGS = {"official": InferenceConfig(),
                      "seed": InferenceConfig(detection_threshold=0.05, tag_threshold=0.5, flip=False)}


def inference_settings(name, **overrides):
    """INFERENCE_SETTINGS[name] with the overrides that are not None."""
    if name not in INFERENCE_SETTINGS:
        raise SystemExit(f"unknown inference settings '{name}'; choose from {sorted(INFERENCE_SETTINGS)}")
    return replace(INFERENCE_SETTINGS[name], **{k: v for k, v in overrides.items() if v is not None})


def multi_scale_size(height, width, input_size, current_scale, min_scale):
    """Official get_multi_scale_size: ((w, h) resized, center, box (w, h) in image pixels). The short side
    becomes input_size * scale; the long side keeps the aspect ratio, rounded up to a multiple of 64.
    box is the official scale (in units of 200 pixels) times 200, computed in the same order."""
    center = np.array([int(width / 2.0 + 0.5), int(height / 2.0 + 0.5)], np.float64)
    min_input = int((min_scale * input_size + 63) // 64 * 64)
    if width < height:
        w_resized = int(min_input * current_scale / min_scale)
        h_resized = int(int((min_input / width * height + 63) // 64 * 64) * current_scale / min_scale)
        scale = np.array([width / 200.0, h_resized / w_resized * width / 200.0])
    else:
        h_resized = int(min_input * current_scale / min_scale)
        w_resized = int(int((min_input / height * width + 63) // 64 * 64) * current_scale / min_scale)
        scale = np.array([w_resized / h_resized * height / 200.0, height / 200.0])
    return (w_resized, h_resized), center, scale * 200.0


def official_affine_transform(center, size, rotation_deg, output_size, inverse=False):
    """The matrix of the official get_affine_transform (HRNet repositories, lib/utils/transforms.py),
    bit for bit: three point pairs rounded to float32, solved by cv2.getAffineTransform, float64 out.
    It differs from get_affine_transform in the last bits (tiny off-diagonal terms, float32-derived
    entries), enough to move some warped pixels by one grey level. `size` = the official scale * 200.
    """
    center = np.asarray(center, np.float64)
    src_w = float(size[0])
    dst_w, dst_h = output_size
    theta = np.pi * rotation_deg / 180
    sin, cos = np.sin(theta), np.cos(theta)
    src_dir = [0 * cos - src_w * -0.5 * sin, 0 * sin + src_w * -0.5 * cos]
    dst_dir = np.array([0, dst_w * -0.5], np.float32)
    src = np.zeros((3, 2), np.float32)
    dst = np.zeros((3, 2), np.float32)
    src[0] = center
    src[1] = center + src_dir
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = np.array([dst_w * 0.5, dst_h * 0.5]) + dst_dir
    for points in (src, dst):   # the third point: the second turned 90 degrees about the first
        direction = points[0] - points[1]
        points[2] = points[1] + np.array([-direction[1], direction[0]], np.float32)
    return cv2.getAffineTransform(dst, src) if inverse else cv2.getAffineTransform(src, dst)


def official_affine_points(points, matrix):
    """affine_points as the official transform_preds computes it: np.dot of the float64 matrix with
    (x, y, 1) for one point at a time, stored back into the float32 points. (A batched product
    rounds differently: np.dot on one point uses its own BLAS kernel.)"""
    points = np.array(points, dtype=np.float32, copy=True)
    matrix = np.asarray(matrix, np.float64)
    for point in points.reshape(-1, points.shape[-1]):
        point[:2] = np.dot(matrix, np.array([point[0], point[1], 1.0]))
    return points


def resize_align(image, input_size, current_scale=1.0, min_scale=1.0):
    """Official resize_align_multi_scale: the image warped to the aligned size with the official float64
    matrix (bit for bit the official resized image). Returns (resized image, center, box)."""
    size, center, box = multi_scale_size(image.shape[0], image.shape[1], input_size, current_scale, min_scale)
    return warp_image(image, official_affine_transform(center, box, 0, size), size), center, box


def fold_batchnorm(model):
    """Folds every eval-mode BatchNorm into the convolution (or transposed convolution) before it, in
    place; returns the model. Used for export and for the speed-measured inference paths: same outputs
    up to float rounding, fewer kernels."""
    model.eval()
    convolutions = (nn.Conv2d, nn.ConvTranspose2d)
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            children = list(module._modules.items())
            for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
                if isinstance(conv, convolutions) and isinstance(bn, nn.BatchNorm2d):
                    transposed = isinstance(conv, nn.ConvTranspose2d)
                    module._modules[conv_name] = fuse_conv_bn_eval(conv, bn, transpose=transposed)
                    module._modules[bn_name] = nn.Identity()
        # HRNet stems and residual blocks keep conv/bn pairs as named attributes
        for conv_name, bn_name in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
    return model


def prepare_for_inference(model, fold=True, channels_last=True):
    """A copy of the model for the test pipeline. fold: BatchNorm folded into the convolutions before
    it; channels_last: NHWC weights, and predict_maps then feeds NHWC inputs. Both are faster on CPU
    (benchmark.py) with outputs within 1e-4 of the plain model; both off keeps the plain network,
    whose outputs are the official code's bit for bit."""
    model = copy.deepcopy(model).eval()
    if fold:
        fold_batchnorm(model)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _input_format(model):
    """The memory format of the model's first convolution weight: feed inputs in the same one."""
    weight = next((p for p in model.parameters() if p.dim() == 4), None)
    if weight is not None and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@contextlib.contextmanager
def _stage(timings, name, device):
    """Adds the wall time of a pipeline stage to timings[name] (benchmark.py); nothing when timings is None."""
    if timings is None:
        yield
        return
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    yield
    synchronize()
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def network_maps(model, x, num_joints, flip_index=None, size_projected=None, timings=None):
    """Official get_multi_stage_outputs: [heatmaps, (flipped heatmaps)], each (B, K, H, W), and the tags
    (B, L, T, H, W) of the L passes (plain, flipped), at the largest output's (or the projected)
    resolution."""
    passes = [False, True] if flip_index is not None else [False]
    with _stage(timings, "network", x.device):
        results = [model(torch.flip(x, [3]) if flipped else x) for flipped in passes]
    with _stage(timings, "merge outputs", x.device):
        heatmaps, tags = [], []
        for flipped, outputs in zip(passes, results):
            # a channels_last model gives NHWC outputs: back to NCHW (the plain network's layout, which
            # the interpolations below are checked in) while they are small
            outputs = [o.contiguous() for o in ([outputs] if torch.is_tensor(outputs) else outputs)]
            target = outputs[-1].shape[2:]
            heat_sum, heat_count = 0, 0
            for output in outputs:
                if output.shape[2:] != target:
                    output = F.interpolate(output, size=target, mode="bilinear", align_corners=False)
                if flipped:
                    output = torch.flip(output, [3])
                if output.shape[1] >= num_joints:
                    heat = output[:, :num_joints]
                    heat_sum = heat_sum + (heat[:, flip_index] if flipped else heat)
                    heat_count += 1
                if output.shape[1] > num_joints:
                    tag = output[:, num_joints:]
                    tags.append(tag[:, flip_index] if flipped and tag.shape[1] == num_joints else tag)
            heatmaps.append(heat_sum / heat_count)
        # the passes' tag maps as one tensor (channels stacked), interpolated in one call: bilinear
        # interpolation treats each channel alone (the same values as a call per map), and the maps
        # stay adjacent planes. Heatmaps go one map per call: kept under glibc's 32 MB mmap limit,
        # their memory is reused instead of page-faulted in afresh (~2x faster here).
        tags = torch.cat(tags, dim=1)
        if size_projected is not None:
            size = (size_projected[1], size_projected[0])
            heatmaps = [F.interpolate(h, size=size, mode="bilinear", align_corners=False) for h in heatmaps]
            tags = F.interpolate(tags, size=size, mode="bilinear", align_corners=False)
    return heatmaps, tags.unflatten(1, (len(passes), -1))


@torch.no_grad()
def predict_maps(model, image, config=None, flip_index=None, num_joints=17, device=None, timings=None):
    """Heatmaps (K, H, W) and tags (K or 1, H, W, L; a view of one plane per tag dimension) torch on CPU
    for one RGB uint8 image, plus the center and box that map the maps back to the image.
    flip_index=None turns flip test off.
    timings: a dict that receives the seconds spent per stage (benchmark.py)."""
    config = config or INFERENCE_SETTINGS["official"]
    device = device or next(model.parameters()).device
    scales = sorted(config.scales, reverse=True)
    min_scale = min(scales)
    base_size, center, box = multi_scale_size(image.shape[0], image.shape[1], config.input_size, 1.0, min_scale)
    final, tag_planes = None, None
    for s in scales:
        with _stage(timings, "resize + normalize", device):
            resized, center, box = resize_align(image, config.input_size, s, min_scale)
            x = normalize_image(resized)[None].to(device, memory_format=_input_format(model))
        heatmaps, tags = network_maps(model, x, num_joints, flip_index if config.flip else None,
                                      base_size if config.project_to_image else None, timings)
        with _stage(timings, "merge outputs", device):
            if s == 1 or len(scales) == 1:
                if final is not None and not config.project_to_image:
                    tags = F.interpolate(tags.flatten(1, 2), size=final.shape[2:], mode="bilinear",
                                         align_corners=False).unflatten(1, tags.shape[1:3])
                tag_planes = tags[0]
            average = heatmaps[0].add_(heatmaps[1]).div_(2.0) if len(heatmaps) == 2 else heatmaps[0]
            if final is None:
                final = average
            elif config.project_to_image:
                final = final + average
            else:
                final = final + F.interpolate(average, size=final.shape[2:], mode="bilinear", align_corners=False)
    with _stage(timings, "merge outputs", device):
        if len(scales) > 1:                                # x / 1.0 is x: skip a pass over the maps
            final = final / float(len(scales))
        # official: torch.cat of the tag maps on a new last axis. The same (K, H, W, L) values, as a
        # view of one contiguous map per tag dimension: interleaving them would cost more than the
        # grouping, which reads the tag dimensions as separate planes.
        final, tags = final[0].float().cpu(), tag_planes.permute(1, 2, 3, 0).float().cpu()
    return final, tags, center, box


def maps_to_people(heatmaps, tags, center, box, config=None, num_joints=None, timings=None):
    """Group one image's maps and map the people back to image pixels (official get_final_preds)."""
    config = config or INFERENCE_SETTINGS["official"]
    num_joints = num_joints or heatmaps.shape[0]
    group = group_by_tags_reference if config.reference_grouping else group_by_tags
    with _stage(timings, "grouping", "cpu"):
        people, scores = group(heatmaps, tags, config.grouping_params(num_joints))
    with _stage(timings, "back to image pixels", "cpu"):
        if len(people):
            map_size = (heatmaps.shape[2], heatmaps.shape[1])
            people = official_affine_points(people, official_affine_transform(center, box, 0, map_size, inverse=True))
    return people, scores


def predict_people(model, image, config=None, layout=COCO17, device=None, timings=None):
    """Image (RGB uint8) -> (people (N, K, 3 + L) in image pixels, scores (N,))."""
    config = config or INFERENCE_SETTINGS["official"]
    heatmaps, tags, center, box = predict_maps(model, image, config, layout.flip_index, layout.num_keypoints,
                                               device, timings)
    return maps_to_people(heatmaps, tags, center, box, config, layout.num_keypoints, timings)


def people_to_coco_results(people, scores, image_id, category_id=1):
    """COCO keypoint results: one dict per person with (x, y, score) per joint and the person score."""
    return [{"image_id": int(image_id), "category_id": category_id,
             "keypoints": [float(v) for v in person[:, :3].reshape(-1)], "score": float(score)}
            for person, score in zip(people, scores)]
