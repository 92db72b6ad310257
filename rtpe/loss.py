"""The distillation loss of the rtpe student: segmentation BCE on the attention logits, teacher/ground-truth
BCE on the heatmap logits (with the seed's keypoint mining options), and associative-embedding pull/push on
the tag channel; `DistillationObjective` is the compute_loss the training loop calls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.engine import unwrap

# BCE pos_weight of the heatmap loss: it moves the optimal logit to logit(target) + log(100), so decoding
# subtracts log(100) again (stored in checkpoints as settings["heatmap_pos_weight"]).
HEATMAP_POS_WEIGHT = 100.0


def weighted_bce(logits, target, weight, pos_weight):
    """Per-pixel BCE on logits with pos_weight, times `weight` (so zero-weight pixels contribute exactly 0
    and get no gradient; the seed multiplied the logits by the mask instead)."""
    pos = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, pos_weight=pos, reduction="none")


def keypoint_loss(logits, gt, weight, teacher=None, alpha=0.8, pos_weight=HEATMAP_POS_WEIGHT, background_factor=1.0,
                  hard_keypoints=0):
    """alpha * BCE(logits, teacher) + (1 - alpha) * BCE(logits, gt), weighted mean over pixels.
    background_factor scales the weight of pixels where the ground truth is 0 (the seed's keypoint mining);
    hard_keypoints=k keeps, per image, only the k joints with the highest loss (online hard keypoint mining).
    Returns (loss, the per-pixel weights used) so TensorBoard can show the mining mask."""
    weight = weight.expand_as(logits)
    if background_factor != 1.0:
        weight = weight * torch.where(gt > 0, 1.0, background_factor)
    per_pixel = (1 - alpha) * weighted_bce(logits, gt, weight, pos_weight)
    if teacher is not None and alpha > 0:
        per_pixel = per_pixel + alpha * weighted_bce(logits, teacher, weight, pos_weight)
    if hard_keypoints and hard_keypoints < logits.shape[1]:
        per_joint = per_pixel.sum((2, 3)) / weight.sum((2, 3)).clamp(min=1)
        top = per_joint.topk(hard_keypoints, dim=1).values
        return top.mean(), weight
    return per_pixel.sum() / weight.sum().clamp(min=1), weight


def segmentation_loss(logits, target, weight, pos_weight=7.0):
    """BCE on the segmentation logits (the seed applied it to probabilities), weighted mean."""
    return weighted_bce(logits, target, weight, pos_weight).sum() / weight.sum().clamp(min=1)


def associative_embedding_loss(tags, tag_index):
    """Pull/push of Newell et al. on one tag map per image, vectorised over people and images.

    tags: (B,1,h,w); tag_index: (B,P,K) flat pixel indices of each person's joints, -1 = none.
    pull: mean over people of the mean squared distance of their joint tags to the person's mean tag;
    push: 0.5 * mean over ordered pairs of different people of exp(-(mean_a - mean_b)^2) (official form).
    Both averaged over the images of the batch."""
    batch = tags.shape[0]
    flat = tags.reshape(batch, -1)
    valid = tag_index >= 0
    values = flat.gather(1, tag_index.clamp(min=0).reshape(batch, -1)).reshape(tag_index.shape)
    counts = valid.sum(-1)                              # (B,P)
    present = counts > 0
    means = (values * valid).sum(-1) / counts.clamp(min=1)
    pull_person = (((values - means[..., None]) ** 2) * valid).sum(-1) / counts.clamp(min=1)
    people = present.sum(-1)                            # (B,)
    pull = (pull_person * present).sum(-1) / people.clamp(min=1)
    pair = present[:, :, None] & present[:, None, :]
    pair = pair & ~torch.eye(pair.shape[1], dtype=torch.bool, device=tags.device)[None]
    diff = means[:, :, None] - means[:, None, :]
    push = (torch.exp(-diff ** 2) * pair).sum((1, 2)) / (people * (people - 1)).clamp(min=1) * 0.5
    return pull.mean(), push.mean()


class DistillationObjective:
    """compute_loss for the training loop: one forward, one summed loss, one backward per step."""

    def __init__(self, stage="det", alpha=0.8, ae_weight=1.0, background_factor=1.0, hard_keypoints=0,
                 teacher_stem=None):
        self.stage, self.alpha, self.ae_weight = stage, alpha, ae_weight
        self.background_factor, self.hard_keypoints = background_factor, hard_keypoints
        self.teacher_stem = teacher_stem
        self.last_mining_weight = None

    def __call__(self, model, batch):
        student = unwrap(model)
        if self.stage == "stem":
            with torch.no_grad():
                target = self.teacher_stem(batch["image"])
            prediction = student.stem_adapter(student.stem(batch["image"]))
            loss = F.mse_loss(prediction, target)
            return loss, {"stem": float(loss.detach())}
        segmentation, keypoints = model(batch["image"])
        if student.training:
            student.advance_training_step()
        seg = segmentation_loss(segmentation, batch["segmentation"], batch["weight"])
        if self.stage == "seg":
            return seg, {"attention": float(seg.detach())}
        k = student.num_joints
        heat, mining = keypoint_loss(keypoints[:, :k], batch["heatmaps"], batch["weight"], batch.get("teacher"),
                                     self.alpha if "teacher" in batch else 0.0,
                                     background_factor=self.background_factor,
                                     hard_keypoints=self.hard_keypoints)
        self.last_mining_weight = mining.detach()
        pull, push = associative_embedding_loss(keypoints[:, k:k + 1], batch["tag_index"])
        loss = seg + heat + self.ae_weight * (pull + push)
        parts = {"attention": seg, "keypoints": heat, "pull": pull, "push": push}
        return loss, {**{k: float(v.detach()) for k, v in parts.items()},
                      "attention_divisor": float(student.attention_divisor)}
