"""Evaluate a CPM checkpoint: PCK@0.05/0.1/0.2 of the box diagonal in original pixels (per keypoint),
visibility accuracy (signed targets), COCO AP with the layout's sigmas, parameters and GFLOPs, and the
mean-shape baseline on the same images.

    python cpm_animal/eval.py                                   # newest checkpoint, its validation split
    python cpm_animal/eval.py --checkpoint CKPT --ann path/to/train_keypoints_annotations.json
    python cpm_animal/eval.py --ann ann.json --data images/     # a COCO animal file
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from torch.utils.data import DataLoader

from common.data import AnnotationError, coco_from_dict, exit_on_bad_input
from common.evaluation import coco_keypoint_ap, count_flops, count_parameters, pck, write_results_json
from common.geometry import affine_points, invert_affine
from common.keypoints import KeypointLayout
from common.loader import collate_skip_bad
from common.runs import (add_common_args, checkpoint_or_exit, data_dir, is_training_file, model_from_checkpoint,
                         output_dirs, pick_device)
from cpm_animal.dataset import (ImageCache, KeypointCrops, box_diagonal, build_datasets, load_coco_records,
                                load_seed_json, record_box)
from cpm_animal.infer import decode_predictions
from cpm_animal.model import CAT16, MODEL_NAME, CPM, build_model, upgrade_checkpoint
from cpm_animal.presets import apply_override


@torch.no_grad()
def predict(model: CPM, dataset, device, batch_size=16, workers=0, compute_loss=None):
    """Runs the model over a KeypointCrops set; returns dict of numpy arrays (and val_loss)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_skip_bad)
    was_training = model.training
    model.eval()
    out = {"index": [], "pred": [], "score": [], "visible_pred": []}
    loss_sum, loss_count = 0.0, 0
    for batch in tqdm(loader, desc="eval", unit="batch", dynamic_ncols=True, leave=False):
        batch.pop("num_skipped", None)
        if not batch:
            continue
        images = batch["image"].to(device)
        stages = model(images)
        if compute_loss is not None and "heatmap" in batch:
            loss, _ = compute_loss(lambda _: stages, {k: v.to(device) for k, v in batch.items()
                                                      if isinstance(v, torch.Tensor)})
            loss_sum += float(loss) * len(images)
            loss_count += len(images)
        xy, score, visible = decode_predictions(stages[-1], model.config, batch["inverse"].to(device))
        out["index"].append(batch["index"].numpy())
        out["pred"].append(xy.cpu().numpy())
        out["score"].append(score.cpu().numpy())
        out["visible_pred"].append(visible.cpu().numpy())
    model.train(was_training)
    result = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in out.items()}
    if loss_count:
        result["val_loss"] = loss_sum / loss_count
    return result


def ground_truth(dataset, indices):
    """(gt (N, K, 3) original pixels, norm (N,)) for the given record indices."""
    gt = np.stack([dataset.records[i]["keypoints"] for i in indices]) if len(indices) else np.zeros((0, 0, 3))
    norm = np.array([box_diagonal(dataset.records[i]) for i in indices])
    return gt, norm


def compute_metrics(pred, visible_pred, gt, norm, thresholds=(0.05, 0.1, 0.2)):
    """PCK on labelled keypoints (occluded ones count) and visibility accuracy."""
    labelled = gt[..., 2] > 0
    table = pck(pred, gt[..., :2], labelled, norm, thresholds)
    metrics = {f"pck@{t:g}": table[t][1] for t in thresholds}
    if visible_pred is not None and labelled.any():
        metrics["visibility_acc"] = float((visible_pred == (gt[..., 2] == 2))[labelled].mean())
    return metrics, table


def mean_shape(train_set) -> np.ndarray:
    """Mean keypoint position (K, 2) in un-augmented input pixels over the training records."""
    points = np.stack([train_set.input_keypoints(r) for r in train_set.records])
    labelled = points[..., 2] > 0
    total = (points[..., :2] * labelled[..., None]).sum(0)
    count = np.maximum(labelled.sum(0), 1)[:, None]
    return (total / count).astype(np.float32)


