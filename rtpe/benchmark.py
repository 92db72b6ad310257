"""Speed and size of the rtpe students (and the HigherHRNet teacher): parameters, GFLOPs, latency median/p90
and FPS at 256/448/512, batch 1, model only and image -> keypoints (resize + normalize + network + grouping).

    python rtpe/benchmark.py                               # light + seed students and teacher W32, 2 threads
    python rtpe/benchmark.py --student-sizes light --sizes 256 --frames 300

Backends: torch CPU fp32 channels_last (BatchNorm folded), onnxruntime CPU when installed, CUDA fp16/bf16
when a GPU is present. Untrained weights: speed does not depend on them (grouping work does a little:
random maps give many candidates, so the image -> keypoints figure is on the pessimistic side).
Prints a table and writes benchmark.json to outputs/rtpe/benchmark/.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import numpy as np
import torch

from common.evaluation import count_flops
from common.export import export_onnx
from common.runs import output_dirs
from higher_hrnet.inference import fold_batchnorm
from higher_hrnet.model import build_model as build_teacher
from rtpe.infer import Predictor, decoding_settings
from rtpe.model import RealtimePoseStudent


def timed(function, frames, warmup):
    for _ in range(warmup):
        function()
    times, cpu_times = [], []
    for _ in range(frames):
        start, cpu_start = time.perf_counter(), time.process_time()
        function()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    times = np.array(times) * 1000
    median = float(np.median(times))
    # CPU time of this process per frame: on a machine shared with other jobs the wall-clock figures
    # include waiting for a core; with 1 thread the CPU time is what the frame costs on an idle core
    return {"median_ms": median, "p90_ms": float(np.percentile(times, 90)), "fps": 1000 / median,
            "cpu_ms_median": float(np.median(cpu_times) * 1000)}


def model_gflops(model, size):
    return count_flops(copy.deepcopy(model).eval(), torch.randn(1, 3, size, size)) / 1e9


def bench_student(student_size, size, frames, warmup, backends):
    torch.manual_seed(0)
    model = RealtimePoseStudent(student_size, "lab").eval()
    rows = []
    params = sum(p.numel() for p in model.parameters())
    gflops = model_gflops(model, size)
    folded = fold_batchnorm(copy.deepcopy(model)).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        rows.append({"model": f"student {student_size}", "backend": "torch cpu fp32 cl", "part": "model", "size": size,
                     **timed(lambda: folded(x), frames, warmup)})
    predictor = Predictor(copy.deepcopy(model), decoding_settings(size))
    image = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    rows.append({"model": f"student {student_size}", "backend": "torch cpu fp32 cl", "part": "image->keypoints",
                 "size": size, **timed(lambda: predictor.run(image), frames, warmup)})
    if "onnxruntime" in backends:
        rows += bench_onnxruntime(model, student_size, size, frames, warmup)
    if "cuda" in backends:
        rows += bench_cuda(model, f"student {student_size}", size, frames, warmup)
    for row in rows:
        row.update(params=params, gflops=gflops)
    return rows


def bench_onnxruntime(model, student_size, size, frames, warmup):
    import onnxruntime   # optional dependency

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/m.onnx"
        export_onnx(model, torch.randn(2, 3, size, size), path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
        result = timed(lambda: session.run(None, {"image": x}), frames, warmup)
    return [{"model": f"student {student_size}", "backend": "onnxruntime cpu fp32", "part": "model", "size": size, **result}]


def bench_cuda(model, name, size, frames, warmup):
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        m = copy.deepcopy(model).cuda().eval().to(memory_format=torch.channels_last)
        x = torch.randn(1, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)

        def run():
            with torch.autocast("cuda", dtype=dtype):
                m(x)
            torch.cuda.synchronize()
        with torch.inference_mode():
            rows.append({"model": name, "backend": f"cuda {str(dtype).split('.')[-1]}", "part": "model",
                         "size": size, **timed(run, frames, warmup)})
    return rows


def bench_teacher(width, size, frames, warmup, backends):
    model = build_teacher(width).eval()
    params = sum(p.numel() for p in model.parameters())
    gflops = model_gflops(model, size)
    m = model.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        rows = [{"model": f"teacher HigherHRNet-W{width}", "backend": "torch cpu fp32 cl", "part": "model",
                 "size": size, **timed(lambda: m(x), frames, warmup)}]
    if "cuda" in backends:
        rows += bench_cuda(model, f"teacher HigherHRNet-W{width}", size, frames, warmup)
    for row in rows:
        row.update(params=params, gflops=gflops)
    return rows


def main(args):
    torch.set_num_threads(args.threads)
    backends = ["torch"]
    try:
        import onnxruntime  # noqa: F401
        import onnx  # noqa: F401
        backends.append("onnxruntime")
    except ImportError:
        pass
    if torch.cuda.is_available():
        backends.append("cuda")
    rows = []
    for size in args.sizes:
        for student_size in args.student_sizes:
            finished = bench_student(student_size, size, args.frames, args.warmup, backends)
            rows += finished
            print(f"done: {student_size} at {size}: " + ", ".join(f"{r['part']} {r['backend']} {r['median_ms']:.1f} ms"
                                                           for r in finished), flush=True)
        if args.teacher_width:
            rows += bench_teacher(args.teacher_width, size, max(3, args.teacher_frames), 2, backends)
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end; "
          f"{torch.get_num_threads()} torch threads, batch 1, {args.frames} timed frames after {args.warmup} "
          f"warm-up (teacher: {args.teacher_frames})")
    print("| model | backend | part | input | params | GFLOPs | median ms | p90 ms | FPS | CPU ms/frame |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['backend']} | {r['part']} | {r['size']} | {r['params']:,} | {r['gflops']:.2f} "
              f"| {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['fps']:.1f} | {r['cpu_ms_median']:.1f} |")
    out = output_dirs("rtpe", "benchmark", args.out)["outputs"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"benchmark.json written to {out}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student-sizes", nargs="+", default=["light", "seed"], help="student sizes (default: light seed)")
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 448, 512], help="square input sides")
    p.add_argument("--frames", type=int, default=200, help="timed frames per row (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=20, help="untimed frames first (default: %(default)s)")
    p.add_argument("--teacher-width", type=int, default=32, help="HigherHRNet width to time; 0 = skip (default: 32)")
    p.add_argument("--teacher-frames", type=int, default=5, help="timed teacher frames (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--out", default=None, help="output root (default: $POSE_OUTPUT_ROOT, else .)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
