"""Associative-embedding grouping: heatmaps + tags of one image -> people.

API (rtpe imports these):
    params = GroupingParams(num_joints=17)            # official thresholds: detection 0.1, tag 1.0
    people, scores = group_by_tags(heatmaps, tags, params)            # fast, vectorised
    people, scores = group_by_tags_reference(heatmaps, tags, params)  # the official parser, step by step
heatmaps: (K, H, W); tags: (K, H, W, L), (K, H, W) or (1, H, W[, L]) for one shared tag map (torch or
numpy). people: float32 (N, K, 3 + L) rows (x, y, score, tag...) in map pixels, pixel centres at +0.5
as in the official parser; scores: float32 (N,), the mean joint score before refinement.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from common.heatmaps import heatmap_nms, topk_peaks

# The official parser starts from the head and the hips, then works outwards: 1-based COCO order.
COCO_JOINT_ORDER = tuple(i - 1 for i in (1, 2, 3, 4, 5, 6, 7, 12, 13, 8, 9, 10, 11, 14, 15, 16, 17))


@dataclass
class GroupingParams:
    num_joints: int = 17
    max_num_people: int = 30          # top-k candidates per joint, and people tags are matched against
    detection_threshold: float = 0.1
    tag_threshold: float = 1.0
    use_detection_val: bool = True    # cost = round(tag distance) * 100 - score
    ignore_too_much: bool = False
    nms_kernel: int = 5
    adjust: bool = True               # quarter-pixel step towards the higher neighbour
    refine: bool = True               # fill missing joints from the full maps
    joint_order: tuple | None = None  # None: the official COCO order for 17 joints, else 0..K-1

    def order(self):
        if self.joint_order is not None:
            return tuple(self.joint_order)
        return COCO_JOINT_ORDER if self.num_joints == 17 else tuple(range(self.num_joints))


def _as_maps(heatmaps, tags, num_joints):
    """torch float32 (K,H,W) heatmaps and (K,H,W,L) tags; a shared tag map is repeated per joint."""
    det = torch.as_tensor(heatmaps).detach().float().cpu()
    tag = torch.as_tensor(tags).detach().float().cpu()
    if det.dim() != 3 or det.shape[0] != num_joints:
        raise ValueError(f"heatmaps must be (K={num_joints}, H, W), got {tuple(det.shape)}")
    if tag.dim() == 3:
        tag = tag[..., None]
    if tag.dim() != 4 or tag.shape[1:3] != det.shape[1:]:
        raise ValueError(f"tags must be (K, H, W, L) matching heatmaps {tuple(det.shape)}, got {tuple(tag.shape)}")
    if tag.shape[0] == 1 and num_joints > 1:
        tag = tag.expand(num_joints, -1, -1, -1)
    return det.contiguous(), tag.contiguous()


def local_maxima_nms(det, kernel=5):
    """Exactly common.heatmaps.heatmap_nms (max_pool2d, stride 1, -inf padding) for one (K,H,W) numpy
    stack, computed as a separable max of shifted copies: several times faster on CPU at input size."""
    radius = (kernel - 1) // 2
    rows = det.copy()
    for s in range(1, radius + 1):
        np.maximum(rows[:, :, s:], det[:, :, :-s], out=rows[:, :, s:])
        np.maximum(rows[:, :, :-s], det[:, :, s:], out=rows[:, :, :-s])
    pooled = rows.copy()
    for s in range(1, radius + 1):
        np.maximum(pooled[:, s:], rows[:, :-s], out=pooled[:, s:])
        np.maximum(pooled[:, :-s], rows[:, s:], out=pooled[:, :-s])
    return det * (pooled == det)


def top_k_candidates(det, tag, params, fast_nms=True):
    """NMS (kernel x kernel local maxima) and the top-k per joint: tag_k (K,k,L), loc_k (K,k,2) int64
    (x, y), val_k (K,k), as numpy. det (K,H,W), tag (K,H,W,L) torch. fast_nms=False uses the
    official max_pool2d form (common.heatmaps.heatmap_nms); both give the same map."""
    num_joints, height, width = det.shape
    k = min(params.max_num_people, height * width)
    if fast_nms:
        suppressed = torch.from_numpy(local_maxima_nms(det.numpy(), params.nms_kernel))[None]
    else:
        suppressed = heatmap_nms(det[None], params.nms_kernel)
    val, xs, ys = topk_peaks(suppressed, k)
    val, xs, ys = val[0], xs[0], ys[0]
    flat = tag.reshape(num_joints, height * width, -1)
    tag_k = torch.gather(flat, 1, (ys * width + xs)[..., None].expand(-1, -1, flat.shape[2]))
    return tag_k.numpy(), torch.stack((xs, ys), dim=2).numpy(), val.numpy()


# ----------------------------------------------------------------------------------------------------
# Reference: the official HeatmapParser (lib/core/group.py), one joint, one person, one map at a time.
# Only deliberate change: people are keyed by creation order; the official dict is keyed by the first
# tag value, so two detections with exactly equal tags would silently merge into one person.
# ----------------------------------------------------------------------------------------------------

def match_by_tag_reference(tag_k, loc_k, val_k, params):
    num_joints = params.num_joints
    default = np.zeros((num_joints, 3 + tag_k.shape[2]))
    joint_dict, tag_dict = {}, {}
    for i, idx in enumerate(params.order()):
        tags = tag_k[idx]
        joints = np.concatenate((loc_k[idx], val_k[idx, :, None], tags), 1)
        mask = joints[:, 2] > params.detection_threshold
        tags, joints = tags[mask], joints[mask]
        if joints.shape[0] == 0:
            continue
        if i == 0 or len(joint_dict) == 0:
            for tag, joint in zip(tags, joints):
                key = len(joint_dict)
                joint_dict.setdefault(key, np.copy(default))[idx] = joint
                tag_dict[key] = [tag]
            continue
        grouped_keys = list(joint_dict.keys())[:params.max_num_people]
        grouped_tags = [np.mean(tag_dict[key], axis=0) for key in grouped_keys]
        if params.ignore_too_much and len(grouped_keys) == params.max_num_people:
            continue
        diff = joints[:, None, 3:] - np.array(grouped_tags)[None, :, :]
        diff_normed = np.linalg.norm(diff, ord=2, axis=2)
        diff_saved = np.copy(diff_normed)
        if params.use_detection_val:
            diff_normed = np.round(diff_normed) * 100 - joints[:, 2:3]
        num_added, num_grouped = diff.shape[0], diff.shape[1]
        if num_added > num_grouped:
            diff_normed = np.concatenate(
                (diff_normed, np.zeros((num_added, num_added - num_grouped)) + 1e10), axis=1)
        rows, cols = linear_sum_assignment(diff_normed)
        for row, col in zip(rows, cols):
            if row < num_added and col < num_grouped and diff_saved[row][col] < params.tag_threshold:
                key = grouped_keys[col]
                joint_dict[key][idx] = joints[row]
                tag_dict[key].append(tags[row])
            else:
                key = len(joint_dict)
                joint_dict.setdefault(key, np.copy(default))[idx] = joints[row]
                tag_dict[key] = [tags[row]]
    if not joint_dict:
        return np.zeros((0, num_joints, 3 + tag_k.shape[2]), np.float32)
    return np.array([joint_dict[key] for key in joint_dict]).astype(np.float32)


def adjust_reference(people, det):
    """Quarter-pixel step towards the higher neighbour, plus the +0.5 pixel-centre offset."""
    for person in people:
        for joint_id, joint in enumerate(person):
            if joint[2] > 0:
                y, x = joint[0:2]        # official naming: y holds the column, x the row
                xx, yy = int(x), int(y)
                tmp = det[joint_id]
                y = y + 0.25 if tmp[xx, min(yy + 1, tmp.shape[1] - 1)] > tmp[xx, max(yy - 1, 0)] else y - 0.25
                x = x + 0.25 if tmp[min(xx + 1, tmp.shape[0] - 1), yy] > tmp[max(0, xx - 1), yy] else x - 0.25
                person[joint_id, 0:2] = (y + 0.5, x + 0.5)
    return people


def refine_reference(det, tag, keypoints):
    """Fill a person's missing joints: per joint, the full-map argmax of score - round(tag distance)."""
    tags = []
    for i in range(keypoints.shape[0]):
        if keypoints[i, 2] > 0:
            x, y = keypoints[i][:2].astype(np.int32)
            tags.append(tag[i, y, x])
    prev_tag = np.mean(tags, axis=0)
    ans = []
    for i in range(keypoints.shape[0]):
        tmp = det[i, :, :]
        tt = ((tag[i, :, :] - prev_tag[None, None, :]) ** 2).sum(axis=2) ** 0.5
        tmp2 = tmp - np.round(tt)
        y, x = np.unravel_index(np.argmax(tmp2), tmp.shape)
        xx, yy = x, y
        val = tmp[y, x]
        x, y = x + 0.5, y + 0.5
        x = x + 0.25 if tmp[yy, min(xx + 1, tmp.shape[1] - 1)] > tmp[yy, max(xx - 1, 0)] else x - 0.25
        y = y + 0.25 if tmp[min(yy + 1, tmp.shape[0] - 1), xx] > tmp[max(0, yy - 1), xx] else y - 0.25
        ans.append((x, y, val))
    ans = np.array(ans)
    for i in range(det.shape[0]):
        if ans[i, 2] > 0 and keypoints[i, 2] == 0:
            keypoints[i, :2] = ans[i, :2]
            keypoints[i, 2] = ans[i, 2]
    return keypoints


