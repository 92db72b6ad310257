"""Distil the rtpe student from cached teacher maps.

    python rtpe/train.py                                   # `cpu` preset: light student, built-in scenes
    python rtpe/train.py --preset seed --data ~/coco --teacher-cache ~/coco/teacher_cache   # the seed's
    torchrun --nproc_per_node=2 rtpe/train.py --preset seed ...                            # several GPUs

On the built-in data the teacher cache is built first if missing: from the newest built-in higher_hrnet
checkpoint when there is one, else from the oracle (ground truth rendered as teacher maps); the run says
which. Stages (the seed's protocol): --stage seg (segmentation/attention only), det (keypoints with the
attention trained, the default), stem (a light student's stem learns to reproduce the HRNet stem features).
Presets (PRESETS below; every flag overrides them): `seed` = SGD momentum 0.9, wd 3e-4, restarting cosine
LR 0.025 -> 0.003 over 700 steps (x1.02 max and x1.01 period per restart), batch 16, crop 448, `seed` size;
`cpu` = Adam 2e-3 with warm-up and cosine decay, batch 8, crop 256, `light` size, sized to finish on 2 CPU
cores in under 30 minutes.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from common.data import exit_on_bad_input, load_coco_keypoints, sha256_of
from common.engine import fit
from common.runs import add_common_args, at_least, local_main_first, parse_with_preset, setup_device_and_distributed
from higher_hrnet.checkpoints import read_state_dict
from higher_hrnet.scenes import ensure_scenes
from rtpe.dataset import DistillationDataset, collate_people, sample_picture
from rtpe.eval import evaluate_student, select_image_ids
from rtpe.infer import decoding_settings
from rtpe.loss import DistillationObjective
from rtpe.model import MODEL_NAME, RealtimePoseStudent, build_model, load_teacher_stem
from rtpe.teacher_inference import ensure_builtin_cache

PRESETS = {
    "seed": dict(size="seed", optimizer="sgd", lr=0.025, min_lr=0.003, period=700, max_lr_scale=1.02,
                 period_scale=1.01, momentum=0.9, weight_decay=3e-4, batch_size=16, crop_size=448,
                 max_steps=None, epochs=100),
    "cpu": dict(size="light", optimizer="adam", lr=2e-3, min_lr=2e-5, warmup=100, weight_decay=0.0,
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
    if args.data is None:
        with local_main_first(args):      # each machine's local rank 0 renders the scenes and teacher maps first
            data = Path(ensure_scenes(args.out))
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


def build(args):
    """(student, frozen teacher stem or None): the seed size takes the teacher's stem weights; the stem
    stage adds a 1x1 adapter to compare a light stem with the HRNet stem."""
    model = build_model(args.size, args.color)
    teacher_stem = None
    teacher_weights = args.teacher_weights or (None if args.teacher in ("auto", "oracle") else args.teacher)
    if args.size == "seed" and teacher_weights:
        load_teacher_stem(model, read_state_dict(teacher_weights), teacher_weights)
    if args.stage == "stem":
        if args.size != "light" or not teacher_weights:
            raise SystemExit("--stage stem trains a light student's stem against a HigherHRNet stem: "
                             "give --size light and --teacher-weights PATH")
        reference = RealtimePoseStudent("seed", "none")
        load_teacher_stem(reference, read_state_dict(teacher_weights), teacher_weights)
        teacher_stem = reference.stem.eval().to(args.device)
        model.add_stem_adapter(teacher_stem.out_channels)
    return model, teacher_stem


def image_logger(objective):
    """TensorBoard pictures: the seed's dataloader picture, and attention | detection | mining weight."""
    def log_images(student, batch):
        segmentation, keypoints = student(batch["image"][:1])
        sample = {k: v[0].cpu() for k, v in batch.items() if torch.is_tensor(v) and v.dim() > 1}
        pictures = {"inputs_ignore_gt_teacher_segmentation": sample_picture(sample)}
        maps = [torch.sigmoid(segmentation[0, 0]), torch.sigmoid(keypoints[0, :student.num_joints]).amax(0)]
        if objective.last_mining_weight is not None:
            maps.append(objective.last_mining_weight[0].amax(0).clamp(0, 1))
        gray = torch.cat([m.cpu() for m in maps], dim=1)
        pictures["attention_detection_mining"] = (gray[..., None].repeat(1, 1, 3).numpy() * 255).astype(np.uint8)
        return pictures
    return log_images


