"""Train Convolutional Pose Machines on animal keypoints with the shared loop (common.engine.train).

    python cpm_animal/train.py                                  # small CPU preset, built-in quadrupeds
    python cpm_animal/train.py --config cpm_animal/seed.yaml    # the seed's recipe on the real cats
    python cpm_animal/train.py model.drop_rate=0.1 optimizer.name=sgd trainer.max_epochs=20
    torchrun --nproc_per_node=2 cpm_animal/train.py trainer.device=cuda   # several GPUs (or CPU processes)
Settings come from config.yaml, then `group.key=value` overrides, then the shared flags (--epochs, --lr, ...).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from common.data import exit_on_bad_input
from common.drawing import GREEN, RED, draw_keypoints, make_grid
from common.engine import add_common_args, output_dirs, planned_steps, setup_device_and_distributed, train
from cpm_animal.config import dump_config, load_config
from cpm_animal.dataset import SEED_ANN_NAME, build_datasets, denormalise, signed_heatmap_overlay
from cpm_animal.eval import decode_predictions, full_report, mean_shape, predict, compute_metrics, ground_truth
from cpm_animal.model import CPM, config_from_dict, describe

MODEL_NAME = "cpm_animal"


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


def build_optimizer(config, params, lr):
    opt = config["optimizer"]
    name = opt["name"]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=opt["weight_decay"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=opt["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=opt["momentum"], weight_decay=opt["weight_decay"])
    raise SystemExit(f"error: optimizer.name must be adam, adamw or sgd, got {name!r}")


def build_scheduler(config, optimizer, total_steps):
    """(scheduler, interval) from the `scheduler` group."""
    sched = config["scheduler"]
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


def apply_cli(args, config):
    """Shared flags override the YAML; the YAML fills what the flags left unset."""
    trainer, ds = config["trainer"], config["dataset"]
    pairs = [("epochs", trainer, "max_epochs"), ("max_steps", trainer, "max_steps"),
             ("batch_size", ds, "batch_size"), ("lr", config["optimizer"], "lr"), ("seed", config, "seed"),
             ("workers", ds, "num_workers"), ("accumulate", trainer, "accumulate_grad_batches"),
             ("clip_grad", trainer, "clip_grad"), ("log_every", trainer, "log_every"),
             ("keep_best", config["callbacks"], "save_top_k"), ("init_from", config, "checkpoint_path")]
    for dest, group, key in pairs:
        if getattr(args, dest) is None:
            setattr(args, dest, group[key])
        else:
            group[key] = getattr(args, dest)
    args.clip_grad = args.clip_grad or 0.0
    if args.val_every is None:
        args.val_every = f"{trainer['val_every']}e"
    if args.device is None and trainer["device"] != "auto":
        args.device = trainer["device"]
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
            image = denormalise(batch["image"][i])
            truth = batch["keypoints"][i].cpu().numpy()
            image = draw_keypoints(image, truth[:, :3] if truth.shape[1] == 3 else truth, layout.skeleton,
                                   color=GREEN, scores=False)
            pred = np.concatenate([coords[i].cpu().numpy(), np.ones((len(coords[i]), 1))], 1)
            pictures.append(draw_keypoints(image, pred, layout.skeleton, color=RED, scores=False))
        maps = final[0].cpu().numpy()
        image = denormalise(batch["image"][0])
        per_keypoint = [signed_heatmap_overlay(image, maps[k:k + 1]) for k in range(len(maps))]
        return {"val/skeletons_pred_red_true_green": make_grid(pictures, ncols=count),
                "val/heatmaps_per_keypoint": make_grid(per_keypoint, ncols=8)}
    return log_images


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # None = take the value from the YAML config
    add_common_args(parser, epochs=None, batch_size=None, lr=None, seed=None, workers=None, accumulate=None,
                    clip_grad=None, log_every=None, keep_best=None, val_every=None)
    parser.add_argument("--config", default=None, help="YAML config (default: cpm_animal/config.yaml)")
    parser.add_argument("overrides", nargs="*", help="config overrides group.key=value, e.g. model.drop_rate=0.1")
    args = parser.parse_args(argv)
    start = time.time()
    config = load_config(args.config, args.overrides)
    apply_cli(args, config)
    if config["trainer"].get("num_threads"):
        torch.set_num_threads(int(config["trainer"]["num_threads"]))
    device = setup_device_and_distributed(args)
    is_main = args.rank == 0

    config["model"]["num_keypoints"] = config["dataset"]["n_keypoints"]
    model_config = config_from_dict(config["model"])
    data_root = output_dirs(MODEL_NAME, "data", args.out)["data"] / MODEL_NAME
    # rank 0 renders / caches the data first; the other ranks then read it
    if args.distributed and not is_main:
        torch.distributed.barrier()
    train_set, val_set, layout = build_datasets(config, model_config, data_root, quiet=not is_main)
    if args.distributed and is_main:
        torch.distributed.barrier()
    model = CPM(model_config)
    shape_xy = mean_shape(train_set)
    if is_main:
        print(f"data: {config['dataset']['kind']}, {len(train_set)} train / {len(val_set)} val animals, "
              f"layout {layout.name}; model: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"input {list(model_config.input_size)}, {model_config.stages} stages")

    total_steps = planned_steps(args, len(train_set))
    optimizer = build_optimizer(config, model.parameters(), args.lr)
    scheduler, interval = build_scheduler(config, optimizer, total_steps)
    thresholds = tuple(config["metric"]["pck_thresholds"])
    stage_weights = config["loss"]["stage_weights"]
    if config["loss"]["name"] != "mse":
        raise SystemExit(f"error: loss.name must be mse, got {config['loss']['name']!r}")

    def compute_loss(net, batch):
        return cpm_loss(net, batch, stage_weights, model_config.num_keypoints)

    def evaluate(net):
        predictions = predict(net, val_set, device, args.batch_size, args.workers, compute_loss)
        gt, norm = ground_truth(val_set, predictions["index"].astype(int))
        metrics, _ = compute_metrics(predictions["pred"], predictions["visible_pred"], gt, norm, thresholds)
        if "val_loss" in predictions:
            metrics["val_loss"] = predictions["val_loss"]
        return metrics

    # saved in every checkpoint's "config": eval.py and infer.py rebuild the model and data from it
    args.cpm_config = config
    args.cpm_model = describe(model_config)
    args.mean_shape = shape_xy.tolist()
    monitor = config["metric"]["monitor"]
    model, summary = train(args, model, train_set, compute_loss, optimizer, scheduler=scheduler,
                           scheduler_interval=interval, evaluate=evaluate, best_metric=monitor,
                           higher_is_better=monitor != "val_loss",
                           log_images=make_image_logger(layout, model_config), model_name=MODEL_NAME,
                           early_stopping_patience=config["callbacks"].get("early_stopping_patience"))
    if not is_main:
        return
    out_dir = output_dirs(MODEL_NAME, summary["run_name"], args.out)["outputs"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(dump_config(config))
    print(f"\nfinal model (step {summary['steps']}) on the validation split:")
    full_report(model, val_set, layout, device, args.batch_size, args.workers, thresholds, shape_xy)
    print(f"total time {time.time() - start:.0f} s")
    print(f"outputs: checkpoints in {summary['last_checkpoint'].parent}, TensorBoard logs in "
          f"{summary['tensorboard']}, config in {out_dir}")


if __name__ == "__main__":
    exit_on_bad_input(main)