def group_by_tags_reference(heatmaps, tags, params=None):
    """The official parse(): top-k, match, adjust, person scores, refine; slow but literal."""
    params = params or GroupingParams()
    det, tag = _as_maps(heatmaps, tags, params.num_joints)
    people = match_by_tag_reference(*top_k_candidates(det, tag, params, fast_nms=False), params)
    det_np, tag_np = det.numpy(), tag.numpy()
    if params.adjust:
        people = adjust_reference(people, det_np)
    scores = np.array([person[:, 2].mean() for person in people], np.float32)
    if params.refine:
        for i in range(len(people)):
            people[i] = refine_reference(det_np, tag_np, people[i])
    return people, scores


# ----------------------------------------------------------------------------------------------------
# Fast: the same arithmetic, vectorised. Matching is sequential over joints by nature (each joint is
# matched to the people built so far) but every step is one small assignment; adjust is a gather;
# refine only searches the joints that are missing, batched over people, and only where the score map
# can still beat a lower bound found at the NMS peaks (exact: a pixel whose score is below the bound
# cannot win, since score - round(distance) <= score).
# ----------------------------------------------------------------------------------------------------

def match_by_tag(tag_k, loc_k, val_k, params):
    num_joints, _, tag_dim = tag_k.shape
    capacity = num_joints * tag_k.shape[1]
    people = np.zeros((capacity, num_joints, 3 + tag_dim))
    # Each person's tags in arrival order and their mean, recomputed with np.mean only when a tag
    # arrives: np.mean sums pairwise for one tag dimension, so a running sum would differ in the last bit.
    person_tags = np.zeros((capacity, num_joints, tag_dim), np.float32)
    tag_count = np.zeros(capacity, np.int64)
    tag_mean = np.zeros((capacity, tag_dim), np.float32)
    count = 0
    for i, idx in enumerate(params.order()):
        joints = np.concatenate((loc_k[idx], val_k[idx, :, None], tag_k[idx]), 1)
        keep = joints[:, 2] > params.detection_threshold
        joints, tags = joints[keep], tag_k[idx][keep]
        num_added = joints.shape[0]
        if num_added == 0:
            continue
        new_rows = np.arange(num_added)
        if i > 0 and count > 0:
            num_grouped = min(count, params.max_num_people)
            if params.ignore_too_much and num_grouped == params.max_num_people:
                continue
            diff_saved = np.linalg.norm(joints[:, None, 3:] - tag_mean[None, :num_grouped], ord=2, axis=2)
            cost = np.round(diff_saved) * 100 - joints[:, 2:3] if params.use_detection_val else diff_saved
            if num_added > num_grouped:
                cost = np.concatenate((cost, np.full((num_added, num_added - num_grouped), 1e10)), axis=1)
            rows, cols = linear_sum_assignment(cost)
            matched = cols < num_grouped
            matched[matched] = diff_saved[rows[matched], cols[matched]] < params.tag_threshold
            target, source = cols[matched], rows[matched]
            people[target, idx] = joints[source]
            person_tags[target, tag_count[target]] = tags[source]
            tag_count[target] += 1
            for p in target:
                tag_mean[p] = np.mean(person_tags[p, :tag_count[p]], axis=0)
            new_rows = rows[~matched]    # ascending: the order the official loop creates them in
        new = np.arange(count, count + len(new_rows))
        people[new, idx] = joints[new_rows]
        person_tags[new, 0] = tags[new_rows]
        tag_count[new] = 1
        tag_mean[new] = tags[new_rows]
        count += len(new_rows)
    return people[:count].astype(np.float32)


