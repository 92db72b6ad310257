"""Speed of HigherHRNet inference and training targets, each timed side by side against a step-by-step
port of the official code, in one run:

- grouping (NMS + top-k + matching + adjust + refine) at 1/15/30 people, 704x512 maps, two tag dimensions
  (laid out as predict_maps hands them over):
  group_by_tags against group_by_tags_reference, a step-by-step port of the official HeatmapParser with
  munkres 1.1.4 (both equal the official outputs bit for bit on ../shared/reference/
  official_grouping_vectors.npz; checked first when that file is present);
- training targets (heatmaps at 1/4 and 1/2 + joint indices, 10 people, 512 input): make_heatmaps and
  tag_rows against a step-by-step port of the official HeatmapGenerator / JointsGenerator;
- forward of HigherHRNet-W32 at 704x512: plain, channels_last, folded BatchNorm, both (fp32; AMP on CUDA);
- image -> keypoints on a 640x480 photo with W32 and the official test settings: the share of each stage.

    python higher_hrnet/benchmark.py                   # everything (~2 min on 2 idle cores), 2 threads
    python higher_hrnet/benchmark.py --skip-model      # grouping and targets only
    python higher_hrnet/benchmark.py --threads 1 --repeat 5 --json figures.json
Times are medians over --repeat runs, the two sides of a ratio alternating. Untrained weights: the network
costs the same; in the image -> keypoints run --photo-people rendered people (default 30) are added to
its outputs so that the grouping has the work of a crowded photo.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from common.data import read_image
from common.evaluation import count_flops, count_parameters
from common.geometry import flip_keypoints
from common.heatmaps import make_heatmaps
from common.keypoints import COCO17
from common.runs import pick_device
from higher_hrnet.dataset import tag_rows
from higher_hrnet.grouping import GroupingParams, group_by_tags, group_by_tags_reference
from higher_hrnet.inference import INFERENCE_SETTINGS, multi_scale_size, predict_people, prepare_for_inference
from higher_hrnet.model import build_model

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"
SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


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


def time_side_by_side(functions, repeat, cpu=None):
    """Median wall milliseconds of each function, calling them in turn `repeat` times (so that a change
    of machine load hits both sides of a ratio alike); returns (results of the last calls, medians).
    cpu: a list that receives the median process CPU milliseconds of each (all threads together)."""
    times, cpu_times = [[] for _ in functions], [[] for _ in functions]
    results = [None] * len(functions)
    for _ in range(repeat):
        for i, function in enumerate(functions):
            start, start_cpu = time.perf_counter(), time.process_time()
            results[i] = function()
            times[i].append(time.perf_counter() - start)
            cpu_times[i].append(time.process_time() - start_cpu)
    if cpu is not None:
        cpu[:] = [1000 * float(np.median(t)) for t in cpu_times]
    return results, [1000 * float(np.median(t)) for t in times]


# ---------------------------------------------------------------------------------------------- grouping

def check_official_vectors():
    """Both parsers against the official outputs: (cases equal, cases checked), or None without the file."""
    path = REFERENCE / "official_grouping_vectors.npz"
    if not path.is_file():
        return None
    vectors = np.load(path)
    cases = sorted({int(key[4:key.index("_")]) for key in vectors.files if key.startswith("case")})
    equal = 0
    for case in cases:
        heatmaps, tags = vectors[f"case{case}_heatmaps"], vectors[f"case{case}_tags"]
        ok = True
        for suffix, adjust, refine in (("", True, True), ("_adjust_norefine", True, False),
                                       ("_noadjust_norefine", False, False)):
            for group in (group_by_tags, group_by_tags_reference):
                people, scores = group(heatmaps, tags, GroupingParams(adjust=adjust, refine=refine))
                ok &= (np.array_equal(people, vectors[f"case{case}_people{suffix}"])
                       and np.array_equal(scores, vectors[f"case{case}_scores{suffix}"]))
        equal += ok
    return equal, len(cases)


def benchmark_grouping(counts=(1, 15, 30), size=(704, 512), repeat=3):
    checked = check_official_vectors()
    print("grouping: reference = group_by_tags_reference, a step-by-step port of the official HeatmapParser "
          "(lib/core/group.py) with munkres 1.1.4; " + (
              f"both parsers equal the official outputs bit for bit on {checked[0]} of {checked[1]} cases of "
              "../shared/reference/official_grouping_vectors.npz" if checked else
              "../shared/reference/official_grouping_vectors.npz is absent, so the official vectors were not checked"))
    rows = []
    params = GroupingParams()
    for n in counts:
        people = random_people(n, size, seed=n)
        heat, tags = render_fake_maps(people, size, seed=n)
        # tags as predict_maps hands them over: one contiguous plane per tag dimension, seen as (K, H, W, L)
        heat_t, tags_t = torch.from_numpy(heat), torch.from_numpy(np.ascontiguousarray(np.moveaxis(tags, -1, 0)))
        tags_t = tags_t.permute(1, 2, 3, 0)
        cpu = []
        ((fast, fast_scores), (ref, ref_scores)), (fast_ms, ref_ms) = time_side_by_side(
            [lambda: group_by_tags(heat_t, tags_t, params), lambda: group_by_tags_reference(heat_t, tags_t, params)],
            repeat, cpu)
        identical = np.array_equal(fast, ref) and np.array_equal(fast_scores, ref_scores)
        rows.append({"people": n, "found": len(fast), "reference_ms": ref_ms, "fast_ms": fast_ms,
                     "fast_cpu_ms": cpu[0], "speedup": ref_ms / fast_ms, "identical": identical})
        print(f"  {n:2d} people ({len(fast):2d} found), {size[0]}x{size[1]}: reference {ref_ms:8.1f} ms   "
              f"fast {fast_ms:6.1f} ms (CPU {cpu[0]:5.1f} ms)   x{ref_ms / fast_ms:5.1f}   bit-identical: {identical}")
    if checked:
        rows.append({"official_vectors_equal": checked[0], "official_vectors_cases": checked[1]})
    return rows


# ---------------------------------------------------------------------------------------------- targets

class OfficialHeatmapGenerator:
    """Step-by-step port of the official HeatmapGenerator (lib/dataset/target_generators): one
    (6 sigma + 3)^2 Gaussian made once, copied per joint into its clipped window with a maximum."""

    def __init__(self, output_res, num_joints, sigma=2.0):
        self.output_res, self.num_joints, self.sigma = output_res, num_joints, sigma
        side = 6 * sigma + 3
        grid = np.arange(0, side, 1, float)
        center = 3 * sigma + 1
        self.kernel = np.exp(-((grid - center) ** 2 + (grid[:, None] - center) ** 2) / (2 * sigma ** 2))

    def __call__(self, joints):
        res, sigma = self.output_res, self.sigma
        maps = np.zeros((self.num_joints, res, res), dtype=np.float32)
        for person in joints:
            for joint, point in enumerate(person):
                if point[2] <= 0:
                    continue
                x, y = int(point[0]), int(point[1])
                if x < 0 or y < 0 or x >= res or y >= res:
                    continue
                left, top = int(np.round(x - 3 * sigma - 1)), int(np.round(y - 3 * sigma - 1))
                right, bottom = int(np.round(x + 3 * sigma + 2)), int(np.round(y + 3 * sigma + 2))
                kx0, kx1 = max(0, -left), min(right, res) - left
                ky0, ky1 = max(0, -top), min(bottom, res) - top
                mx0, mx1 = max(0, left), min(right, res)
                my0, my1 = max(0, top), min(bottom, res)
                maps[joint, my0:my1, mx0:mx1] = np.maximum(maps[joint, my0:my1, mx0:mx1],
                                                           self.kernel[ky0:ky1, kx0:kx1])
        return maps


class OfficialJointsGenerator:
    """Step-by-step port of the official JointsGenerator: (max people, K, 2) rows of (flat index, 1)."""

    def __init__(self, max_num_people, num_joints, output_res, tag_per_joint=True):
        self.max_num_people, self.num_joints = max_num_people, num_joints
        self.output_res, self.tag_per_joint = output_res, tag_per_joint

    def __call__(self, joints):
        res = self.output_res
        visible = np.zeros((self.max_num_people, self.num_joints, 2))
        for person in range(len(joints)):
            count = 0
            for joint, point in enumerate(joints[person]):
                x, y = int(point[0]), int(point[1])
                if point[2] > 0 and 0 <= x < res and 0 <= y < res:
                    index = y * res + x
                    visible[person][count] = (joint * res ** 2 + index if self.tag_per_joint else index, 1)
                    count += 1
        return visible


def benchmark_targets(num_people=10, input_size=512, repeat=50):
    """Targets of one sample as dataset.py makes them, against the official generators."""
    rng = np.random.default_rng(0)
    quarter, half = input_size // 4, input_size // 2
    joints = np.zeros((num_people, 17, 3), np.float32)
    joints[..., :2] = rng.uniform(0, half, (num_people, 17, 2))
    joints[..., 2] = 2 * (rng.random((num_people, 17)) > 0.15)
    on_quarter = joints * np.float32([0.5, 0.5, 1])
    official_heatmaps = [OfficialHeatmapGenerator(quarter, 17), OfficialHeatmapGenerator(half, 17)]
    official_joints = OfficialJointsGenerator(30, 17, quarter)

    def ours():
        return (make_heatmaps(on_quarter, (quarter, quarter), 2.0, center="truncate"),
                make_heatmaps(joints, (half, half), 2.0, center="truncate"), tag_rows(on_quarter, (quarter, quarter)))

    def official():
        return official_heatmaps[0](on_quarter), official_heatmaps[1](joints), official_joints(on_quarter)

    _, (ours_ms, official_ms) = time_side_by_side([ours, official], repeat)
    print(f"training targets ({num_people} people, heatmaps {quarter}x{quarter} + {half}x{half}, joint indices): "
          f"official generators (step-by-step port) {official_ms:.2f} ms   ours {ours_ms:.2f} ms   "
          f"x{official_ms / ours_ms:.1f}")
    return {"people": num_people, "official_ms": official_ms, "ours_ms": ours_ms, "speedup": official_ms / ours_ms}


# ---------------------------------------------------------------------------------------------- model

def randomize_batchnorm(model, seed=0):
    """PyTorch's default convolution init and random BatchNorm statistics and affines: outputs of order
    1-10 (the official N(0, 0.001) init gives ~0, which would make any comparison pass)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            module.reset_parameters()
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.normal_(0, 0.2, generator=generator)
    return model


