"""Train Simple Baselines (Xiao et al. 2018): ResNet + 3 deconvolutions, one heatmap per joint, MSE loss.

    python simple_baseline/train.py                       # 'cpu' preset on the built-in LIP-style data
    python simple_baseline/train.py --preset paper --data LIP/train_images --ann LIP/train.csv \\
        --val-data LIP/val_images --val-ann LIP/val.csv   # paper recipe (needs --pretrained imagenet weights)
    torchrun --nproc_per_node=4 simple_baseline/train.py --preset paper ...   # --batch-size is per process

Presets (PRESETS below, plain dicts of defaults; every flag overrides them):
  cpu   - sized for 2 CPU cores and about 15 minutes on the built-in data (see PRESETS and the README).
  paper - the paper's recipe: ResNet-50, 256x256, Adam 1e-3, no weight decay, batch 32, LR x0.1 at
          epochs 90 and 120 of 140, ImageNet-initialised backbone.
The seed's head is `--deconv-filters 512 512 512 --sigmoid-output`; its `--weights-path` is `--init-from`.
"""
import argparse
import time

import numpy as np
import torch

from common.data import exit_on_bad_input
from common.drawing import BLUE, RED, draw_keypoints, make_grid
from common.engine import fit, planned_steps
from common.heatmaps import decode_heatmaps
from common.keypoints import COCO17
from common.runs import (add_common_args, at_least, local_main_first, parse_with_preset, run_dirs,
                         setup_device_and_distributed)
from simple_baseline.dataset import PAPER_SIGMA, TopDownDataset, denormalize, load_split, target_codec
from simple_baseline.eval import evaluate_split, mean_pose_in_crop
from simple_baseline.model import LIP16, MODEL_NAME, build_model, load_pretrained_backbone

PRESETS = {
    # CPU: resnet18 as in the seed on 96x128 (W x H) crops, COCO's 3:4 aspect (at 64 px wrists and elbows
    # are a pixel or two wide; 96x128 costs 3/4 of 128x128 and scored higher in the same time), three narrow
    # deconvolutions (24x32 heatmaps), batch 16, a one-cycle schedule at 2e-3 and milder augmentation for a
    # short run. Target sigma 1.5 instead of the paper's 2, which was chosen for 64x48 heatmaps: on 24x32 maps
    # the sharper target scored 1.7 points higher at equal steps.
    # Validation only at the end: each one costs about 7 s of the 15 minutes (--val-every 3e for a curve).
    # README "Results" has the sweep behind these choices.
    "cpu": dict(backbone="resnet18", deconv_filters=[64, 64, 64], input_size=[96, 128], sigma=1.5, epochs=9,
                batch_size=16, schedule="onecycle", lr=2e-3, milestones=[], workers=1, val_every="0",
                pretrained="none", scale_factor=0.15, rotation_factor=15.0),
    "paper": dict(backbone="resnet50", deconv_filters=[256, 256, 256], input_size=[256, 256], epochs=140,
                  schedule="step", milestones=[90, 120], batch_size=32, lr=1e-3, workers=4, val_every="1e",
                  pretrained="imagenet"),
}
# Augmentation as in the official configs: MPII/LIP scale 0.25, rotation 30; COCO 0.35 and 45.
AUGMENTATION = {"lip": (0.25, 30.0), "mpii": (0.25, 30.0), "coco": (0.35, 45.0)}


def compute_loss(model, batch):
    """MSE between predicted and target heatmaps, each joint weighted by its target weight (0 for
    missing joints). The 0.5 factor is the official JointsMSELoss's."""
    heatmaps = model(batch["image"])
    weight = batch["target_weight"][:, :, None, None]
    loss = 0.5 * ((heatmaps - batch["target"]) * weight).pow(2).mean()
    return loss, {}


