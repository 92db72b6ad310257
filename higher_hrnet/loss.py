"""HigherHRNet training loss: masked heatmap MSE at every output resolution plus the associative-embedding
(AE) pull / push losses on the 1/4 tags (Newell et al. 2017; official lib/core/loss.py), vectorised.

    losses = multi_resolution_loss(outputs, batch, num_joints)   # dict: total, heatmap_<i>, push, pull
Tag references come as flat rows instead of the official fixed (30 people x K joints) buffer:
batch["tag_index"] (M, 3) int64 = (sample in batch, person id unique in the batch, flat index into that
sample's tag maps: joint * H * W + y * W + x, or y * W + x with one shared tag map).
"""
from __future__ import annotations

import torch


def heatmap_loss(pred, target, mask, foreground_weight=0.0):
    """Per-sample masked MSE, (B,): mean over joints and pixels of (pred - target)^2 * mask, each pixel
    weighted 1 + foreground_weight * target (0: the official loss; > 0 stops the background, ~97% of the
    pixels, from drowning the peaks early in a short run)."""
    weight = mask[:, None] if not foreground_weight else mask[:, None] * (1 + foreground_weight * target)
    return ((pred - target) ** 2 * weight).mean(dim=(1, 2, 3))


def ae_loss(tags, tag_index, loss_type="exp"):
    """Associative-embedding loss, per sample: push (B,) and pull (B,).

    tags: (B, T, H, W) with one tag dimension per map. A person's reference tag is the mean of its
    joints' tags; pull = mean over people of the mean squared distance to it; push = mean over ordered
    pairs of people of exp(-(t_i - t_j)^2) ("exp") or max(0, 1 - |t_i - t_j|) ("max"), times 0.5.
    """
    batch = tags.shape[0]
    flat = tags.reshape(batch, -1).float()   # under autocast the tags arrive in bf16/fp16; sum in fp32
    zeros = flat.new_zeros(batch)
    if tag_index is None or len(tag_index) == 0:
        return zeros, zeros + 0 * flat.sum()
    sample, person, index = tag_index[:, 0], tag_index[:, 1], tag_index[:, 2]
    values = flat[sample, index]
    _, person = torch.unique(person, return_inverse=True)           # dense ids 0..P-1
    num_people = int(person.max()) + 1
    count = torch.zeros(num_people, device=flat.device, dtype=flat.dtype).index_add_(0, person, torch.ones_like(values))
    mean = torch.zeros_like(count).index_add_(0, person, values) / count
    person_sample = torch.zeros(num_people, dtype=torch.long, device=flat.device).index_copy_(0, person, sample)
    pull_person = torch.zeros_like(count).index_add_(0, person, (values - mean[person]) ** 2) / count
    people_per_sample = torch.zeros(batch, device=flat.device, dtype=flat.dtype).index_add_(
        0, person_sample, torch.ones_like(count))
    pull = torch.zeros_like(zeros).index_add_(0, person_sample, pull_person) / people_per_sample.clamp(min=1)

    diff = mean[:, None] - mean[None, :]
    same_sample = person_sample[:, None] == person_sample[None, :]
    off_diagonal = same_sample & ~torch.eye(num_people, dtype=torch.bool, device=flat.device)
    if loss_type == "exp":
        pair = torch.exp(-diff ** 2)
    elif loss_type == "max":
        pair = torch.clamp(1 - diff.abs(), min=0)
    else:
        raise ValueError(f"loss_type must be 'exp' or 'max', not {loss_type!r}")
    pair_sum = torch.zeros_like(zeros).index_add_(0, person_sample, (pair * off_diagonal).sum(dim=1))
    n = people_per_sample
    push = torch.where(n > 1, pair_sum / (n * (n - 1)).clamp(min=1) * 0.5, zeros)
    return push, pull


def multi_resolution_loss(outputs, batch, num_joints, heatmap_factors=(1.0, 1.0), push_factor=1e-3,
                          pull_factor=1e-3, ae_type="exp", foreground_weight=0.0):
    """The official MultiLossFactory: heatmap loss at each output, AE loss on the first (1/4) output.
    outputs: list of (B, C, H_i, W_i); batch: heatmaps_<i>, mask_<i>, tag_index. Returns a dict of
    scalars (batch means) with the weighted total under "total"."""
    losses = {}
    total = 0.0
    for i, output in enumerate(outputs):
        hm = heatmap_loss(output[:, :num_joints], batch[f"heatmaps_{i}"], batch[f"mask_{i}"], foreground_weight).mean()
        losses[f"heatmap_{i}"] = hm
        total = total + heatmap_factors[i] * hm
    push, pull = ae_loss(outputs[0][:, num_joints:], batch.get("tag_index"), ae_type)
    losses["push"], losses["pull"] = push.mean(), pull.mean()
    losses["total"] = total + push_factor * losses["push"] + pull_factor * losses["pull"]
    return losses