def benchmark_forward(model, size, device, repeat):
    """Plain model against channels_last, folded BatchNorm and both: time and largest output difference."""
    width, height = size
    x = torch.randn(1, 3, height, width, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    variants = {"plain": (model, x)}
    for name, fold, channels_last in (("channels_last", False, True), ("folded BatchNorm", True, False),
                                      ("folded BatchNorm + channels_last", True, True)):
        prepared = prepare_for_inference(model, fold=fold, channels_last=channels_last)
        variants[name] = (prepared, x.contiguous(memory_format=torch.channels_last) if channels_last else x)

    def run(net, inputs, amp=None):
        def forward():
            with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                outputs = net(inputs)
            sync()
            return outputs
        return forward

    with torch.no_grad():
        reference = [o.float() for o in model(x)]
    for net, inputs in variants.values():
        run(net, inputs)()   # warm-up
    outputs, times = time_side_by_side([run(net, inputs) for net, inputs in variants.values()], repeat)
    report = {}
    plain_ms = times[0]
    scale = max(float(o.abs().max()) for o in reference)
    for (name, _), ms, output in zip(variants.items(), times, outputs):
        difference = max(float((a.float() - b).abs().max()) for a, b in zip(output, reference))
        report[name] = {"ms": ms, "speedup": plain_ms / ms, "max_abs_difference": difference}
        print(f"  forward fp32 {name:33s} {ms:8.1f} ms   x{plain_ms / ms:4.2f}   max |output - plain| {difference:.1e}"
              f" (outputs up to {scale:.1f})")
    if device.type == "cuda":
        best = variants["folded BatchNorm + channels_last"]
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            run(*best, amp=dtype)()
            _, (ms,) = time_side_by_side([run(*best, amp=dtype)], repeat)
            report[f"amp {name}"] = {"ms": ms}
            print(f"  forward AMP {name} (folded + channels_last)  {ms:8.1f} ms")
    return report


class WithRenderedPeople(torch.nn.Module):
    """The model, with rendered people added to its outputs (mirrored with the input for the flip
    pass), so that an untrained network's image -> keypoints run groups a 30-person photo."""

    def __init__(self, model, people_input, num_joints=17):
        super().__init__()
        self.model, self.people, self.num_joints = model, people_input, num_joints
        self.rendered = {}

    def render(self, shape, flipped):
        key = (tuple(shape), flipped)
        if key not in self.rendered:
            height, width = shape[2:]
            people = flip_keypoints(self.people, width, COCO17.flip_index) if flipped else self.people
            outputs = []
            for stride, with_tags in ((4, True), (2, False)):
                on_map = people.copy()
                on_map[..., :2] = (people[..., :2] - (stride - 1) / 2) / stride
                heat, tags = render_fake_maps(on_map, (width // stride, height // stride), sigma=6.0 / stride,
                                              tags=np.arange(len(people))[:, None] * 2.0)
                maps = np.concatenate([heat, tags[..., 0]]) if with_tags else heat
                outputs.append(torch.from_numpy(maps)[None])
            self.rendered[key] = outputs
        return self.rendered[key]

    def forward(self, x):
        flipped = getattr(self, "first_input", None) is not None and not torch.equal(x, self.first_input)
        if not flipped:
            self.first_input = x
        outputs = self.model(x)
        return [o + r.to(o.device, o.dtype) for o, r in zip(outputs, self.render(x.shape, flipped))]


def benchmark_image_to_keypoints(model, device, repeat, label, num_people=30):
    """Share of each stage of predict_people on a 640x480 photo (official test settings, flip test)."""
    photo = SHARED_DATA / "coco_sample" / "000000000785.jpg"
    if photo.is_file():
        image = cv2.resize(read_image(photo), (640, 480), interpolation=cv2.INTER_AREA)
        source = f"{photo.name} resized to 640x480"
    else:
        image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        source = "random pixels, 640x480 (../shared/data/coco_sample is absent)"
    config = INFERENCE_SETTINGS["official"]
    (width, height), _, _ = multi_scale_size(480, 640, config.input_size, 1.0, 1.0)
    people = random_people(num_people, (width, height), seed=num_people)
    wrapped = WithRenderedPeople(model, people)
    predict_people(wrapped, image, config, device=device)   # warm-up, renders the maps once
    runs = []
    for _ in range(repeat):
        timings = {}
        start = time.perf_counter()
        found, _ = predict_people(wrapped, image, config, device=device, timings=timings)
        timings["total"] = time.perf_counter() - start
        runs.append(timings)
    stages = {name: 1000 * float(np.median([r[name] for r in runs])) for name in runs[0]}
    network = stages["network"]
    other = sum(ms for name, ms in stages.items() if name not in ("network", "total"))
    print(f"image -> keypoints ({source}; input {width}x{height}, {label}, official test settings with flip test, "
          f"{num_people} people rendered into the outputs, {len(found)} found):")
    for name, ms in stages.items():
        if name != "total":
            print(f"  {name:22s} {ms:8.1f} ms   {100 * ms / stages['total']:5.1f}% of the total")
    print(f"  total                  {stages['total']:8.1f} ms; everything but the network: {other:.1f} ms = "
          f"{100 * other / network:.1f}% of the network's time")
    return {"people_rendered": num_people, "stages_ms": stages, "people_found": len(found),
            "non_network_over_network": other / network}


def benchmark_model(args):
    """Params and GFLOPs (meta device, no compute), forward variants, image -> keypoints."""
    width, height = args.input_size
    with torch.device("meta"):
        meta_model = build_model(args.width)
        flops = count_flops(meta_model, torch.empty(1, 3, height, width))
    params = count_parameters(meta_model)
    print(f"HigherHRNet-W{args.width}: {params:,} parameters, {flops / 1e9:.1f} GFLOPs at {width}x{height} "
          f"({flops / 2e9:.1f} G multiply-adds)")
    device = pick_device(args.device)
    model = randomize_batchnorm(build_model(args.width)).eval().to(device)
    print(f"forward on {device}, batch 1, {width}x{height}:")
    report = {"width": args.width, "params": params, "gflops": flops / 1e9, "input": [width, height],
              "device": str(device), "forward": benchmark_forward(model, (width, height), device, args.repeat)}
    # the official initialization: outputs near 0, so the rendered people are what the grouping sees
    model = prepare_for_inference(build_model(args.width).eval().to(device))
    report["image_to_keypoints"] = benchmark_image_to_keypoints(
        model, device, args.repeat, f"HigherHRNet-W{args.width} folded + channels_last", args.photo_people)
    return report


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average at start {load}")
    start = time.perf_counter()
    report = {"threads": torch.get_num_threads(), "load_average_start": load,
              "grouping": benchmark_grouping(repeat=args.repeat),
              "targets": benchmark_targets(repeat=max(10, 10 * args.repeat))}
    if not args.skip_model:
        report["model"] = benchmark_model(args)
    report["load_average_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"load average at end {report['load_average_end']}; {time.perf_counter() - start:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"outputs: {args.json}")
    else:
        print("outputs: none (figures above; --json FILE writes them)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=32,
                        help="model width for the model figures (default: %(default)s)")
    parser.add_argument("--input-size", type=int, nargs=2, default=(704, 512), metavar=("W", "H"),
                        help="model input for the forward timing (default: 704 512, a 640x480 photo's input)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed repetitions, median reported (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads, 0 = torch's choice (default: %(default)s; 1 on a loaded machine)")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda for the model figures (default: cuda when available)")
    parser.add_argument("--skip-model", action="store_true", help="only the grouping and target figures")
    parser.add_argument("--photo-people", type=int, default=30,
                        help="people rendered into the network outputs for image -> keypoints (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
