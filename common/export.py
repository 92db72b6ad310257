"""ONNX export with an onnxruntime parity check and latency side by side, and the onnxruntime stand-in for a
model that `infer.py --backend onnxruntime` puts in a Predictor. Every <folder>/export.py runs `export_main`.
onnx, onnxscript and onnxruntime are the optional extra (`pip install -e .[onnx]`).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from common.prediction import iter_inputs
from common.runs import at_least, checkpoint_or_exit

PARITY_TOLERANCE = 1e-4   # fp32: torch and onnxruntime order their sums differently, nothing more


def onnx_path_for(checkpoint) -> Path:
    """Where export.py writes a checkpoint's ONNX file, and where infer.py --backend onnxruntime looks."""
    return Path(checkpoint).with_suffix(".onnx")


class _StandIn:
    """Called like the torch model it replaces; any other attribute (input_size, config, parameters ...) is the
    torch model's, so a Predictor's pipeline runs unchanged."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)


class OnnxRuntimeModel(_StandIn):
    """Tensors in, tensors out (CPU), through an onnxruntime session of an exported file."""

    def __init__(self, path, model, threads=None):
        try:
            import onnxruntime
        except ImportError:
            raise SystemExit("onnxruntime is the optional extra: pip install onnx onnxscript onnxruntime") from None
        super().__init__(model)
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # idle onnxruntime threads otherwise spin for a while after each run, taking the cores torch (or another
        # job on a shared machine) needs next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.sequence = self.session.get_modelmeta().custom_metadata_map.get("outputs") == "sequence"

    def __call__(self, x):
        outputs = self.session.run(None, {"image": np.ascontiguousarray(x.detach().cpu().float().numpy())})
        outputs = [torch.from_numpy(o) for o in outputs]
        return outputs if self.sequence else outputs[0]


class _InputRecorder(_StandIn):
    def __init__(self, model):
        super().__init__(model)
        self.inputs = []

    def __call__(self, x):
        self.inputs.append(x.detach().cpu().contiguous())
        return self.model(x)


def use_backend(predictor, backend, checkpoint, onnx=None, threads=None):
    """--backend onnxruntime: the predictor's network becomes the exported file (--onnx, default beside the
    checkpoint); the rest of its pipeline stays the same."""
    if backend == "onnxruntime":
        path = Path(onnx) if onnx else onnx_path_for(checkpoint)
        if not path.is_file():
            folder = type(predictor).__module__.split(".")[0]
            raise SystemExit(f"error: {path}: no such file" if onnx else f"error: {path}: no ONNX file beside the "
                             f"checkpoint; make it with python {folder}/export.py --checkpoint {checkpoint}")
        predictor.model = OnnxRuntimeModel(path, predictor.model, threads)
    return predictor


def export_onnx(model, example, path, dynamic_size=True):
    """Write `model` (a copy, eval) to `path`: batch dynamic, and with dynamic_size height and width (a top-down
    model's crop size is part of its architecture). The exporter's optimizer folds each BatchNorm that follows a
    convolution into it. Returns {opset, dynamic axes, BatchNorm nodes left}."""
    try:
        import onnx
    except ImportError:
        raise SystemExit("ONNX export needs the optional extra: pip install onnx onnxscript onnxruntime") from None
    model = copy.deepcopy(model).cpu().float().eval()
    with torch.no_grad():
        sequence = isinstance(model(example), (list, tuple))
    auto = torch.export.Dim.AUTO
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(model, (example,), input_names=["image"], dynamo=True, verbose=False,
                                dynamic_shapes=({0: auto, 2: auto, 3: auto} if dynamic_size else {0: auto},))
    program.model.metadata_props["outputs"] = "sequence" if sequence else "tensor"   # read by OnnxRuntimeModel
    program.save(str(path))
    saved = onnx.load(str(path))
    shape = saved.graph.input[0].type.tensor_type.shape.dim
    return {"opset": max(o.version for o in saved.opset_import if o.domain in ("", "ai.onnx")),
            "dynamic": [axis for axis, d in zip(("batch", "channels", "height", "width"), shape) if d.dim_param],
            "batchnorm_left": sum(node.op_type == "BatchNormalization" for node in saved.graph.node)}


def max_abs_diff(model, session_model, inputs) -> float:
    """Largest |torch - onnxruntime| over all outputs of every input batch."""
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            expected = model(x)
        got = session_model(x)
        expected, got = (expected, got) if isinstance(expected, (list, tuple)) else ([expected], [got])
        for e, g in zip(expected, got):
            if tuple(e.shape) != tuple(g.shape):
                raise AssertionError(f"onnxruntime output {tuple(g.shape)} != torch {tuple(e.shape)} "
                                     f"for input {tuple(x.shape)}")
            worst = max(worst, float((e.float() - g).abs().max()))
    return worst


def real_inputs(predictor, sources, count=4):
    """The network inputs the predictor's own preprocessing makes of the first `count` images of `sources`."""
    recorder = predictor.model = _InputRecorder(predictor.model)
    try:
        for source in sources:
            for _, image, _, _ in iter_inputs(source, limit=count):
                if len(recorder.inputs) < count:
                    predictor.predict(image)
    finally:
        predictor.model = recorder.model
    return recorder.inputs[:count]


def random_inputs(example, dynamic, seed=0):
    """Batches of 2 of random values: at the example's size, and 32 pixels taller and wider when those vary."""
    generator = torch.Generator().manual_seed(seed)
    _, channels, height, width = example.shape
    sizes = [(height, width)] + ([(height + 32, width + 32)] if {"height", "width"} <= set(dynamic) else [])
    return [torch.randn(2, channels, h, w, generator=generator) for h, w in sizes]


def compare_latency(predictor_model, path, example, frames, threads=2, warmup=5):
    """Median ms per batch-1 forward of the predictor's torch network and of the ONNX file, timed in alternation so
    that a change of machine load touches both alike."""
    torch.set_num_threads(threads)
    session_model = OnnxRuntimeModel(path, predictor_model, threads)
    times = [(predictor_model, []), (session_model, [])]
    with torch.inference_mode():
        for frame in range(warmup + frames):
            for model, seconds in times:
                start = time.perf_counter()
                model(example)
                if frame >= warmup:
                    seconds.append(time.perf_counter() - start)
    return [float(np.median(seconds) * 1000) for _, seconds in times]


def add_export_args(parser):
    a = parser.add_argument
    a("--checkpoint", default=None, help="checkpoint to export (default: the newest of this model)")
    a("--onnx", default=None, help="output file (default: beside the checkpoint, <checkpoint>.onnx)")
    a("--input", nargs="+", default=None, metavar="PATH",
      help="real images (or folders, videos) for the parity check (default: infer.py's built-in images)")
    a("--frames", type=at_least(0), default=30, help="timed forwards per backend for the latency line; 0 = skip "
                                             "(default: %(default)s)")
    a("--threads", type=at_least(1), default=2, help="CPU threads for the latency line (default: %(default)s)")
    a("--out", default=None, help="output root (default: $POSE_OUTPUT_ROOT, else .)")
    return parser


def export_main(args, predictor_class, model_names, train_command, builtin_inputs, dynamic_size, **reference):
    """What every <folder>/export.py runs: export the checkpoint's network as trained, check onnxruntime against it
    on random and real inputs (max |diff| <= 1e-4, else exit status 1), time it beside the torch network infer.py
    runs, and write <file>.export.json. reference: Predictor options that keep the network as trained (no folding)."""
    checkpoint = checkpoint_or_exit(args.checkpoint, model_names, train_command, args.out)
    trained = predictor_class.from_checkpoint(checkpoint, "cpu", **reference)
    network = trained.model
    real = real_inputs(trained, args.input or builtin_inputs(args, checkpoint))
    if not real:
        raise SystemExit("error: no readable image for the parity check (see --input)")
    path = Path(args.onnx) if args.onnx else onnx_path_for(checkpoint)
    report = export_onnx(network, real[0].repeat(2, 1, 1, 1), path, dynamic_size)
    session_model = OnnxRuntimeModel(path, network)
    report.update(random_max_abs_diff=max_abs_diff(network, session_model, random_inputs(real[0], report["dynamic"])),
                  real_max_abs_diff=max_abs_diff(network, session_model, real), real_inputs=len(real),
                  input_shape=list(real[0].shape))
    print(f"{path}: opset {report['opset']}, dynamic {', '.join(report['dynamic'])}, "
          f"{report['batchnorm_left']} BatchNorm nodes left; max |torch - onnxruntime| = "
          f"{report['random_max_abs_diff']:.1e} on random inputs, {report['real_max_abs_diff']:.1e} on "
          f"{len(real)} real ones ({'x'.join(map(str, real[0].shape[2:]))})")
    if args.frames:
        fast = predictor_class.from_checkpoint(checkpoint, "cpu") if reference else trained
        torch_ms, onnx_ms = compare_latency(fast.model, path, real[0], args.frames, args.threads)
        report.update(threads=args.threads, torch_ms=torch_ms, onnxruntime_ms=onnx_ms, load=os.getloadavg()[0])
        print(f"latency, batch 1, {args.threads} threads, median of {args.frames}: torch {torch_ms:.1f} ms, "
              f"onnxruntime {onnx_ms:.1f} ms (torch / onnxruntime = {torch_ms / onnx_ms:.2f}); "
              f"load average {report['load']:.1f}")
    path.with_suffix(".export.json").write_text(json.dumps({"checkpoint": str(checkpoint), **report}, indent=1))
    passed = max(report["random_max_abs_diff"], report["real_max_abs_diff"]) <= PARITY_TOLERANCE
    print(f"parity {'passed' if passed else 'FAILED'} (tolerance {PARITY_TOLERANCE:g}); "
          f"exported {checkpoint} to {path}")
    return 0 if passed else 1


def export_parser(doc):
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_export_args(parser)
