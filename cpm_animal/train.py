"""Train Convolutional Pose Machines on animal keypoints.

    python cpm_animal/train.py                                  # the cpu preset (cpu.yaml), built-in quadrupeds
    python cpm_animal/train.py --preset seed                    # the seed's recipe (seed.yaml) on the real cats
    python cpm_animal/train.py model.drop_rate=0.1 optimizer.name=sgd trainer.max_epochs=20
    torchrun --nproc_per_node=2 cpm_animal/train.py trainer.device=cuda   # several GPUs (or CPU processes)
Presets are YAML files (cpm_animal/presets.py); `group.key=value` overrides change single values, and the
shared flags (--epochs, --lr, ...) override the preset's values for them (--help shows the active ones).
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch

from common.data import exit_on_bad_input
from common.drawing import GREEN, RED, draw_keypoints, make_grid
from common.engine import fit, planned_steps
from common.runs import add_common_args, data_dir, local_main_first, output_dirs, setup_device_and_distributed
from cpm_animal.dataset import SEED_ANN_NAME, build_datasets, denormalize, signed_heatmap_overlay
from cpm_animal.eval import compute_metrics, full_report, ground_truth, mean_shape, predict
from cpm_animal.infer import decode_predictions
from cpm_animal.model import MODEL_NAME, CPM, config_from_dict, target_codec
from cpm_animal.presets import dump_preset, load_preset

OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")   # group.key=value on the command line
# The shared flags whose defaults a preset sets: flag -> (group, key) in the YAML ("" = top level).
PRESET_FLAGS = {"epochs": ("trainer", "max_epochs"), "max_steps": ("trainer", "max_steps"),
                "batch_size": ("dataset", "batch_size"), "lr": ("optimizer", "lr"), "seed": ("", "seed"),
                "workers": ("dataset", "num_workers"), "accumulate": ("trainer", "accumulate_grad_batches"),
                "clip_grad": ("trainer", "clip_grad"), "log_every": ("trainer", "log_every"),
                "keep_best": ("callbacks", "save_top_k"), "init_from": ("", "checkpoint_path")}


def cpm_loss(model, batch, stage_weights=None, num_keypoints=None):
    """Per-stage MSE against the targets, masked by target weights, averaged over stages.

    The seed summed over the batch, so its loss (and effective LR) grew with the batch size.
    With a background channel its target is 1 - max |keypoint target| (weight 1).
    """
    stages = model(batch["image"])
    target, weight = batch["heatmap"], batch["target_weight"][:, :, None, None]
    keypoints = num_keypoints or target.shape[1]
    per_stage = ((stages[:, :, :keypoints] - target) ** 2 * weight).mean(dim=(1, 2, 3, 4))
    if stages.shape[2] > keypoints:
        background = (1 - target.abs().amax(1, keepdim=True)).clamp(0, 1)
        per_stage = per_stage + ((stages[:, :, keypoints:] - background) ** 2).mean(dim=(1, 2, 3, 4))
    weights = torch.ones_like(per_stage) if stage_weights is None else torch.as_tensor(
        stage_weights, dtype=per_stage.dtype, device=per_stage.device)
    loss = (per_stage * weights).sum() / weights.sum()
    return loss, {f"stage{i + 1}": float(v) for i, v in enumerate(per_stage.detach())}


def build_optimizer(preset, params, lr):
    opt = preset["optimizer"]
    name = opt["name"]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=opt["weight_decay"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=opt["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=opt["momentum"], weight_decay=opt["weight_decay"])
    raise SystemExit(f"error: optimizer.name must be adam, adamw or sgd, got {name!r}")


def build_scheduler(preset, optimizer, total_steps):
    """(scheduler, interval) from the `scheduler` group."""
    sched = preset["scheduler"]
    name = sched["name"]
    if name == "none":
        return None, "epoch"
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(total_steps, 1),
            pct_start=sched["pct_start"]), "step"
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1)), "step"
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, sched["step_size"], sched["gamma"]), "epoch"
    raise SystemExit(f"error: scheduler.name must be onecycle, cosine, step or none, got {name!r}")


def preset_group(preset, group):
    return preset[group] if group else preset


def parse_args(argv=None):
    """(args, preset). The YAML preset (with its group.key=value overrides) sets the shared flags' defaults
    before the real parse, so --help shows them; the values flags end with are written back into it."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default="cpu")
    known, rest = first.parse_known_args(argv)
    preset = load_preset(known.preset, [a for a in rest if OVERRIDE.match(a)])
    trainer = preset["trainer"]
    defaults = {dest: preset_group(preset, group)[key] for dest, (group, key) in PRESET_FLAGS.items()}
    defaults["val_every"] = f"{trainer['val_every']}e"
    defaults["device"] = trainer["device"] if trainer["device"] != "auto" else None
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, **defaults)
    parser.add_argument("--preset", default="cpu", help="cpu or seed (cpm_animal/<name>.yaml), or a YAML file "
                                                        "(default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="preset overrides group.key=value, e.g. model.drop_rate=0.1")
    args = parser.parse_args(argv)
    for dest, (group, key) in PRESET_FLAGS.items():
        preset_group(preset, group)[key] = getattr(args, dest)
    args.clip_grad = args.clip_grad or 0.0
    apply_data_flags(args, preset["dataset"])
    return args, preset


def apply_data_flags(args, ds):
    """--data / --ann point the preset at a folder in the seed's layout or a COCO file; --pretrained PATH is
    --init-from (CPM has no ImageNet backbone)."""
    if args.data:  # a folder in the seed's layout, or a COCO image folder with --ann
        ds["data_dir"] = args.data
        if ds["kind"] == "builtin":
            ds["kind"] = "coco" if args.ann else "seed_json"
    if args.ann:
        ds["ann_file"] = args.ann
        if ds["kind"] == "builtin":
            ds["kind"] = "seed_json" if Path(args.ann).name == SEED_ANN_NAME else "coco"
    if args.pretrained not in (None, "none"):
        if args.pretrained == "imagenet":
            raise SystemExit("--pretrained imagenet: CPM has no ImageNet backbone; use --pretrained none, "
                             "or a checkpoint path (weights only)")
        args.init_from = args.pretrained


def make_image_logger(layout, model_config, count=4):
    """TensorBoard pictures: predicted (red) and true (green) skeletons, and one sample's heatmaps."""
    def log_images(model, batch):
        stages = model(batch["image"][:count])
        final = stages[-1, :, :model_config.num_keypoints]
        coords, _, visible = decode_predictions(final, model_config, torch.eye(3)[None, :2].expand(len(final), 2, 3)
                                                .to(final.device))
        pictures = []
        for i in range(len(final)):
            image = denormalize(batch["image"][i])
            truth = batch["keypoints"][i].cpu().numpy()
            image = draw_keypoints(image, truth[:, :3] if truth.shape[1] == 3 else truth, layout.skeleton,
                                   color=GREEN, scores=False)
            pred = np.concatenate([coords[i].cpu().numpy(), np.ones((len(coords[i]), 1))], 1)
            pictures.append(draw_keypoints(image, pred, layout.skeleton, color=RED, scores=False))
        maps = final[0].cpu().numpy()
        image = denormalize(batch["image"][0])
        per_keypoint = [signed_heatmap_overlay(image, maps[k:k + 1]) for k in range(len(maps))]
        return {"skeletons_pred_red_true_green": make_grid(pictures, ncols=count),
                "heatmaps_per_keypoint": make_grid(per_keypoint, ncols=8)}
    return log_images


def main(argv=None):
    start = time.time()
    args, preset = parse_args(argv)
    if preset["trainer"].get("num_threads"):
        torch.set_num_threads(int(preset["trainer"]["num_threads"]))
    device = setup_device_and_distributed(args)
    is_main = args.rank == 0
    preset["model"]["num_keypoints"] = preset["dataset"]["n_keypoints"]
    model_config = config_from_dict(preset["model"])
    with local_main_first(args):      # each machine's local rank 0 renders / caches the data first
        train_set, val_set, layout = build_datasets(preset, model_config, data_dir(args.out) / MODEL_NAME,
                                                    quiet=not is_main)
    model = CPM(model_config)
    shape_xy = mean_shape(train_set)
    if is_main:
        print(f"data: {preset['dataset']['kind']}, {len(train_set)} train / {len(val_set)} val animals, "
              f"layout {layout.name}; model: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"input {list(model_config.input_size)}, {model_config.stages} stages")
    summary = train(args, preset, model, train_set, val_set, layout, shape_xy, device)
    if not is_main:
        return
    out_dir = output_dirs(MODEL_NAME, summary["run_name"], args.out)["outputs"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "preset.yaml").write_text(dump_preset(preset))
    print(f"\nfinal model (step {summary['steps']}) on the validation split:")
    full_report(model, val_set, layout, device, args.batch_size, args.workers,
                tuple(preset["metric"]["pck_thresholds"]), shape_xy)
    print(f"total time {time.time() - start:.0f} s")
    print(f"outputs: checkpoints in {summary['last_checkpoint'].parent}, TensorBoard logs in "
          f"{summary['tensorboard']}, preset in {out_dir}")


def train(args, preset, model, train_set, val_set, layout, shape_xy, device):
    """Optimizer, schedule, loss and validation from the preset, then the shared loop; returns its summary."""
    optimizer = build_optimizer(preset, model.parameters(), args.lr)
    scheduler, interval = build_scheduler(preset, optimizer, planned_steps(args, len(train_set)))
    thresholds = tuple(preset["metric"]["pck_thresholds"])
    stage_weights = preset["loss"]["stage_weights"]
    if preset["loss"]["name"] != "mse":
        raise SystemExit(f"error: loss.name must be mse, got {preset['loss']['name']!r}")

    def compute_loss(net, batch):
        return cpm_loss(net, batch, stage_weights, model.config.num_keypoints)

    def evaluate(net):
        predictions = predict(net, val_set, device, args.batch_size, args.workers, compute_loss)
        gt, norm = ground_truth(val_set, predictions["index"].astype(int))
        metrics, _ = compute_metrics(predictions["pred"], predictions["visible_pred"], gt, norm, thresholds)
        if "val_loss" in predictions:
            metrics["loss/val"] = predictions["val_loss"]
        return metrics

    # eval.py and infer.py rebuild the model from arch and the data and decoding from these settings
    settings = {"codec": target_codec(model.config, preset["dataset"]["sigma"]).as_dict(), "preset": preset,
                "layout": layout.as_dict(), "mean_shape": shape_xy.tolist()}
    monitor = {"val_loss": "loss/val"}.get(preset["metric"]["monitor"], preset["metric"]["monitor"])
    _, summary = fit(args, model, train_set, compute_loss, optimizer, model_name=MODEL_NAME, arch=model.arch,
                     settings=settings, scheduler=scheduler, scheduler_interval=interval, evaluate=evaluate,
                     best_metric=monitor, higher_is_better=monitor != "loss/val",
                     log_images=make_image_logger(layout, model.config),
                     early_stopping_patience=preset["callbacks"].get("early_stopping_patience"))
    return summary


if __name__ == "__main__":
    exit_on_bad_input(main)
