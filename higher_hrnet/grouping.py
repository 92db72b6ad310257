"""Associative-embedding grouping: heatmaps + tags of one image -> people, as the official HeatmapParser.

API (rtpe imports these):
    params = GroupingParams(num_joints=17)            # official thresholds: detection 0.1, tag 1.0
    people, scores = group_by_tags(heatmaps, tags, params)            # fast, vectorized
    people, scores = group_by_tags_reference(heatmaps, tags, params)  # the official parser, step by step
heatmaps: (K, H, W); tags: (K, H, W, L), (K, H, W) or (1, H, W[, L]) for one shared tag map (torch or
numpy). people: float32 (N, K, 3 + L) rows (x, y, score, tag...) in map pixels, pixel centers at +0.5
as in the official parser; scores: float32 (N,), the mean joint score before refinement.
Both return what the official parser (HRNet/HigherHRNet-Human-Pose-Estimation lib/core/group.py with
munkres 1.1.4) returns, bit for bit: tested against ../shared/reference/official_grouping_vectors.npz.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

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
    # The official parser keeps people in a dict keyed by their first tag value, so a detection whose
    # first tag equals an existing person's overwrites that person's joint (and restarts its tag list)
    # instead of opening a new person. False keys people by creation order: equal tags never merge.
    merge_equal_tags: bool = True

    def order(self):
        if self.joint_order is not None:
            return tuple(self.joint_order)
        return COCO_JOINT_ORDER if self.num_joints == 17 else tuple(range(self.num_joints))


def _as_maps(heatmaps, tags, num_joints):
    """torch float32 (K,H,W) heatmaps and tag planes (L,K,H,W), each contiguous; a shared tag map is
    repeated per joint. Planes keep each tag dimension's maps contiguous (predict_maps hands them over
    as a (K,H,W,L) view of planes, so nothing is copied)."""
    det = torch.as_tensor(heatmaps).detach().float().cpu()
    tag = torch.as_tensor(tags).detach().float().cpu()
    if det.dim() != 3 or det.shape[0] != num_joints:
        raise ValueError(f"heatmaps must be (K={num_joints}, H, W), got {tuple(det.shape)}")
    if tag.dim() == 3:
        tag = tag[..., None]
    if tag.dim() != 4 or tag.shape[1:3] != det.shape[1:]:
        raise ValueError(f"tags must be (K, H, W, L) matching heatmaps {tuple(det.shape)}, got {tuple(tag.shape)}")
    planes = np.moveaxis(tag.numpy(), -1, 0)
    if planes.shape[1] == 1 and num_joints > 1:
        planes = np.broadcast_to(planes, (planes.shape[0], num_joints) + planes.shape[2:])
    # numpy rearranges interleaved (K,H,W,L) tags several times faster than torch's .contiguous()
    return det.contiguous(), torch.from_numpy(np.ascontiguousarray(planes))


def heatmap_nms(heatmaps: torch.Tensor, kernel=5):
    """Keep only local maxima within a kernel x kernel window (others set to zero)."""
    pooled = F.max_pool2d(heatmaps, kernel, stride=1, padding=(kernel - 1) // 2)
    return heatmaps * (pooled == heatmaps)


def topk_peaks(heatmaps: torch.Tensor, k):
    """Top-k values of each (already NMS'd) map: scores, xs, ys, each (B, K, k)."""
    batch, joints, height, width = heatmaps.shape
    scores, index = heatmaps.reshape(batch, joints, -1).topk(k, dim=2)
    return scores, index % width, torch.div(index, width, rounding_mode="floor")


def local_maxima_nms(det, kernel=5):
    """Exactly heatmap_nms (max_pool2d, stride 1, -inf padding) for one (K,H,W) numpy
    stack and an odd kernel, with OpenCV's dilation as the max filter (its border is -inf as well)."""
    return det * (_dilate(det, kernel) == det)


def _dilate(det, kernel):
    element = cv2.getStructuringElement(cv2.MORPH_RECT, (kernel, kernel))
    pooled = np.empty_like(det)
    for j in range(det.shape[0]):
        cv2.dilate(det[j], element, dst=pooled[j])
    return pooled


def _peaks_above(det, threshold, kernel):
    """Flat indices, ascending, of the pixels of the (K,H,W) maps above `threshold` that are the
    maximum of their kernel x kernel window (the NMS survivors the matching can use). Few pixels above
    the threshold: their windows are read directly (clamping to the map stays inside a window); many:
    one dilation of every map."""
    above = np.flatnonzero(det > threshold)
    if len(above) * kernel * kernel > det.size // 4:
        return np.flatnonzero((_dilate(det, kernel) == det) & (det > threshold))
    joint, rest = np.divmod(above, det.shape[1] * det.shape[2])
    y, x = np.divmod(rest, det.shape[2])
    radius = (kernel - 1) // 2
    window_max = np.full(len(above), -np.inf, det.dtype)
    for dy in range(-radius, radius + 1):
        yy = np.clip(y + dy, 0, det.shape[1] - 1)
        for dx in range(-radius, radius + 1):
            np.maximum(window_max, det[joint, yy, np.clip(x + dx, 0, det.shape[2] - 1)], out=window_max)
    return above[window_max == det.reshape(-1)[above]]


def top_k_candidates(det, planes, params, suppressed=None):
    """The official top_k: max_pool2d NMS, then torch.topk per joint. det (K,H,W), planes (L,K,H,W) torch;
    returns tag_k (K,k,L), loc_k (K,k,2) int64 (x, y), val_k (K,k) as numpy. `suppressed`: the NMS'd
    maps if already computed (local_maxima_nms gives the same maps)."""
    num_joints, height, width = det.shape
    k = min(params.max_num_people, height * width)
    suppressed = heatmap_nms(det[None], params.nms_kernel) if suppressed is None else suppressed[None]
    val, xs, ys = topk_peaks(suppressed, k)
    val, xs, ys = val[0], xs[0], ys[0]
    flat = planes.reshape(len(planes), num_joints, height * width)
    tag_k = torch.stack([torch.gather(plane, 1, ys * width + xs) for plane in flat], dim=2)
    return tag_k.numpy(), torch.stack((xs, ys), dim=2).numpy(), val.numpy()


def peak_candidates(det, planes, params):
    """top_k_candidates for the entries the matching uses (score > detection threshold), without sorting
    whole maps: local maxima above the threshold, sorted by score. Entries past a joint's candidates have
    score -inf. A joint with equal candidate scores takes torch.topk's order, as the official code (on
    that joint's NMS'd map); with an even kernel or a threshold below 0 this is top_k_candidates."""
    num_joints, height, width = det.shape
    k = min(params.max_num_people, height * width)
    det_np = det.numpy()
    if params.nms_kernel % 2 == 0:
        return top_k_candidates(det, planes, params)
    if params.detection_threshold < 0:
        return top_k_candidates(det, planes, params, torch.from_numpy(local_maxima_nms(det_np, params.nms_kernel)))
    joint, flat = np.divmod(_peaks_above(det_np, params.detection_threshold, params.nms_kernel), height * width)
    values = det_np.reshape(num_joints, -1)[joint, flat]
    order = np.lexsort((-values, joint))                # by joint, then by descending score
    joint, flat, values = joint[order], flat[order], values[order]
    rank = np.arange(len(joint)) - np.searchsorted(joint, joint)
    tied = np.unique(joint[1:][(joint[1:] == joint[:-1]) & (values[1:] == values[:-1])])
    keep = (rank < k) & ~np.isin(joint, tied)
    joint, flat, values, rank = [a[keep] for a in (joint, flat, values, rank)]
    for j in tied:     # torch.topk orders equal scores its own way: ask it, for this joint only
        suppressed = local_maxima_nms(det_np[j:j + 1], params.nms_kernel).reshape(1, -1)
        top_values, top_flat = torch.topk(torch.from_numpy(suppressed), k, dim=1)
        above = (top_values[0] > params.detection_threshold).numpy()
        count = int(above.sum())
        joint = np.concatenate([joint, np.full(count, j)])
        flat = np.concatenate([flat, top_flat[0].numpy()[above]])
        values = np.concatenate([values, top_values[0].numpy()[above]])
        rank = np.concatenate([rank, np.arange(count)])
    val_k = np.full((num_joints, k), -np.inf, np.float32)
    loc_k = np.zeros((num_joints, k, 2), np.int64)
    tag_k = np.zeros((num_joints, k, len(planes)), np.float32)
    val_k[joint, rank] = values
    loc_k[joint, rank, 0], loc_k[joint, rank, 1] = flat % width, flat // width
    tag_k[joint, rank] = planes.numpy().reshape(len(planes), -1)[:, joint * height * width + flat].T
    return tag_k, loc_k, val_k


# ----------------------------------------------------------------------------------------------------
# The assignment solver. The matching cost has tied optima very often, so which optimum comes out
# decides who gets which joint: the official parser takes munkres 1.1.4's. munkres_assignment runs that
# release's algorithm (Munkres().compute: steps 1-6 in its order, its zero search, its float64
# arithmetic) on numpy arrays; a test compares it with the package on hundreds of tied matrices.
# ----------------------------------------------------------------------------------------------------

def munkres_assignment(cost):
    """(rows, cols) that munkres 1.1.4's Munkres().compute(cost) returns, in row order.
    cost: (R, C) float array; it is padded with zeros to square, as munkres pads."""
    cost = np.asarray(cost, np.float64)
    num_rows, num_cols = cost.shape
    n = max(num_rows, num_cols)
    work = np.zeros((n, n))
    work[:num_rows, :num_cols] = cost
    work -= work.min(axis=1, keepdims=True)                    # step 1: rows only
    zero = work == 0
    starred = np.zeros((n, n), bool)
    primed = np.zeros((n, n), bool)
    row_covered = np.zeros(n, bool)
    col_covered = np.zeros(n, bool)
    for i, j in zip(*np.nonzero(zero)):                        # step 2: greedy stars in row-major order
        if not row_covered[i] and not col_covered[j]:
            starred[i, j] = row_covered[i] = col_covered[j] = True
    row_covered[:] = False
    while True:
        col_covered[:] = starred.any(axis=0)                   # step 3
        if col_covered.sum() >= n:
            break
        row, col = 0, 0
        while True:                                            # step 4, with step 6 when no zero is left
            free = zero & ~row_covered[:, None] & ~col_covered[None, :]
            rows = np.flatnonzero(free.any(axis=1))
            if len(rows) == 0:
                smallest = work[~row_covered][:, ~col_covered].min()
                work[row_covered] += smallest                  # munkres adds, then subtracts, per element
                work[:, ~col_covered] -= smallest
                zero = work == 0
                row, col = 0, 0
                continue
            # munkres' zero search: the first row from `row` on (wrapping) that has an uncovered zero,
            # and in it the LAST such zero scanning from `col` on (wrapping): its loop does not stop
            later = rows[rows >= row]
            row = later[0] if len(later) else rows[0]
            cols = np.flatnonzero(free[row])
            before = cols[cols < col]
            col = before[-1] if len(before) else cols[-1]
            primed[row, col] = True
            star = np.flatnonzero(starred[row])
            if len(star) == 0:
                break
            col = star[0]
            row_covered[row] = True
            col_covered[col] = False
        path = [(row, col)]                                    # step 5
        while True:
            star_rows = np.flatnonzero(starred[:, path[-1][1]])
            if len(star_rows) == 0:
                break
            path.append((star_rows[0], path[-1][1]))
            path.append((star_rows[0], np.flatnonzero(primed[star_rows[0]])[0]))
        for r, c in path:
            starred[r, c] = not starred[r, c]
        row_covered[:] = False
        primed[:] = False
    return np.nonzero(starred[:num_rows, :num_cols])


def matching_cost(joints, person_tags, params):
    """The official cost of candidates (rows) against people (columns), padded with 1e10 columns when
    there are more candidates than people, and the plain tag distances."""
    distance = np.linalg.norm(joints[:, None, 3:] - person_tags[None, :, :], ord=2, axis=2)
    cost = np.round(distance) * 100 - joints[:, 2:3] if params.use_detection_val else np.copy(distance)
    num_added, num_grouped = distance.shape
    if num_added > num_grouped:
        cost = np.concatenate((cost, np.zeros((num_added, num_added - num_grouped)) + 1e10), axis=1)
    return cost, distance


# ----------------------------------------------------------------------------------------------------
# Reference: the official HeatmapParser (lib/core/group.py), one joint, one person, one map at a time,
# with the munkres package itself as the solver.
# ----------------------------------------------------------------------------------------------------

def match_by_tag_reference(tag_k, loc_k, val_k, params):
    from munkres import Munkres

    num_joints = params.num_joints
    default = np.zeros((num_joints, 3 + tag_k.shape[2]))
    joint_dict, tag_dict = {}, {}

    def key_for(tag):
        return tag[0] if params.merge_equal_tags else len(joint_dict)

    for i, idx in enumerate(params.order()):
        tags = tag_k[idx]
        joints = np.concatenate((loc_k[idx], val_k[idx, :, None], tags), 1)
        mask = joints[:, 2] > params.detection_threshold
        tags, joints = tags[mask], joints[mask]
        if joints.shape[0] == 0:
            continue
        if i == 0 or len(joint_dict) == 0:
            for tag, joint in zip(tags, joints):
                key = key_for(tag)
                joint_dict.setdefault(key, np.copy(default))[idx] = joint
                tag_dict[key] = [tag]
            continue
        grouped_keys = list(joint_dict.keys())[:params.max_num_people]
        grouped_tags = [np.mean(tag_dict[key], axis=0) for key in grouped_keys]
        if params.ignore_too_much and len(grouped_keys) == params.max_num_people:
            continue
        cost, diff_saved = matching_cost(joints, np.array(grouped_tags), params)
        num_added, num_grouped = diff_saved.shape
        pairs = np.array(Munkres().compute(cost)).astype(np.int32)
        for row, col in pairs:
            if row < num_added and col < num_grouped and diff_saved[row][col] < params.tag_threshold:
                key = grouped_keys[col]
                joint_dict[key][idx] = joints[row]
                tag_dict[key].append(tags[row])
            else:
                key = key_for(tags[row])
                joint_dict.setdefault(key, np.copy(default))[idx] = joints[row]
                tag_dict[key] = [tags[row]]
    if not joint_dict:
        return np.zeros((0, num_joints, 3 + tag_k.shape[2]), np.float32)
    return np.array([joint_dict[key] for key in joint_dict]).astype(np.float32)


def adjust_reference(people, det):
    """Quarter-pixel step towards the higher neighbour, plus the +0.5 pixel-center offset."""
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
    det, planes = _as_maps(heatmaps, tags, params.num_joints)
    people = match_by_tag_reference(*top_k_candidates(det, planes, params), params)
    det_np, tag_np = det.numpy(), planes.permute(1, 2, 3, 0).contiguous().numpy()
    if params.adjust:
        people = adjust_reference(people, det_np)
    scores = np.array([person[:, 2].mean() for person in people], np.float32)
    if params.refine:
        for i in range(len(people)):
            people[i] = refine_reference(det_np, tag_np, people[i])
    return people, scores


# ----------------------------------------------------------------------------------------------------
# Fast: the same arithmetic, vectorized. Matching is sequential over joints by nature (each joint is
# matched to the people built so far); each step is one assignment (munkres_assignment) and array
# updates. Adjust is a gather. Refine searches only where the score map can still reach the best
# score found so far (exact pruning, see refine_people).
# ----------------------------------------------------------------------------------------------------

class _People:
    """The official joint_dict / tag_dict as arrays: people in dict order, each person's tags in
    arrival order (their mean is recomputed with np.mean, as the official code does, so the rounding
    agrees) and, with merge_equal_tags, the dict key (first tag value) -> person."""

    def __init__(self, num_joints, capacity, tag_dim, merge):
        self.joints = np.zeros((capacity, num_joints, 3 + tag_dim))
        self.tags = np.zeros((capacity, num_joints, tag_dim), np.float32)
        self.tag_count = np.zeros(capacity, np.int64)
        self.tag_mean = np.zeros((capacity, tag_dim), np.float32)
        self.count = 0
        self.merge = merge
        self.by_key = {}

    def extend(self, people, joint, rows, tags):
        """Matched candidates: the joint is set and the tag appended to the person's list."""
        self.joints[people, joint] = rows
        self.tags[people, self.tag_count[people]] = tags
        self.tag_count[people] += 1
        for p in people:
            self.tag_mean[p] = np.mean(self.tags[p, :self.tag_count[p]], axis=0)

    def collides(self, tags):
        """Would opening these candidates meet an existing or repeated key?"""
        keys = [float(t) for t in tags[:, 0]] if self.merge else []
        return len(set(keys)) < len(keys) or any(key in self.by_key for key in keys)

    def open(self, joint, rows, tags):
        """Unmatched candidates with keys that collide with nothing: new people, in row order."""
        new = np.arange(self.count, self.count + len(rows))
        self.joints[new, joint] = rows
        self.tags[new, 0] = tags
        self.tag_count[new] = 1
        self.tag_mean[new] = tags
        if self.merge:
            self.by_key.update(zip((float(t) for t in tags[:, 0]), new.tolist()))
        self.count += len(rows)

    def open_one(self, joint, row, tag):
        """The official `joint_dict.setdefault(key, ...)[joint] = row; tag_dict[key] = [tag]`: an equal
        key overwrites that person's joint and restarts its tag list."""
        person = self.by_key.get(float(tag[0])) if self.merge else None
        if person is None:
            self.open(joint, row[None], tag[None])
            return
        self.joints[person, joint] = row
        self.tags[person, 0] = tag
        self.tag_count[person] = 1
        self.tag_mean[person] = tag


def match_by_tag(tag_k, loc_k, val_k, params):
    num_joints, _, tag_dim = tag_k.shape
    people = _People(num_joints, num_joints * tag_k.shape[1], tag_dim, params.merge_equal_tags)
    for i, idx in enumerate(params.order()):
        keep = val_k[idx] > params.detection_threshold
        if not keep.any():
            continue
        tags = tag_k[idx][keep]
        joints = np.concatenate((loc_k[idx][keep], val_k[idx][keep, None], tags), 1)
        if i == 0 or people.count == 0:
            rows, cols, matched = np.arange(len(joints)), None, np.zeros(len(joints), bool)
        else:
            num_grouped = min(people.count, params.max_num_people)
            if params.ignore_too_much and num_grouped == params.max_num_people:
                continue
            cost, distance = matching_cost(joints, people.tag_mean[:num_grouped], params)
            rows, cols = munkres_assignment(cost)
            matched = cols < num_grouped
            matched[matched] = distance[rows[matched], cols[matched]] < params.tag_threshold
        unmatched = rows[~matched]     # ascending: the order the official loop meets them in
        if people.collides(tags[unmatched]):
            for row, col, is_matched in zip(rows, cols if cols is not None else rows, matched):
                if is_matched:         # equal keys: replay the official loop's order of events
                    people.extend(col[None], idx, joints[row][None], tags[row][None])
                else:
                    people.open_one(idx, joints[row], tags[row])
            continue
        if cols is not None:
            people.extend(cols[matched], idx, joints[rows[matched]], tags[rows[matched]])
        people.open(idx, joints[unmatched], tags[unmatched])
    return people.joints[:people.count].astype(np.float32)


def adjust_people(people, det):
    """Vectorized adjust_reference (det: numpy (K,H,W))."""
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


def person_scores(people):
    """Mean joint score per person, summed as the official per-person `person[:, 2].mean()` sums."""
    if len(people) == 0:
        return np.zeros(0, np.float32)
    return np.ascontiguousarray(people[:, :, 2]).mean(axis=1, dtype=np.float32)


class _Tiles:
    """Bounds of one image's maps over tiles at two sizes, for refine_people's pruning: per joint and
    fine x fine tile the highest score and the box [lo, hi] its tags span; coarse tiles are
    factor x factor fine tiles. Maps are padded to whole coarse tiles (scores with -inf, tags by
    repeating the edge, which only widens a box); pixel lists are clamped to the map."""

    def __init__(self, det, planes, fine=4, factor=4):
        _, height, width = det.shape
        block = fine * factor
        self.pad = ((0, -height % block), (0, -width % block))
        self.det, self.planes, self.fine_size, self.factor = det, planes, fine, factor
        fh, fw = (height + self.pad[0][1]) // fine, (width + self.pad[1][1]) // fine
        self.grid = (fh, fw)
        offsets = np.arange(fine)
        ys = np.minimum(np.arange(fh)[:, None, None, None] * fine + offsets[None, None, :, None], height - 1)
        xs = np.minimum(np.arange(fw)[None, :, None, None] * fine + offsets[None, None, None, :], width - 1)
        self.fine_pixels = (ys * width + xs).reshape(fh * fw, fine * fine)
        fine_ids = np.arange(fh * fw).reshape(fh // factor, factor, fw // factor, factor)
        self.children = fine_ids.transpose(0, 2, 1, 3).reshape(-1, factor * factor)   # coarse -> fine tiles

    def bounds(self, joint):
        """((max, lo, hi) over coarse tiles, the same over fine tiles) of one joint: max (T,), lo and hi
        lists of (T,) arrays, one per tag dimension."""
        (fh, fw), fine, factor = self.grid, self.fine_size, self.factor

        def per_tile(maps, reduce, pad_value):
            if self.pad[0][1] or self.pad[1][1]:
                maps = np.pad(maps, self.pad, mode="edge") if pad_value is None else \
                    np.pad(maps, self.pad, constant_values=pad_value)
            # rows of tiles first (contiguous runs), then the columns one slice at a time: numpy's own
            # reduction over a short strided axis is several times slower
            rows = reduce.reduce(maps.reshape(fh, fine, -1), axis=1).reshape(fh, fw, fine)
            out = rows[:, :, 0].copy()
            for i in range(1, fine):
                reduce(out, rows[:, :, i], out=out)
            grouped = out.reshape(fh // factor, factor, fw // factor, factor)
            return out.reshape(-1), reduce.reduce(reduce.reduce(grouped, axis=1), axis=2).reshape(-1)

        fine_max, coarse_max = per_tile(self.det[joint], np.maximum, -np.inf)
        lows = [per_tile(plane[joint], np.minimum, None) for plane in self.planes]
        highs = [per_tile(plane[joint], np.maximum, None) for plane in self.planes]
        level = lambda pairs, i: [pair[i] for pair in pairs]
        return (coarse_max, level(lows, 1), level(highs, 1)), (fine_max, level(lows, 0), level(highs, 0))


def _tile_scores(tile_max, tag_lo, tag_hi, prev):
    """What a tile's pixels can score for a person with mean tag prev: (upper, exact). upper: no pixel
    scores above it; exact: every pixel's round(distance) is the same, so upper is the best score in
    the tile (reached at its highest pixel). Sound in float32: every step of the reference's
    score - round(distance) is monotone, and per tag dimension the box's nearest and farthest
    corners bound the distance of every tag inside it. tag_lo, tag_hi, prev: one array per tag
    dimension, broadcasting together."""
    near, far = [], []
    for lo, hi, p in zip(tag_lo, tag_hi, prev):
        near.append((np.clip(p, lo, hi) - p) ** 2)
        far.append(np.maximum((lo - p) ** 2, (hi - p) ** 2))
    near, far = (np.round(_sum_tag_dims(squares) ** 0.5) for squares in (near, far))
    return tile_max - near, near == far


def _sum_tag_dims(squares):
    """The reference's float32 sum over the tag axis: numpy adds an axis shorter than 8 left to right
    (pairwise from 8 on)."""
    return sum(squares[1:], squares[0]) if len(squares) < 8 else np.stack(squares, axis=-1).sum(axis=-1)


def _best_pixels(det_j, planes_j, pixels, prev):
    """score - round(tag distance) at `pixels` (Q, P) for the mean tags prev (Q, L), in the reference's
    float32 arithmetic (planes_j: (L, H*W) tag planes of the joint). Returns per row the best score and
    the first pixel that has it."""
    squares = [(plane[pixels] - prev[:, None, c]) ** 2 for c, plane in enumerate(planes_j)]
    score = det_j[pixels] - np.round(_sum_tag_dims(squares) ** 0.5)
    best = score.max(axis=1)
    first = np.where(score == best[:, None], pixels, np.iinfo(np.int64).max).min(axis=1)
    return best, first


def _refined_pixels(det_j, planes_j, tiles, j, coarse_pixels, prev, peaks_j, chunk):
    """refine_people's exact search for one joint: per person (mean tags prev (M, L)) the first flat pixel
    with the highest score - round(tag distance). det_j (H*W,), planes_j (L, H*W); peaks_j: first guesses."""
    everyone = np.arange(len(prev))
    (coarse_max, coarse_lo, coarse_hi), (fine_max, fine_lo, fine_hi) = tiles.bounds(j)
    candidates = []   # (person, best score, first pixel with it) of every group of pixels scored

    def score(pixels, owner):
        for start in range(0, len(owner), chunk):
            part = slice(start, start + chunk)
            best, first = _best_pixels(det_j, planes_j, pixels[part], prev[owner[part]])
            candidates.append((owner[part], best, first))

    probes = np.unique(np.concatenate([[np.argmax(det_j)], [] if peaks_j is None else peaks_j]))
    score(np.broadcast_to(probes, (len(prev), len(probes))), everyone)
    bound = candidates[0][1].copy()
    upper, exact = _tile_scores(coarse_max[None], coarse_lo, coarse_hi, prev.T[:, :, None])   # (M, T)
    bound = np.maximum(bound, np.where(exact, upper, -np.inf).max(axis=1))
    person, coarse = np.nonzero(~exact & (upper >= bound[:, None]))
    open_exact = exact & (upper >= bound[:, None])
    exact_tiles = [(coarse_pixels, *np.nonzero(open_exact), upper[open_exact])]
    fine = tiles.children[coarse]                                                          # (Q, 16)
    fine_upper, fine_exact = _tile_scores(fine_max[fine], [lo[fine] for lo in fine_lo],
                                          [hi[fine] for hi in fine_hi], prev[person].T[:, :, None])
    np.maximum.at(bound, person, np.where(fine_exact, fine_upper, -np.inf).max(axis=1, initial=-np.inf))
    keep = fine_upper >= bound[person][:, None]
    pick, child = np.nonzero(keep & fine_exact)
    exact_tiles.append((tiles.fine_pixels, person[pick], fine[pick, child], fine_upper[pick, child]))
    pick, child = np.nonzero(keep & ~fine_exact)
    score(tiles.fine_pixels[fine[pick, child]], person[pick])
    best = np.full(len(prev), -np.inf, np.float32)
    for owner, value, _ in candidates:
        np.maximum.at(best, owner, value)
    for pixels, owner, tile, value in exact_tiles:
        np.maximum.at(best, owner, value)
    for pixels, owner, tile, value in exact_tiles:   # exact tiles that tie for the best: find their pixel
        ties = value == best[owner]
        score(pixels[tile[ties]], owner[ties])
    owners = np.concatenate([owner for owner, _, _ in candidates])
    values = np.concatenate([value for _, value, _ in candidates])
    pixels = np.concatenate([pixel for _, _, pixel in candidates])
    order = np.lexsort((pixels, -values, owners))   # per person: highest score, then first pixel
    return pixels[order[np.searchsorted(owners[order], everyone)]]


def refine_people(det, planes, people, peaks=None, chunk=8192):
    """Vectorized refine_reference for all people. det (K,H,W), planes (L,K,H,W) tag planes, numpy float32;
    peaks (K, k) flat pixel indices of each joint's candidates, used as first guesses.

    Exact search with pruning. For each person missing the joint, every 16x16 tile gets an upper
    bound on its pixels' score - round(distance) from its highest score and the box its tags span;
    where round(distance) is the same over the whole box the bound is the tile's best score
    (_tile_scores). A lower bound B on the person's best comes from the peaks and such exact tiles;
    tiles whose bound stays below B are dropped, the others are split into 4x4 tiles, and pixels are
    scored only in 4x4 tiles that are neither dropped nor exact. Every pixel left out scores strictly
    below B, or sits in an exact tile scored at the end if it ties for the best, so the argmax, and
    its first-index rule among equal scores, is the reference's.
    """
    num_joints, height, width = det.shape
    num_people = len(people)
    if num_people == 0:
        return people
    present = people[:, :, 2] > 0
    cols = people[:, :, 0].astype(np.int32).clip(0, width - 1)
    rows = people[:, :, 1].astype(np.int32).clip(0, height - 1)
    own_tags = np.stack([plane[np.arange(num_joints)[None], rows, cols] for plane in planes], axis=-1)   # (N, K, L)
    with np.errstate(invalid="ignore", divide="ignore"):
        prev_tag = np.stack([np.mean(own_tags[p][present[p]], axis=0) for p in range(num_people)])
    searchable = np.isfinite(prev_tag).all(axis=1)
    for p in np.flatnonzero(~searchable):   # no finite mean tag: what the reference computes, literally
        people[p] = refine_reference(det, np.ascontiguousarray(np.moveaxis(planes, 0, -1)), people[p])

    flat_det = det.reshape(num_joints, -1)
    flat_planes = planes.reshape(len(planes), num_joints, height * width)
    tiles = _Tiles(det, planes)
    coarse_pixels = tiles.fine_pixels[tiles.children].reshape(len(tiles.children), -1)
    for j in range(num_joints):
        missing = np.flatnonzero((people[:, j, 2] == 0) & searchable)
        if len(missing) == 0:
            continue
        best = _refined_pixels(flat_det[j], flat_planes[:, j], tiles, j, coarse_pixels, prev_tag[missing],
                               None if peaks is None else peaks[j], chunk)
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
    """Fast grouping with the reference's output (same people in the same order, same values)."""
    params = params or GroupingParams()
    det, planes = _as_maps(heatmaps, tags, params.num_joints)
    tag_k, loc_k, val_k = peak_candidates(det, planes, params)
    people = match_by_tag(tag_k, loc_k, val_k, params)
    det_np = det.numpy()
    if params.adjust:
        people = adjust_people(people, det_np)
    scores = person_scores(people)
    if params.refine:
        peaks = np.where(val_k > -np.inf, loc_k[..., 1] * det.shape[2] + loc_k[..., 0], 0)
        people = refine_people(det_np, planes.numpy(), people, peaks)
    return people, scores