def mean_shape_predictions(dataset, shape_xy) -> np.ndarray:
    """The mean shape placed in each record's crop, mapped to original pixels: (N, K, 2)."""
    preds = []
    for record in dataset.records:
        matrix, _, _ = dataset.crop_transform(record)
        preds.append(affine_points(np.asarray(shape_xy, np.float32), invert_affine(matrix)))
    return np.stack(preds) if preds else np.zeros((0, 0, 2))


def records_to_coco(records, layout: KeypointLayout):
    """A pycocotools COCO ground truth built from records (area = box w * h), for AP."""
    images, annotations = [], []
    for number, record in enumerate(records, start=1):
        box = [float(v) for v in record_box(record)]
        images.append({"id": number, "width": int(record["width"]), "height": int(record["height"]),
                       "file_name": str(record["image"])})
        annotations.append({"id": number, "image_id": number, "category_id": 1, "iscrowd": 0, "bbox": box,
                            "area": box[2] * box[3], "keypoints": record["keypoints"].reshape(-1).tolist(),
                            "num_keypoints": int((record["keypoints"][:, 2] > 0).sum())})
    return coco_from_dict({"images": images, "annotations": annotations,
                           "categories": [{"id": 1, "name": "animal", "keypoints": list(layout.names),
                                           "skeleton": [[a + 1, b + 1] for a, b in layout.skeleton]}]})


def print_pck_columns(table, names, thresholds):
    """One row per keypoint, one column per threshold (percent)."""
    width = max(len(n) for n in names)
    print("PCK per keypoint (%)")
    print(f"  {'keypoint':<{width}}  " + "  ".join(f"{'@' + format(t, 'g'):>7}" for t in thresholds))
    for k, name in enumerate(names):
        print(f"  {name:<{width}}  " + "  ".join(f"{100 * table[t][0][k]:7.2f}" for t in thresholds))
    print(f"  {'mean':<{width}}  " + "  ".join(f"{100 * table[t][1]:7.2f}" for t in thresholds))


def full_report(model, dataset, layout, device, batch_size, workers, thresholds, shape_xy=None, quiet=False):
    """Predicts, prints the PCK/visibility/AP tables and the mean-shape baseline; returns (metrics, results)."""
    predictions = predict(model, dataset, device, batch_size, workers)
    indices = predictions["index"].astype(int)
    gt, norm = ground_truth(dataset, indices)
    metrics, table = compute_metrics(predictions["pred"], predictions["visible_pred"], gt, norm, thresholds)
    results = []
    for row, i in enumerate(indices):
        keypoints = np.concatenate([predictions["pred"][row], predictions["score"][row][:, None]], 1)
        results.append({"image_id": int(row) + 1, "category_id": 1, "keypoints": keypoints.reshape(-1).tolist(),
                        "score": float(predictions["score"][row].mean()),
                        "visible": predictions["visible_pred"][row].astype(int).tolist(),
                        "record_id": dataset.records[i]["id"], "file_name": str(dataset.records[i]["image"])})
    coco = records_to_coco([dataset.records[i] for i in indices], layout)
    ap = coco_keypoint_ap(coco, [{k: r[k] for k in ("image_id", "category_id", "keypoints", "score")}
                                 for r in results], layout.sigmas, print_table=False)
    metrics["AP"] = ap["AP"]
    if shape_xy is not None:
        baseline_pred = mean_shape_predictions(dataset, shape_xy)[indices]
        baseline, _ = compute_metrics(baseline_pred, None, gt, norm, thresholds)
        metrics.update({f"baseline_{k}": v for k, v in baseline.items()})
    if not quiet:
        print_pck_columns(table, layout.names, thresholds)
        print(f"images: {len(indices)}, labelled keypoints: {int((gt[..., 2] > 0).sum())}")
        print("           " + "  ".join(f"PCK@{t:<5g}" for t in thresholds))
        print("CPM        " + "  ".join(f"{100 * metrics[f'pck@{t:g}']:8.2f}" for t in thresholds))
        if shape_xy is not None:
            print("mean shape " + "  ".join(f"{100 * metrics[f'baseline_pck@{t:g}']:8.2f}" for t in thresholds))
        if "visibility_acc" in metrics:
            print(f"visibility accuracy (sign of the signed heatmap peak): {100 * metrics['visibility_acc']:.2f}%")
        note = f" ({layout.sigmas_note})" if layout.sigmas_note else ""
        print(f"COCO keypoint AP with {layout.name} sigmas{note}: {ap['AP']:.4f}")
    return metrics, results