def draw_batch_predictions(model, batch, flip_index, layout, count=4):
    """Predictions (red) and targets' peaks (blue) on the first crops of a batch, for TensorBoard."""
    images = batch["image"][:count]
    heatmaps = model(images)
    stride = images.shape[-1] / heatmaps.shape[-1]
    pred, scores = decode_heatmaps(heatmaps.float())
    target, _ = decode_heatmaps(batch["target"][:count].float())
    tiles = []
    for i in range(len(images)):
        tile = denormalize(images[i])
        gt = np.concatenate([target[i].cpu().numpy() * stride,
                             batch["target_weight"][i, :, None].cpu().numpy()], 1)
        tile = draw_keypoints(tile, gt, layout.skeleton, color=BLUE, threshold=0.5, scores=False)
        keypoints = np.concatenate([pred[i].cpu().numpy() * stride, scores[i, :, None].cpu().numpy()], 1)
        tiles.append(draw_keypoints(tile, keypoints, layout.skeleton, color=RED, threshold=0.2, scores=False))
    return {"predictions": make_grid(tiles, ncols=count)}


def load_data(args, dirs, is_main):
    """(train split, val split, train set, val set, layout); the built-in set is rendered by each machine's local
    rank 0 before the machine's other ranks read it."""
    builtin = args.data is None and args.ann is None
    args.builtin_sizes = {"num_images": args.builtin_train, "num_val": args.builtin_val} if builtin else None
    with local_main_first(args):
        train_split = load_split(args.format, args.data, args.ann, "train", dirs["root"], args.head_boxes,
                                 builtin_sizes=args.builtin_sizes, quiet=not is_main)
        val_split = load_split(args.format, args.val_data if not builtin else None,
                               args.val_ann if not builtin else None, "val", dirs["root"], args.head_boxes,
                               builtin_sizes=args.builtin_sizes, quiet=not is_main)
    layout = COCO17 if args.format == "coco" else LIP16
    scale_factor, rotation_factor = AUGMENTATION[args.format]
    scale_factor = args.scale_factor if args.scale_factor is not None else scale_factor
    rotation_factor = args.rotation_factor if args.rotation_factor is not None else rotation_factor
    codec = target_codec(args.input_size, 32 // 2 ** len(args.deconv_filters), args.sigma)
    train_set = TopDownDataset(train_split["records"], layout.flip_index, codec, train=True,
                               scale_factor=scale_factor, rotation_factor=rotation_factor)
    val_set = TopDownDataset(val_split["records"], layout.flip_index, codec)
    val_set.official_head_boxes = val_split.get("official_head_boxes", False)
    return train_split, val_split, train_set, val_set, layout


def build_optimizer(args, model, num_samples):
    """Adam without weight decay; 'step' multiplies the LR by --lr-factor at the milestone epochs (the
    paper), 'onecycle' warms up then anneals over the run (stepped per batch). Returns (optimizer,
    scheduler, interval)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=0.0)
    if args.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, pct_start=args.warmup,
                                                        total_steps=planned_steps(args, num_samples))
        return optimizer, scheduler, "step"
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.milestones, gamma=args.lr_factor)
    return optimizer, scheduler, "epoch"


def main(args):
    start = time.time()
    if any(side % 32 for side in args.input_size):
        raise SystemExit(f"--input-size {args.input_size[0]} {args.input_size[1]}: both sides must be multiples "
                         f"of 32 (the ResNet's stride), e.g. 256 192")
    if not 0.0 <= args.warmup <= 1.0:
        raise SystemExit(f"--warmup {args.warmup}: the warm-up is a fraction of the run, between 0 and 1")
    setup_device_and_distributed(args)
    is_main = args.rank == 0
    dirs = run_dirs(args, MODEL_NAME)
    train_split, val_split, train_set, val_set, layout = load_data(args, dirs, is_main)

    # Under torchrun only rank 0 fetches ImageNet weights; DDP copies rank 0's weights to the others.
    model = build_model(backbone=args.backbone, num_joints=layout.num_keypoints, deconv_filters=args.deconv_filters,
                        deconv_kernel=4, sigmoid_output=args.sigmoid_output)
    load_pretrained_backbone(model, args.pretrained if is_main or args.pretrained != "imagenet" else "none")
    arch = model.arch
    model = model.to(memory_format=torch.channels_last)  # ~10% faster convolutions on CPU, and on GPU with AMP
    optimizer, scheduler, scheduler_interval = build_optimizer(args, model, len(train_set))

    mean_pose = mean_pose_in_crop(train_split["records"], val_set)
    metrics_path = dirs["outputs"] / "metrics.json"

    def evaluate(plain_model):
        # The engine puts the model back in train mode afterwards (the seed left BN frozen after
        # its first validation; tests/test_simple_baseline.py guards against that).
        metrics, _ = evaluate_split(plain_model, val_set, val_split["records"], args.format, mean_pose,
                                    val_split.get("coco"), args.batch_size, 0, not args.no_flip_test,
                                    not args.no_flip_shift, json_path=metrics_path)
        return metrics

    def log_images(plain_model, batch):
        return draw_batch_predictions(plain_model, batch, layout.flip_index, layout)

    metric = "AP" if args.format == "coco" else "PCKh@0.5"
    settings = {"codec": train_set.codec.as_dict(), "format": args.format, "layout": layout.as_dict()}
    model, summary = fit(args, model, train_set, compute_loss, optimizer,
                         model_name=MODEL_NAME, arch=arch, settings=settings, scheduler=scheduler,
                         scheduler_interval=scheduler_interval, evaluate=evaluate, best_metric=metric,
                         log_images=log_images)
    if is_main:
        final = summary["metrics"]
        if metric in final:
            baseline = final.get(f"baseline_{metric}", float("nan"))
            print(f"final {metric} {100 * final[metric]:.2f} (mean-pose baseline {100 * baseline:.2f}) "
                  f"after {summary['steps']} steps, {time.time() - start:.0f} s in all")
        print(f"outputs: checkpoints in {dirs['checkpoints']}, metrics in {metrics_path}, "
              f"TensorBoard logs in {dirs['tensorboard']}")
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=("lip", "mpii", "coco"), default="lip",
                        help="annotation format of --ann / --val-ann; built-in data: lip or coco (default: %(default)s)")
    parser.add_argument("--val-data", default=None, help="validation image folder")
    parser.add_argument("--val-ann", default=None, help="validation annotation file")
    parser.add_argument("--head-boxes", default=None, help="MPII gt_valid.mat: official PCKh head sizes for validation")
    parser.add_argument("--backbone", choices=("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"),
                        help="torchvision ResNet without avgpool/fc (default: %(default)s)")
    parser.add_argument("--deconv-filters", type=at_least(1), nargs="+",
                        help="channels of each stride-2 deconvolution (default: %(default)s)")
    parser.add_argument("--sigmoid-output", action="store_true", help="squash heatmaps with a sigmoid (the seed)")
    parser.add_argument("--input-size", type=at_least(1), nargs=2, metavar=("W", "H"),
                        help="network input size (default: %(default)s)")
    parser.add_argument("--sigma", type=at_least(0.0, above=True), default=PAPER_SIGMA,
                        help="Gaussian target sigma in heatmap pixels (default: %(default)s; the paper uses 2)")
    parser.add_argument("--schedule", choices=("step", "onecycle"), default="step",
                        help="step: x --lr-factor at --milestones (paper); onecycle: warm-up, then anneal to ~0 "
                             "(default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=0.15, help="onecycle: fraction of the run spent warming up")
    parser.add_argument("--milestones", type=int, nargs="*",
                        help="epochs after which the LR is multiplied by --lr-factor (default: %(default)s)")
    parser.add_argument("--lr-factor", type=at_least(0.0, above=True), default=0.1,
                        help="LR decay factor (default: %(default)s)")
    parser.add_argument("--scale-factor", type=at_least(0.0), default=None,
                        help="scale augmentation (default: by format)")
    parser.add_argument("--rotation-factor", type=at_least(0.0), default=None, help="rotation augmentation in degrees")
    parser.add_argument("--no-flip-test", action="store_true", help="validate without the flip test")
    parser.add_argument("--no-flip-shift", action="store_true", help="flip test without the one-pixel shift")
    parser.add_argument("--builtin-train", type=at_least(1), default=3000, help="built-in data: training images")
    parser.add_argument("--builtin-val", type=at_least(1), default=300, help="built-in data: validation images")
    add_common_args(parser)
    return parse_with_preset(parser, PRESETS, argv, default="cpu")


if __name__ == "__main__":
    exit_on_bad_input(main, parse_args())
