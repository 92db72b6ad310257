"""Distil the rtpe student from cached teacher maps, with the shared training loop (common.engine).

    python rtpe/train.py                                   # `cpu` recipe: light student, built-in scenes
    python rtpe/train.py --recipe seed --data ~/coco --teacher-cache ~/coco/teacher_cache   # the seed's
    torchrun --nproc_per_node=2 rtpe/train.py --recipe seed ...                            # several GPUs

On the built-in data the teacher cache is built first if missing: from the newest built-in higher_hrnet
checkpoint when there is one, else from the oracle (ground truth rendered as teacher maps); the run says
which. Stages (the seed's protocol): --stage seg (segmentation/attention only), det (keypoints with the
attention trained, the default), stem (a light student's stem learns to reproduce the HRNet stem features).
Recipes: `seed` = SGD momentum 0.9, wd 3e-4, restarting cosine LR 0.025 -> 0.003 over 700 steps (x1.02 max
and x1.01 period per restart), batch 16, crop 448, `seed` preset; `cpu` = Adam 2e-3 with warm-up and cosine
decay, batch 8, crop 256, `light` preset, sized to finish on 2 CPU cores in under 30 minutes.
"""
from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.engine import add_common_args, setup_device_and_distributed, train, unwrap

from rtpe.infer import HEATMAP_POS_WEIGHT  # noqa: E402  (decoding undoes this weight's logit shift)

MODEL_NAME = "rtpe"

RECIPES = {
    "seed": dict(preset="seed", optimizer="sgd", lr=0.025, min_lr=0.003, period=700, max_lr_scale=1.02,
                 period_scale=1.01, momentum=0.9, weight_decay=3e-4, batch_size=16, crop_size=448,
                 max_steps=None, epochs=100),
    "cpu": dict(preset="light", optimizer="adam", lr=2e-3, min_lr=2e-5, warmup=100, weight_decay=0.0,
                batch_size=8, crop_size=256, max_steps=600, epochs=None),
}


# ------------------------------------------------------------------------------------------------------
# Learning rate: the seed's SGDR (a cosine restarted with a growing peak and period)
# ------------------------------------------------------------------------------------------------------

def restarting_cosine_lr(step, max_lr=0.025, min_lr=0.003, period=700, max_lr_scale=1.02, period_scale=1.01):
    """LR at `step`: cosine from max_lr to min_lr over `period` steps, then restart with max_lr and period
    multiplied by their scales (cycle lengths rounded to whole steps). 0.025 / 0.014 / 0.003 / 0.0255 /
    0.02601 at steps 0 / 350 / 699 / 700 / 1407 with the defaults."""
    cycle_start, length, peak = 0, period, max_lr
    while step >= cycle_start + round(length):
        cycle_start += round(length)
        length *= period_scale
        peak *= max_lr_scale
    t = (step - cycle_start) / length
    return min_lr + (peak - min_lr) * (1 + math.cos(math.pi * t)) / 2


class RestartingCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """restarting_cosine_lr as a per-step scheduler; its state is the step count (exact resume)."""

    def __init__(self, optimizer, max_lr=0.025, min_lr=0.003, period=700, max_lr_scale=1.02, period_scale=1.01,
                 last_epoch=-1):
        self.settings = dict(max_lr=max_lr, min_lr=min_lr, period=period, max_lr_scale=max_lr_scale,
                             period_scale=period_scale)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [restarting_cosine_lr(self.last_epoch, **self.settings) for _ in self.optimizer.param_groups]


def warmup_cosine(optimizer, lr, min_lr, warmup, total_steps):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return (min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t)) / 2) / lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------------
# Validation: COCO AP through the image -> keypoints path, and segmentation IoU of the attention
# ------------------------------------------------------------------------------------------------------