def adjust_people(people, det):
    """Vectorised adjust_reference (det: numpy (K,H,W))."""
    num_joints, height, width = det.shape
    person, joint = np.nonzero(people[:, :, 2] > 0)
    if len(person) == 0:
        return people
    col = people[person, joint, 0].astype(np.int64)
    row = people[person, joint, 1].astype(np.int64)
    right = det[joint, row, np.minimum(col + 1, width - 1)] > det[joint, row, np.maximum(col - 1, 0)]
    down = det[joint, np.minimum(row + 1, height - 1), col] > det[joint, np.maximum(row - 1, 0), col]
    people[person, joint, 0] = people[person, joint, 0] + np.where(right, 0.25, -0.25) + 0.5
    people[person, joint, 1] = people[person, joint, 1] + np.where(down, 0.25, -0.25) + 0.5
    return people


def _block_bounds(det_j, tag_j, block):
    """Per block x block tile of one joint's maps: the highest score and the box [min, max] its tags
    span. Padding repeats the edge, which only widens a box (bounds stay valid)."""
    height, width = det_j.shape
    if height % block or width % block:
        pad = ((0, -height % block), (0, -width % block))
        det_j = np.pad(det_j, pad, constant_values=-np.inf)
        tag_j = np.pad(tag_j, pad + ((0, 0),), mode="edge")
    bh, bw = det_j.shape[0] // block, det_j.shape[1] // block
    # one axis at a time, outer axis first: numpy then runs contiguous inner loops (~30x faster)
    det_max = det_j.reshape(bh, block, bw, block).max(axis=1).max(axis=2).reshape(-1)
    tiles = tag_j.reshape(bh, block, bw, block, -1)
    tag_lo = tiles.min(axis=1).min(axis=2).reshape(bh * bw, -1)
    tag_hi = tiles.max(axis=1).max(axis=2).reshape(bh * bw, -1)
    return det_max, tag_lo, tag_hi, (bh, bw)


