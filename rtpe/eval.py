"""Evaluate the rtpe student, or its teacher, on the same images: COCO AP and segmentation IoU.

    python rtpe/eval.py                                    # newest rtpe checkpoint, built-in val scenes
    python rtpe/eval.py --model teacher                    # the teacher cache of the built-in val scenes
    python rtpe/eval.py --data ~/coco --split val2017 --list ../shared/reference/coco_minival2017_100.txt

Student: letterbox to --input-size, network, grouping (higher_hrnet.grouping, one tag dimension).
Teacher: its cached maps (rtpe/teacher_inference.py: a higher_hrnet checkpoint or the oracle), grouped the
same way at stride 4 of the teacher input. Writes results.json, metrics.json and a table to
outputs/rtpe/<run>/. Also holds the validation train.py runs (evaluate_student).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from common.data import exit_on_bad_input, load_coco_keypoints, read_image
from common.evaluation import coco_keypoint_ap, write_results_json
from common.keypoints import COCO17
from common.runs import (add_common_args, at_least, checkpoint_or_exit, is_training_file, model_from_checkpoint,
                         output_dirs, pick_device)
from higher_hrnet.grouping import GroupingParams
from higher_hrnet.scenes import ensure_scenes
from rtpe.infer import SEED_GROUPING, Predictor, maps_to_people, people_to_results
from rtpe.model import MODEL_NAME, build_model, upgrade_checkpoint
from rtpe.teacher_inference import ensure_builtin_cache, people_keypoints, read_entry, read_index, render_oracle


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


def evaluate_student(model, settings, coco, image_dir, image_ids, input_size=256, print_table=False):
    """AP (pycocotools, COCO-17 sigmas) and segmentation IoU (attention > 0.5 vs the union of person masks,
    compared at the original resolution) on the given images. settings: the decoding settings (stride,
    pos_weight) the model was trained with."""
    predictor = Predictor(copy.deepcopy(model).cpu(), settings, input_size)
    results, intersection, union = [], 0, 0
    for image_id in tqdm(image_ids, desc="eval", unit="image", dynamic_ncols=True, leave=False):
        info = coco.loadImgs(image_id)[0]
        image = read_image(Path(image_dir) / info["file_name"])
        keypoints, scores, segmentation = predictor.run(image)
        results += people_to_results(keypoints, scores, image_id)
        # the attention map covers the letterboxed input at the map's stride: crop the image part, resize
        scale, stride = input_size / max(image.shape[:2]), predictor.stride
        map_h, map_w = math.ceil(image.shape[0] * scale / stride), math.ceil(image.shape[1] * scale / stride)
        predicted = cv2.resize(segmentation.numpy()[:map_h, :map_w], image.shape[1::-1]) > 0.5
        truth = person_mask(coco, image_id) > 0
        intersection += int((predicted & truth).sum())
        union += int((predicted | truth).sum())
    metrics = coco_keypoint_ap(coco, results, COCO17.sigmas, print_table=print_table, image_ids=image_ids)
    metrics["seg_IoU"] = intersection / union if union else 1.0
    return metrics, results


def oracle_ap(coco, image_ids, scale=1.0):
    """AP of the oracle teacher (ground truth rendered at stride 4 and grouped) on these images: the
    ceiling a stride-4 student can reach on them."""
    results = []
    for image_id in image_ids:
        info = coco.loadImgs(image_id)[0]
        heatmaps, tags, affine = render_oracle(people_keypoints(coco, image_id), (info["width"], info["height"]),
                                               scale)
        to_image = np.linalg.inv(np.vstack([affine, [0, 0, 1]]))[:2]
        keypoints, scores = maps_to_people(heatmaps, tags, to_image, GroupingParams(num_joints=17, **SEED_GROUPING))
        results += people_to_results(keypoints, scores, image_id)
    return coco_keypoint_ap(coco, results, COCO17.sigmas, print_table=False, image_ids=image_ids)["AP"]


def evaluate_cache(coco, cache_dir, image_ids):
    """AP of cached teacher maps grouped at stride 4 (tags per joint or shared)."""
    index = read_index(cache_dir)
    if index is None:
        raise SystemExit(f"{cache_dir}: no teacher cache (run rtpe/teacher_inference.py)")
    params = GroupingParams(num_joints=17, **SEED_GROUPING)
    results = []
    for image_id in image_ids:
        name = coco.loadImgs(image_id)[0]["file_name"]
        entry = read_entry(Path(cache_dir) / index["images"][name])
        to_image = np.linalg.inv(np.vstack([entry["affine"], [0, 0, 1]]))[:2]
        keypoints, scores = maps_to_people(entry["heatmaps"], entry["tags"], to_image, params)
        results += people_to_results(keypoints, scores, image_id)
    metrics = coco_keypoint_ap(coco, results, COCO17.sigmas, print_table=True, image_ids=image_ids)
    return metrics, results, index["teacher"]


def evaluation_data(args):
    """(coco, image dir, split name, annotation file): --data, else the built-in validation scenes."""
    if args.data is None:
        data = Path(ensure_scenes(args.out))
        ann, image_dir, split = data / "annotations" / "person_keypoints_val.json", data / "images" / "val", "val"
    else:
        data, split = Path(args.data), args.split
        ann = Path(args.ann) if args.ann else data / "annotations" / f"person_keypoints_{split}.json"
        image_dir = data / "images" / split
    return load_coco_keypoints(ann), image_dir, split, ann


def main(args):
    checkpoint = None
    if args.model == "student":   # say so before any work when there is no checkpoint
        checkpoint = checkpoint_or_exit(args.checkpoint, MODEL_NAME, "python rtpe/train.py", args.out)
    coco, image_dir, split, ann = evaluation_data(args)
    image_ids = select_image_ids(coco, args.list, args.limit)
    if args.model == "teacher":
        cache = Path(args.teacher_cache) / split if args.teacher_cache else \
            ensure_builtin_cache(args.teacher, args.out)[0] / split
        metrics, results, who = evaluate_cache(coco, cache, image_ids)
        label = f"teacher ({who}, cache {cache})"
    else:
        model, saved = model_from_checkpoint(checkpoint, build_model, MODEL_NAME, upgrade_checkpoint,
                                             pick_device(args.device))
        input_size = args.input_size or saved["settings"]["input_size"]
        is_training_file(ann, saved["settings"], warn=True)
        metrics, results = evaluate_student(model, saved["settings"], coco, image_dir, image_ids, input_size,
                                            print_table=True)
        label = f"student {model.size}/{model.color} ({checkpoint}, input {input_size})"
    out_dir = output_dirs(MODEL_NAME, args.run_name or f"eval_{args.model}", args.out)["outputs"]
    write_results_json(results, out_dir / "results.json")
    (out_dir / "metrics.json").write_text(json.dumps({"model": label, "images": len(image_ids), **metrics}, indent=1))
    print(f"\n{label} on {len(image_ids)} images of {ann}")
    print("| AP | AP50 | AP75 | AR | seg IoU |\n|---|---|---|---|---|")
    seg = f"{metrics['seg_IoU']:.3f}" if "seg_IoU" in metrics else "-"
    print(f"| {metrics['AP']:.3f} | {metrics['AP50']:.3f} | {metrics['AP75']:.3f} | {metrics['AR']:.3f} | {seg} |")
    print(f"results.json and metrics.json written to {out_dir}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, role="eval")
    p.add_argument("--model", choices=("student", "teacher"), default="student", help="what to evaluate")
    p.add_argument("--teacher", default="auto", help="built-in data: auto, oracle or higher_hrnet weights")
    p.add_argument("--teacher-cache", default=None, help="teacher cache root with <split>/ (own data)")
    p.add_argument("--split", default="val2017", help="split under --data (default: %(default)s)")
    p.add_argument("--list", default=None, help="file of image names to evaluate (a minival list)")
    p.add_argument("--limit", type=at_least(1), default=None, help="first N images only")
    p.add_argument("--input-size", type=at_least(1), default=None,
                   help="student input, longer side (default: the checkpoint's validation size)")
    return p.parse_args(argv)


if __name__ == "__main__":
    exit_on_bad_input(main, parse_args())