def evaluation_data(args, saved, model, data_root):
    """(dataset, layout, source) of --ann (the seed's cats JSON or a COCO file), else the checkpoint's preset's
    validation split."""
    preset = saved["settings"]["preset"]
    for override in args.overrides:
        apply_override(preset, override)
    if not args.ann or is_training_file(args.ann, saved["settings"]):   # the training file: its held-out animals only
        _, dataset, layout = build_datasets(preset, model.config, data_root)
        return dataset, layout, f"the {preset['dataset']['kind']} validation split (not the training animals)"
    ann = Path(args.ann)
    try:
        content = json.loads(ann.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise AnnotationError(f"{ann}: cannot read annotation file ({error})") from None
    if "keypoints" in content and "annotations" not in content:    # the seed's cats JSON
        layout, records = CAT16, load_seed_json(ann, Path(args.data) if args.data else None)
    else:
        records, layout = load_coco_records(ann, args.data or ann.parent, preset["dataset"]["layout"])
    ds = preset["dataset"]
    cache = ImageCache(data_root / "image_cache", ds["cache_max_side"])
    dataset = KeypointCrops(cache.prepare(records), layout, model.config, preset["test_augmentations"], cache,
                            None, ds["target_mode"], True, ds["box_padding"])
    return dataset, layout, str(ann)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, role="eval", workers=0)
    parser.add_argument("overrides", nargs="*", help="preset overrides applied to the checkpoint's preset, "
                                                     "e.g. dataset.val_fraction=0.3")
    args = parser.parse_args(argv)
    checkpoint = checkpoint_or_exit(args.checkpoint, MODEL_NAME, "python cpm_animal/train.py", args.out)
    device = pick_device(args.device)
    model, saved = model_from_checkpoint(checkpoint, build_model, MODEL_NAME, upgrade_checkpoint, device)
    dataset, layout, source = evaluation_data(args, saved, model, data_dir(args.out) / MODEL_NAME)
    print(f"checkpoint {checkpoint} (step {saved.get('step')}), evaluating on {source}: {len(dataset)} animals")
    width, height = model.config.input_size
    params, flops = count_parameters(model), count_flops(model, torch.zeros(1, 3, height, width, device=device))
    print(f"parameters: {params:,}  GFLOPs (multiply-add = 2) per {width}x{height} crop: {flops / 1e9:.2f}")
    thresholds = tuple(saved["settings"]["preset"]["metric"]["pck_thresholds"])
    shape = np.asarray(saved["settings"]["mean_shape"], np.float32)
    metrics, results = full_report(model, dataset, layout, device, args.batch_size, args.workers, thresholds, shape)
    out_dir = output_dirs(MODEL_NAME, args.run_name or f"eval-{checkpoint.parent.name}", args.out)["outputs"]
    write_results_json(results, out_dir / "results.json")
    (out_dir / "metrics.json").write_text(json.dumps({"checkpoint": str(checkpoint), "source": source,
                                                       "parameters": params, "gflops": flops / 1e9, **metrics},
                                                      indent=1))
    print(f"metrics and per-image keypoints written to {out_dir}")


if __name__ == "__main__":
    exit_on_bad_input(main)