def read_image_list(path):
    """Image names, one per line (the seed's coco_minival2017_*.txt lists)."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def select_image_ids(coco, val_list=None, val_size=None):
    ids = sorted(coco.getImgIds())
    if val_list:
        wanted = set(read_image_list(val_list))
        ids = [i for i in ids if coco.loadImgs(i)[0]["file_name"] in wanted]
        if not ids:
            raise SystemExit(f"{val_list}: none of its image names are in the annotation file")
    return ids[:val_size] if val_size else ids


def person_mask(coco, image_id):
    info = coco.loadImgs(image_id)[0]
    mask = np.zeros((info["height"], info["width"]), np.uint8)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False)):
        if ann.get("segmentation"):
            mask |= coco.annToMask(ann)
    return mask


def evaluate_student(model, coco, image_dir, image_ids, input_size=256, print_table=False):
    """AP (pycocotools, COCO-17 sigmas) and segmentation IoU (attention > 0.5 vs the union of person masks,
    compared at the original resolution) on the given images."""
    import cv2

    from common.data import read_image
    from common.evaluation import coco_keypoint_ap
    from common.keypoints import COCO17
    from rtpe.infer import Predictor, people_to_results

    predictor = Predictor(copy.deepcopy(model).cpu(), input_size)
    results, intersection, union = [], 0, 0
    for image_id in image_ids:
        info = coco.loadImgs(image_id)[0]
        image = read_image(Path(image_dir) / info["file_name"])
        keypoints, scores, segmentation = predictor(image)
        results += people_to_results(keypoints, scores, image_id)
        # the attention map covers the letterboxed input at stride 4: crop the image part, resize
        scale = input_size / max(image.shape[:2])
        h4, w4 = math.ceil(image.shape[0] * scale / 4), math.ceil(image.shape[1] * scale / 4)
        predicted = cv2.resize(segmentation.numpy()[:h4, :w4], image.shape[1::-1]) > 0.5
        truth = person_mask(coco, image_id) > 0
        intersection += int((predicted & truth).sum())
        union += int((predicted | truth).sum())
    metrics = coco_keypoint_ap(coco, results, COCO17.sigmas, print_table=print_table, image_ids=image_ids)
    metrics["seg_IoU"] = intersection / union if union else 1.0
    return metrics, results


def oracle_ap(coco, image_ids, scale=1.0):
    """AP of the oracle teacher (ground truth rendered at stride 4 and grouped) on these images: the
    ceiling a stride-4 student can reach on them."""
    from common.evaluation import coco_keypoint_ap
    from common.keypoints import COCO17
    from higher_hrnet.grouping import GroupingParams
    from rtpe.infer import SEED_GROUPING, maps_to_people, people_to_results
    from rtpe.teacher_inference import people_keypoints, render_oracle

    results = []
    for image_id in image_ids:
        info = coco.loadImgs(image_id)[0]
        heatmaps, tags, affine = render_oracle(people_keypoints(coco, image_id), (info["width"], info["height"]),
                                               scale)
        to_image = np.linalg.inv(np.vstack([affine, [0, 0, 1]]))[:2]
        keypoints, scores = maps_to_people(heatmaps, tags, to_image, GroupingParams(num_joints=17, **SEED_GROUPING))
        results += people_to_results(keypoints, scores, image_id)
    return coco_keypoint_ap(coco, results, COCO17.sigmas, print_table=False, image_ids=image_ids)["AP"]


# ------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------

def build_optimizer(args, parameters):
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(parameters, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        scheduler = RestartingCosineLR(optimizer, args.lr, args.min_lr, args.period, args.max_lr_scale,
                                       args.period_scale)
    else:
        optimizer = torch.optim.Adam(parameters, lr=args.lr, weight_decay=args.weight_decay)
        total = args.max_steps or 10000
        scheduler = warmup_cosine(optimizer, args.lr, args.min_lr, args.warmup, total)
    return optimizer, scheduler


def trainable_parameters(model, stage):
    if stage == "seg":
        parts = [model.mid_stem, model.attention_high, model.attention_mid, model.attention_low,
                 model.attention_head] + ([] if model.frozen_stem else [model.stem])
    elif stage == "stem":
        parts = [model.stem, model.stem_adapter]
    else:
        parts = [m for name, m in model.named_children() if not (name == "stem" and model.frozen_stem)]
    params = [p for part in parts for p in part.parameters() if p.requires_grad]
    return params


def resolve_data(args):
    """(train image dir, train ann, val image dir, val ann, train cache, teacher description)."""
    from rtpe.teacher_inference import ensure_builtin_cache

    if args.data is None:
        from common.synthetic import ensure_dataset
        data = Path(ensure_dataset("multi_person", root=args.out))
        cache, teacher = (None, "none") if args.alpha == 0 else ensure_builtin_cache(args.teacher, args.out)
        return (data / "images" / "train", data / "annotations" / "person_keypoints_train.json",
                data / "images" / "val", data / "annotations" / "person_keypoints_val.json",
                cache / "train" if cache else None, teacher)
    data = Path(args.data)
    ann = Path(args.ann) if args.ann else data / "annotations" / f"person_keypoints_{args.train_split}.json"
    val_ann = data / "annotations" / f"person_keypoints_{args.val_split}.json"
    cache = Path(args.teacher_cache) / args.train_split if args.teacher_cache else None
    if cache is None and args.alpha > 0:
        print("no --teacher-cache: distilling from the ground truth only (alpha 0)")
        args.alpha = 0.0
    return (data / "images" / args.train_split, ann, data / "images" / args.val_split, val_ann, cache,
            "cached" if cache else "none")


def main(args):
    from common.data import load_coco_keypoints
    from rtpe.dataset import DistillationDataset, collate_people
    from rtpe.model import RealtimePoseStudent, load_teacher_stem

    for key, value in RECIPES[args.recipe].items():   # recipe values fill whatever was not given
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    setup_device_and_distributed(args)
    if args.threads:
        # on a small shared CPU one compute thread (plus the DataLoader workers) beats OpenMP's barriers
        torch.set_num_threads(args.threads)
    train_images, train_ann, val_images, val_ann, cache, teacher = resolve_data(args)
    print(f"teacher: {teacher}; stage {args.stage}; recipe {args.recipe} ({args.preset} student, {args.colour})")

    model = RealtimePoseStudent(args.preset, args.colour)
    teacher_stem = None
    teacher_weights = args.teacher_weights or (None if args.teacher in ("auto", "oracle") else args.teacher)
    if args.preset == "seed" and teacher_weights:
        from higher_hrnet.checkpoints import read_state_dict
        load_teacher_stem(model, read_state_dict(teacher_weights), teacher_weights)
    if args.stage == "stem":
        if args.preset != "light" or not teacher_weights:
            raise SystemExit("--stage stem trains a light student's stem against a HigherHRNet stem: "
                             "give --preset light and --teacher-weights PATH")
        from higher_hrnet.checkpoints import read_state_dict
        reference = RealtimePoseStudent("seed", "none")
        load_teacher_stem(reference, read_state_dict(teacher_weights), teacher_weights)
        teacher_stem = reference.stem.eval().to(args.device)
        model.stem_adapter = nn.Conv2d(model.stem.out_channels, teacher_stem.out_channels, 1)

    train_set = DistillationDataset(train_images, train_ann, cache, crop_size=args.crop_size, augment=True)
    val_coco = load_coco_keypoints(val_ann)
    val_ids = select_image_ids(val_coco, args.val_list, args.val_size)

    def evaluate(student):
        if args.stage == "stem":
            return {}
        metrics, _ = evaluate_student(student, val_coco, val_images, val_ids, args.input_size)
        return {"AP": metrics["AP"], "AP50": metrics["AP50"], "seg_IoU": metrics["seg_IoU"]}

    objective = DistillationObjective(args.stage, args.alpha, args.ae_weight, args.background_factor,
                                      args.hard_keypoints, teacher_stem)

    def log_images(student, batch):
        from rtpe.dataset import sample_picture
        segmentation, keypoints = student(batch["image"][:1])
        sample = {k: v[0].cpu() for k, v in batch.items() if torch.is_tensor(v) and v.dim() > 1}
        pictures = {"inputs_ignore_gt_teacher_segmentation": sample_picture(sample)}
        maps = [torch.sigmoid(segmentation[0, 0]), torch.sigmoid(keypoints[0, :student.num_joints]).amax(0)]
        if objective.last_mining_weight is not None:
            maps.append(objective.last_mining_weight[0].amax(0).clamp(0, 1))
        grey = torch.cat([m.cpu() for m in maps], dim=1)
        pictures["attention_detection_mining"] = (grey[..., None].repeat(1, 1, 3).numpy() * 255).astype(np.uint8)
        return pictures

    optimizer, scheduler = build_optimizer(args, trainable_parameters(model, args.stage))
    _, summary = train(args, model, train_set, objective, optimizer, scheduler=scheduler,
                       scheduler_interval="step", evaluate=evaluate,
                       best_metric="AP" if args.stage != "stem" else None, collate_fn=collate_people,
                       log_images=log_images, model_name=MODEL_NAME)
    metrics = summary["metrics"]
    if metrics:
        print("final validation: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print(f"checkpoints in {summary['last_checkpoint'].parent}; TensorBoard logs in {summary['tensorboard']}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, epochs=None, batch_size=None, lr=None, max_steps=None, val_every="200", workers=2,
                    log_every=20)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads for the training process; 0 = torch's default (default: %(default)s)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="cpu",
                   help="defaults for everything below not given explicitly (default: %(default)s)")
    p.add_argument("--preset", choices=("seed", "light"), default=None, help="student preset (recipe's)")
    p.add_argument("--colour", choices=("lab", "hsv", "none"), default="lab", help="colour branch (default: lab)")
    p.add_argument("--stage", choices=("seg", "det", "stem"), default="det", help="what to train (default: det)")
    p.add_argument("--teacher", default="auto",
                   help="built-in data only: auto (newest higher_hrnet checkpoint, else oracle), oracle, or a "
                        "higher_hrnet weights path (default: %(default)s)")
    p.add_argument("--teacher-weights", default=None,
                   help="HigherHRNet weights for the seed preset's frozen stem / the stem stage")
    p.add_argument("--teacher-cache", default=None, help="cache root with <split>/ folders (own data)")
    p.add_argument("--train-split", default="train2017", help="split name under --data (default: %(default)s)")
    p.add_argument("--val-split", default="val2017", help="validation split under --data (default: %(default)s)")
    p.add_argument("--val-list", default=None, help="file of image names to validate on "
                                                    "(e.g. ../shared/reference/coco_minival2017_100.txt)")
    p.add_argument("--val-size", type=int, default=100, help="validate on the first N images (default: %(default)s)")
    p.add_argument("--input-size", type=int, default=256, help="validation input, longer side (default: %(default)s)")
    p.add_argument("--crop-size", type=int, default=None, help="training crop side (recipe's)")
    p.add_argument("--alpha", type=float, default=0.8, help="teacher share of the heatmap loss (default: %(default)s)")
    p.add_argument("--ae-weight", type=float, default=1.0, help="pull+push factor (default: %(default)s)")
    p.add_argument("--background-factor", type=float, default=1.0,
                   help="loss weight of pixels where the ground truth is 0 (default: %(default)s)")
    p.add_argument("--hard-keypoints", type=int, default=0,
                   help="online hard keypoint mining: keep the top-k joints by loss; 0 = off (default)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=None, help="(recipe's)")
    p.add_argument("--min-lr", type=float, default=None, help="(recipe's)")
    p.add_argument("--period", type=int, default=None, help="SGDR period in steps (recipe's)")
    p.add_argument("--max-lr-scale", type=float, default=None, help="SGDR peak factor per restart (recipe's)")
    p.add_argument("--period-scale", type=float, default=None, help="SGDR period factor per restart (recipe's)")
    p.add_argument("--momentum", type=float, default=None, help="(recipe's)")
    p.add_argument("--weight-decay", type=float, default=None, help="(recipe's)")
    p.add_argument("--warmup", type=int, default=None, help="Adam warm-up steps (recipe's)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
