"""Speed of HigherHRNet inference: grouping (fast vs the step-by-step official parser), model forward,
image -> keypoints end to end, parameters and GFLOPs.

    python higher_hrnet/benchmark.py                      # W32 model figures + grouping at 1/15/30 people
    python higher_hrnet/benchmark.py --width 16 --skip-model --repeat 5
Grouping runs on rendered network outputs (Gaussian heatmaps, per-person tag values, noise) at 512x704
with two tag dimensions (as with flip test) and checks that both parsers return the same people.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from common.evaluation import count_flops, count_parameters
from common.runs import pick_device
from higher_hrnet.grouping import GroupingParams, group_by_tags, group_by_tags_reference
from higher_hrnet.inference import InferenceConfig, predict_people
from higher_hrnet.model import build_model


def render_fake_maps(people, size, sigma=6.0, tags=None, tag_noise=0.05, heat_noise=0.01, seed=0):
    """Network-like outputs for known people.

    people: (N, K, 3) array (x, y, v) in map pixels, v > 0 drawn; size (W, H). Heatmaps are peak-1
    Gaussians centered on the exact positions of joints with v > 0; tag map j holds, at each pixel,
    the tag of the person whose joint j (labelled or not) is nearest, plus noise: a trained network
    embeds a person's whole body region, also where a joint is not visible. tags: (N, L) per-person values
    (default: 0, 2, 4, ... in every dimension). Returns heatmaps (K, H, W) and tags (K, H, W, L), float32.
    """
    rng = np.random.default_rng(seed)
    people = np.asarray(people, np.float64)
    num_people, num_joints = people.shape[:2]
    width, height = size
    if tags is None:
        tags = np.repeat(np.arange(num_people, dtype=np.float64)[:, None] * 2.0, 2, axis=1)
    tags = np.asarray(tags, np.float64)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    heat = rng.uniform(0, heat_noise, (num_joints, height, width)).astype(np.float32)
    tag_maps = np.zeros((num_joints, height, width, tags.shape[1]), np.float32)
    for j in range(num_joints):
        nearest = np.full((height, width), np.inf, np.float32)
        for p in range(num_people):
            x, y, v = people[p, j]
            dist2 = (xs - x) ** 2 + (ys - y) ** 2
            if v > 0:
                np.maximum(heat[j], np.exp(-dist2 / (2 * sigma ** 2)), out=heat[j])
            closer = dist2 < nearest
            nearest[closer] = dist2[closer]
            tag_maps[j][closer] = tags[p]
    tag_maps += rng.normal(0, tag_noise, tag_maps.shape).astype(np.float32)
    return heat, tag_maps


def random_people(num_people, size, num_joints=17, seed=0, missing=0.15):
    """Upright stick-figure-like people spread over the image; `missing` of the joints unlabelled."""
    rng = np.random.default_rng(seed)
    width, height = size
    people = np.zeros((num_people, num_joints, 3))
    for p in range(num_people):
        h = rng.uniform(0.15, 0.5) * height
        cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.2, 0.8) * height
        people[p, :, 0] = cx + rng.uniform(-0.25, 0.25, num_joints) * h
        people[p, :, 1] = cy + np.linspace(-0.5, 0.5, num_joints) * h + rng.normal(0, 0.03 * h, num_joints)
        people[p, :, 2] = (rng.random(num_joints) > missing).astype(float)
    people[..., 0] = people[..., 0].clip(0, width - 1)
    people[..., 1] = people[..., 1].clip(0, height - 1)
    return people


def same_people(a, b, tol=1e-4):
    """Same number of people, in the same order, with coordinates and scores within tol."""
    return a.shape == b.shape and bool(np.all(np.abs(a[..., :3] - b[..., :3]) <= tol))


def time_call(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, 1000 * float(np.median(times))


def benchmark_grouping(counts=(1, 15, 30), size=(704, 512), repeat=3):
    rows = []
    params = GroupingParams()
    for n in counts:
        people = random_people(n, size, seed=n)
        heat, tags = render_fake_maps(people, size, seed=n)
        heat_t, tags_t = torch.from_numpy(heat), torch.from_numpy(tags)
        (fast, fast_scores), fast_ms = time_call(lambda: group_by_tags(heat_t, tags_t, params), repeat)
        (ref, ref_scores), ref_ms = time_call(lambda: group_by_tags_reference(heat_t, tags_t, params), repeat)
        identical = same_people(fast, ref) and np.allclose(fast_scores, ref_scores, atol=1e-4)
        rows.append({"people": n, "found": len(fast), "reference_ms": ref_ms, "fast_ms": fast_ms,
                     "speedup": ref_ms / fast_ms, "identical": identical})
        print(f"grouping {n:2d} people ({len(fast):2d} found): reference {ref_ms:8.1f} ms   fast {fast_ms:7.1f} ms"
              f"   x{ref_ms / fast_ms:5.1f}   identical: {identical}")
    return rows


def benchmark_model(args):
    """Params and GFLOPs (meta device, no compute), forward time fp32 channels_last (+ AMP on CUDA), and
    image -> keypoints end to end with the official test settings (flip test on)."""
    width, height = args.input_size
    with torch.device("meta"):
        meta_model = build_model(args.width)
        flops = count_flops(meta_model, torch.empty(1, 3, height, width))
    params = count_parameters(meta_model)
    print(f"HigherHRNet-W{args.width}: {params:,} parameters, {flops / 1e9:.1f} GFLOPs at {width}x{height} "
          f"({flops / 2e9:.1f} G multiply-adds)")
    device = pick_device(args.device)
    model = build_model(args.width).eval().to(device).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, height, width, device=device).contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward(amp=None):
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model(x)
        sync()

    forward()   # warm-up
    _, fp32_ms = time_call(forward, args.repeat)
    report = {"width": args.width, "params": params, "gflops": flops / 1e9, "input": [width, height],
              "device": str(device), "forward_fp32_ms": fp32_ms}
    print(f"forward fp32 channels_last on {device}: {fp32_ms:.1f} ms")
    if device.type == "cuda":
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            forward(dtype)
            _, ms = time_call(lambda: forward(dtype), args.repeat)
            report[f"forward_{name}_ms"] = ms
            print(f"forward AMP {name}: {ms:.1f} ms")
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    config = InferenceConfig(input_size=min(width, height))
    _, end_ms = time_call(lambda: predict_people(model, image, config, device=device), args.repeat)
    report["end_to_end_ms"] = end_ms
    print(f"image -> keypoints end to end (official test settings, flip test, {width}x{height}): {end_ms:.1f} ms")
    return report


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"grouping": benchmark_grouping(repeat=args.repeat)}
    if not args.skip_model:
        report["model"] = benchmark_model(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    print("benchmark done (figures above; nothing written)" if not args.json else f"outputs: {args.json}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=32, help="model width for the model figures (default: %(default)s)")
    parser.add_argument("--input-size", type=int, nargs=2, default=(704, 512), metavar=("W", "H"),
                        help="model input for forward / end-to-end timing (default: 704 512)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions, median reported (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--skip-model", action="store_true", help="only the grouping benchmark")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