def main(args):
    setup_device_and_distributed(args)
    if args.threads:
        # on a small shared CPU one compute thread (plus the DataLoader workers) beats OpenMP's barriers
        torch.set_num_threads(args.threads)
    train_images, train_ann, val_images, val_ann, cache, teacher = resolve_data(args)
    print(f"teacher: {teacher}; stage {args.stage}; preset {args.preset} ({args.size} student, {args.color})")
    model, teacher_stem = build(args)
    train_set = DistillationDataset(train_images, train_ann, cache, crop_size=args.crop_size, augment=True)
    val_coco = load_coco_keypoints(val_ann)
    val_ids = select_image_ids(val_coco, args.val_list, args.val_size)
    # eval.py and infer.py decode with these (and rebuild the model from its arch)
    settings = {**decoding_settings(args.input_size), "codec": train_set.codec.as_dict(),
                "train_ann_sha256": sha256_of(train_ann)}     # eval warns when given the training file

    def evaluate(student):
        if args.stage == "stem":
            return {}
        metrics, _ = evaluate_student(student, settings, val_coco, val_images, val_ids, args.input_size)
        return {"AP": metrics["AP"], "AP50": metrics["AP50"], "seg_IoU": metrics["seg_IoU"]}

    objective = DistillationObjective(args.stage, args.alpha, args.ae_weight, args.background_factor,
                                      args.hard_keypoints, teacher_stem)
    optimizer, scheduler = build_optimizer(args, trainable_parameters(model, args.stage))
    _, summary = fit(args, model, train_set, objective, optimizer, model_name=MODEL_NAME, arch=model.arch,
                     settings=settings, scheduler=scheduler, scheduler_interval="step", evaluate=evaluate,
                     best_metric="AP" if args.stage != "stem" else None, collate_fn=collate_people,
                     log_images=image_logger(objective))
    metrics = summary["metrics"]
    if metrics:
        print("final validation: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print(f"checkpoints in {summary['last_checkpoint'].parent}; TensorBoard logs in {summary['tensorboard']}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, val_every="200", workers=2, log_every=20)
    p.add_argument("--threads", type=at_least(1), default=1,
                   help="torch CPU threads for the training process; 0 = torch's default (default: %(default)s)")
    p.add_argument("--size", choices=("seed", "light"), help="student size (default: %(default)s)")
    p.add_argument("--color", choices=("lab", "hsv", "none"), default="lab", help="color branch (default: lab)")
    p.add_argument("--stage", choices=("seg", "det", "stem"), default="det", help="what to train (default: det)")
    p.add_argument("--teacher", default="auto",
                   help="built-in data only: auto (newest higher_hrnet checkpoint, else oracle), oracle, or a "
                        "higher_hrnet weights path (default: %(default)s)")
    p.add_argument("--teacher-weights", default=None,
                   help="HigherHRNet weights for the seed size's frozen stem / the stem stage")
    p.add_argument("--teacher-cache", default=None, help="cache root with <split>/ folders (own data)")
    p.add_argument("--train-split", default="train2017", help="split name under --data (default: %(default)s)")
    p.add_argument("--val-split", default="val2017", help="validation split under --data (default: %(default)s)")
    p.add_argument("--val-list", default=None, help="file of image names to validate on "
                                                    "(e.g. ../shared/reference/coco_minival2017_100.txt)")
    p.add_argument("--val-size", type=at_least(1), default=100,
                   help="validate on the first N images (default: %(default)s)")
    p.add_argument("--input-size", type=at_least(1), default=256,
                   help="validation input, longer side (default: %(default)s)")
    p.add_argument("--crop-size", type=at_least(1), help="training crop side (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.8, help="teacher share of the heatmap loss (default: %(default)s)")
    p.add_argument("--ae-weight", type=at_least(0.0), default=1.0, help="pull+push factor (default: %(default)s)")
    p.add_argument("--background-factor", type=at_least(0.0), default=1.0,
                   help="loss weight of pixels where the ground truth is 0 (default: %(default)s)")
    p.add_argument("--hard-keypoints", type=at_least(0), default=0,
                   help="online hard keypoint mining: keep the top-k joints by loss; 0 = off (default)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), help="(default: %(default)s)")
    p.add_argument("--min-lr", type=at_least(0.0), help="(default: %(default)s)")
    p.add_argument("--period", type=at_least(1), help="SGDR period in steps (default: %(default)s)")
    p.add_argument("--max-lr-scale", type=float, help="SGDR peak factor per restart (default: %(default)s)")
    p.add_argument("--period-scale", type=float, help="SGDR period factor per restart (default: %(default)s)")
    p.add_argument("--momentum", type=at_least(0.0), help="(default: %(default)s)")
    p.add_argument("--weight-decay", type=at_least(0.0), help="(default: %(default)s)")
    p.add_argument("--warmup", type=at_least(0), help="Adam warm-up steps (default: %(default)s)")
    return parse_with_preset(p, PRESETS, argv, default="cpu")


if __name__ == "__main__":
    exit_on_bad_input(main, parse_args())
