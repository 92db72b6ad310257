"""Evaluate a HigherHRNet checkpoint (ours, official or the seed's) on COCO-format keypoint data.

    python higher_hrnet/eval.py                         # newest built-in checkpoint, built-in val scenes
    python higher_hrnet/eval.py --checkpoint pose_higher_hrnet_w32_512.pth --data coco/images/val2017 \
        --ann coco/annotations/person_keypoints_val2017.json --inference official [--scales 2 1 0.5]
Every image of the annotation file is evaluated, people or not. Writes outputs/higher_hrnet/<run>/
results.json, coco_output.txt (the pycocotools table) and config.yaml; for an image_info file (COCO
test-dev, no annotations) only results.json.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from common.data import BadImageError, exit_on_bad_input, load_coco_keypoints, read_image
from common.evaluation import coco_keypoint_ap, count_parameters, write_results_json
from common.geometry import affine_points, get_affine_transform
from common.heatmaps import make_heatmaps
from common.keypoints import COCO17, get_layout, layout_from_dict
from common.runs import add_common_args, at_least, checkpoint_or_exit, is_training_file, output_dirs, pick_device
from higher_hrnet.checkpoints import load_for_inference
from higher_hrnet.dataset import LAYOUTS, TARGET_SIGMA
from higher_hrnet.infer import NO_CHECKPOINT_HINT, add_inference_args, inference_overrides
from higher_hrnet.inference import (inference_settings, maps_to_people, multi_scale_size, people_to_coco_results,
                                    predict_people, prepare_for_inference)
from higher_hrnet.model import MODEL_NAME
from higher_hrnet.scenes import ensure_scenes


def evaluate_model(model, image_dir, ann_file, config, layout=COCO17, device=None, out_dir=None,
                   progress=True, max_images=None, print_table=True):
    """Run the test pipeline on every image of `ann_file`; returns (metrics or None, results).
    With out_dir: results.json, and for annotated files coco_output.txt + the metrics."""
    coco = load_coco_keypoints(ann_file, layout.num_keypoints)
    has_annotations = "annotations" in coco.dataset and bool(coco.dataset.get("categories"))
    image_ids = sorted(coco.getImgIds())[:max_images]
    model.eval()
    results, failed = [], 0
    for image_id in tqdm(image_ids, desc="eval", disable=not progress, dynamic_ncols=True, leave=False):
        info = coco.loadImgs(image_id)[0]
        try:
            image = read_image(Path(image_dir) / info["file_name"])
        except BadImageError as error:
            print(f"error: {error}", file=sys.stderr)
            failed += 1
            continue
        people, scores = predict_people(model, image, config, layout, device)
        results += people_to_coco_results(people, scores, image_id)
    if failed and failed == len(image_ids):     # AP 0 of no image read is no result
        raise BadImageError(f"{image_dir}: none of the {failed} images of {ann_file} could be read")
    if failed:
        print(f"{failed} image(s) could not be read and count as having no detections")
    metrics = None
    table = ""
    if has_annotations:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            metrics = coco_keypoint_ap(coco, results, layout.sigmas, print_table=True, image_ids=image_ids)
        table = buffer.getvalue()
        if print_table:
            print(f"COCO keypoint AP on {len(image_ids) - failed} images of {ann_file}:\n{table}", end="")
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_results_json(results, out_dir / "results.json")
        if has_annotations:
            (out_dir / "coco_output.txt").write_text(table)
    return metrics, results


def summary_line(metrics):
    return "  ".join(f"{name} {metrics[key]:.4f}" for name, key in (("AP", "AP"), ("AP50", "AP50"), ("AP_M", "APm"),
                                                                    ("AP_L", "APl"), ("AR", "AR")))


def oracle_maps(people, image_shape, config, sigma=TARGET_SIGMA):
    """The ground truth as the network's 1/4 output would show it at best, through the test pipeline's
    projection: sigma-2 heatmaps on truncated stride-4 joint positions (the training targets), and per
    joint a tag map holding 3 * (person index) around each person's joint. Returns predict_maps' values."""
    height, width = image_shape[:2]
    size, center, box = multi_scale_size(height, width, config.input_size, 1.0, 1.0)
    quarter = (size[0] // 4, size[1] // 4)
    joints = affine_points(people, get_affine_transform(center, box, 0, quarter)) if len(people) else people
    heatmaps, _ = make_heatmaps(joints, quarter, sigma, center="truncate")
    num_joints = heatmaps.shape[0]
    tags = np.zeros_like(heatmaps)
    ys, xs = np.mgrid[0:quarter[1], 0:quarter[0]]
    for k in range(num_joints):
        labelled = np.flatnonzero(joints[:, k, 2] > 0) if len(joints) else []
        if len(labelled):   # each pixel takes the tag of the person whose joint k is nearest
            distance = (xs - np.trunc(joints[labelled, k, 0])[:, None, None]) ** 2 + \
                       (ys - np.trunc(joints[labelled, k, 1])[:, None, None]) ** 2
            tags[k] = 3.0 * labelled[distance.argmin(0)]
    maps = torch.from_numpy(np.concatenate([heatmaps, tags]))[None]
    maps = F.interpolate(maps, size=(size[1], size[0]), mode="bilinear", align_corners=False)[0]
    # A peak upsampled x4 is flat over 2x2 pixels, all kept by the NMS (one person found four times); a
    # network's peaks are never that symmetric. Ties go to the top-left pixel of each 4x4 block.
    ys, xs = np.mgrid[0:size[1], 0:size[0]]
    maps[:num_joints] -= torch.from_numpy(1e-5 * ((ys % 4) * 4 + xs % 4) / 16).float()
    return maps[:num_joints], maps[num_joints:, ..., None], center, box


def oracle_metrics(image_dir, ann_file, config, layout=COCO17, max_images=None):
    """COCO AP of the stride-4 oracle (oracle_maps grouped like the network's maps): the ceiling of a
    network whose outputs equal its training targets, on the same images and settings."""
    coco = load_coco_keypoints(ann_file, layout.num_keypoints)
    image_ids = sorted(coco.getImgIds())[:max_images]
    results = []
    for image_id in image_ids:
        info = coco.loadImgs(image_id)[0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
        people = np.array([a["keypoints"] for a in anns if a.get("num_keypoints", 0) > 0], np.float32)
        heatmaps, tags, center, box = oracle_maps(people.reshape(-1, layout.num_keypoints, 3),
                                                  (info["height"], info["width"]), config)
        people, scores = maps_to_people(heatmaps, tags, center, box, config, layout.num_keypoints)
        results += people_to_coco_results(people, scores, image_id)
    return coco_keypoint_ap(coco, results, layout.sigmas, print_table=False, image_ids=image_ids)


def default_data(args):
    """(image_dir, ann_file): --data/--ann, else the built-in validation scenes."""
    if args.data:
        if not args.ann:
            raise SystemExit("--data needs --ann (the COCO keypoint JSON or image_info file)")
        return Path(args.data), Path(args.ann)
    root = ensure_scenes(args.out)
    return root / "images" / "val", root / "annotations" / "person_keypoints_val.json"


def main(args):
    checkpoint = checkpoint_or_exit(args.checkpoint, MODEL_NAME, "python higher_hrnet/train.py", args.out,
                                    hint=NO_CHECKPOINT_HINT)
    device = pick_device(args.device)
    model, settings = load_for_inference(checkpoint, device)
    layout = get_layout(args.layout, LAYOUTS) if args.layout else layout_from_dict(settings["layout"])
    config = inference_settings(args.inference, **{**inference_overrides(args),
                                                   "input_size": args.input_size or settings["input_size"]})
    image_dir, ann_file = default_data(args)
    is_training_file(ann_file, settings, warn=True)
    run = args.run_name or f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = output_dirs(MODEL_NAME, run, args.out)["outputs"]
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"checkpoint {checkpoint}: width {model.arch['width']}, {count_parameters(model):,} parameters; "
          f"inference {args.inference}, input {config.input_size}, flip {config.flip}, scales {list(config.scales)}")
    if not args.plain_network:
        model = prepare_for_inference(model)
    start = time.perf_counter()
    metrics, results = evaluate_model(model, image_dir, ann_file, config, layout, device, out_dir,
                                      max_images=args.max_images)
    seconds = time.perf_counter() - start
    report = {"checkpoint": str(checkpoint), "data": str(image_dir), "ann": str(ann_file), "layout": layout.name,
              "inference": args.inference, "inference_settings": config.as_dict(), "model": model.arch,
              "seconds": round(seconds, 1), "num_results": len(results), "metrics": metrics}
    if metrics is None:   # image_info files: results.json only
        print(f"{len(results)} detections (no annotations to score)")
    else:
        print(f"{summary_line(metrics)}  ({seconds:.0f} s)")
        if args.data is None:   # the built-in scenes: say how far the model is from the stride-4 ceiling
            ceiling = oracle_metrics(image_dir, ann_file, config, layout, args.max_images)
            print(f"stride-4 oracle on the same images and settings: AP {ceiling['AP']:.4f} (the ceiling)")
            report["oracle_metrics"] = ceiling
        (out_dir / "config.yaml").write_text(yaml.safe_dump(report, sort_keys=False))
    print(f"outputs: {out_dir}")
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, role="eval")
    add_inference_args(parser)
    parser.add_argument("--max-images", type=at_least(1), default=None, help="only the first N images (quick checks)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(exit_on_bad_input(main, parse_args()))