def _block_pixels(tiles, block, shape):
    """Flat indices, ascending, of the pixels in the marked tiles ((bh, bw) bool): ascending order
    keeps np.argmax's first-index rule for ties."""
    height, width = shape
    bh, bw = tiles.shape
    mask = np.broadcast_to(tiles[:, None, :, None], (bh, block, bw, block)).reshape(bh * block, bw * block)
    return np.flatnonzero(mask[:height, :width])


def _distance(tags, prev):
    """Euclidean tag distance summed channel by channel: the same float32 additions as numpy's
    .sum(axis=-1) over a short axis, without its slow strided reduction."""
    squared = (tags - prev) ** 2
    total = squared[..., 0]
    for c in range(1, squared.shape[-1]):
        total = total + squared[..., c]
    return total ** 0.5


def _score_minus_distance(flat_det_j, flat_tag_j, pixels, prev):
    """score - round(tag distance) at `pixels` ((P,) shared or (M, P) per person) for each person's
    mean tag `prev` (M, L), in the reference's float32 arithmetic, so ties and roundings agree."""
    tags = flat_tag_j[pixels] if pixels.ndim == 2 else flat_tag_j[pixels][None]
    return flat_det_j[pixels] - np.round(_distance(tags, prev[:, None]))


def refine_people(det, tag, people, loc_k=None, block=16):
    """Vectorised refine_reference for all people. det (K,H,W), tag (K,H,W,L) numpy float32.

    Exact search with pruning. Every tile of block x block pixels gets an upper bound per person:
    its highest score minus round(distance from the person's tag to the tile's tag box). A lower
    bound B comes from scoring a few probe pixels (NMS peaks, the global maximum, the person's own
    joints) and the whole most promising tile. Only tiles whose upper bound reaches B are scored;
    every pixel elsewhere scores strictly below B, so the argmax (and its first-index tie rule) is
    the reference's.
    """
    num_joints, height, width = det.shape
    num_people = len(people)
    if num_people == 0:
        return people
    present = people[:, :, 2] > 0
    cols = people[:, :, 0].astype(np.int32).clip(0, width - 1)
    rows = people[:, :, 1].astype(np.int32).clip(0, height - 1)
    # mean tag of each person's detected joints (np.mean per person: the reference's rounding)
    own_tags = tag[np.arange(num_joints)[None], rows, cols]    # (N, K, L)
    prev_tag = np.stack([np.mean(own_tags[p][present[p]], axis=0) for p in range(num_people)])

    flat_det = det.reshape(num_joints, -1)
    flat_tag = tag.reshape(num_joints, height * width, -1)
    for j in range(num_joints):
        missing = np.nonzero(~present[:, j])[0]
        if len(missing) == 0:
            continue
        prev = prev_tag[missing]
        det_max, tag_lo, tag_hi, grid = _block_bounds(det[j], tag[j], block)
        nearest = np.clip(prev[:, None], tag_lo[None], tag_hi[None])            # (M, tiles, L)
        upper = det_max[None] - np.round(_distance(nearest, prev[:, None]))
        probes = [np.argmax(flat_det[j])[None], (rows[missing] * width + cols[missing])[present[missing]]]
        if loc_k is not None:
            probes.append(loc_k[j, :, 1] * width + loc_k[j, :, 0])
        probes = np.unique(np.concatenate(probes))
        bound = _score_minus_distance(flat_det[j], flat_tag[j], probes, prev).max(axis=1)
        # score the most promising tile of each person in full: usually the bound then prunes the rest
        top = np.argmax(upper, axis=1)
        offsets = np.arange(block)
        ys = np.minimum((top // grid[1])[:, None, None] * block + offsets[None, :, None], height - 1)
        xs = np.minimum((top % grid[1])[:, None, None] * block + offsets[None, None, :], width - 1)
        top_pixels = (ys * width + xs).reshape(len(missing), -1)
        bound = np.maximum(bound, _score_minus_distance(flat_det[j], flat_tag[j], top_pixels, prev).max(axis=1))
        best = np.empty(len(missing), np.int64)
        for m in range(len(missing)):
            pixels = _block_pixels((upper[m] >= bound[m]).reshape(grid), block, (height, width))
            score = _score_minus_distance(flat_det[j], flat_tag[j], pixels, prev[m:m + 1])[0]
            best[m] = pixels[np.argmax(score)]
        y, x = best // width, best % width
        val = flat_det[j, best]
        tmp = det[j]
        right = tmp[y, np.minimum(x + 1, width - 1)] > tmp[y, np.maximum(x - 1, 0)]
        down = tmp[np.minimum(y + 1, height - 1), x] > tmp[np.maximum(0, y - 1), x]
        fill = val > 0
        p = missing[fill]
        people[p, j, 0] = (x + 0.5 + np.where(right, 0.25, -0.25))[fill]
        people[p, j, 1] = (y + 0.5 + np.where(down, 0.25, -0.25))[fill]
        people[p, j, 2] = val[fill]
    return people


def group_by_tags(heatmaps, tags, params=None):
    """Fast grouping with the reference's output (same people in the same order, same coordinates)."""
    params = params or GroupingParams()
    det, tag = _as_maps(heatmaps, tags, params.num_joints)
    tag_k, loc_k, val_k = top_k_candidates(det, tag, params)
    people = match_by_tag(tag_k, loc_k, val_k, params)
    det_np = det.numpy()
    if params.adjust:
        people = adjust_people(people, det_np)
    scores = people[:, :, 2].mean(axis=1) if len(people) else np.zeros(0, np.float32)
    if params.refine:
        people = refine_people(det_np, tag.numpy(), people, loc_k)
    return people, scores.astype(np.float32)
