"""Runs: the command-line vocabulary every script shares, where a run's files go, the device and process group,
and checkpoints. A checkpoint loads with `torch.load(weights_only=True)`; besides the training state (engine.py)
it holds `model_name`, `arch` (the keywords of the folder's `build_model`) and `settings` (input size, stride,
sigma, keypoint layout ...), so eval and infer rebuild the model from the file alone, as nanoGPT's sample.py does.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import os
import pickle
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common.data import sha256_of

CHECKPOINT_FORMAT = 2   # 2 stores "arch" and "settings"; 1 (before issue 18) kept them inside "config"


def add_common_args(parser: argparse.ArgumentParser, role: str = "train", **defaults) -> argparse.ArgumentParser:
    """Add the flags scripts share (role "train", "eval" or "infer"); `defaults` by dest name (batch_size=32)
    replace ours."""
    a = parser.add_argument
    if role == "infer":
        a("--input", nargs="+", default=None, metavar="PATH",
          help="images, folders of images or videos (default: a few built-in validation images)")
        a("--limit", type=at_least(1), default=None, help="at most N images from each folder (default: all)")
        a("--threshold", type=float, default=0.0, help="draw joints scoring above this (default: %(default)s)")
        a("--backend", choices=("torch", "onnxruntime"), default="torch",
          help="run the network in torch, or its ONNX file (<folder>/export.py) in onnxruntime (default: torch)")
        a("--onnx", default=None, help="ONNX file for --backend onnxruntime (default: <checkpoint>.onnx)")
        a("--camera", type=at_least(0), default=None, metavar="N",
          help="run live on OpenCV camera N (instead of --input)")
        a("--live", default=None, metavar="URL|VIDEO",
          help="run live on a stream URL, or a video file paced at its frame rate as a camera stands in")
        a("--show", action="store_true", help="with --camera/--live, also show the frames in a window (needs a GUI "
                                              "OpenCV; q stops)")
    else:
        a("--data", default=None, help="dataset folder (default: the built-in data, rendered into <root>/data/)")
        a("--ann", default=None, help="annotation file (COCO JSON / CSV) when not inside --data")
    a("--checkpoint", default=None, help="weights to evaluate / run (default: newest checkpoint of this model)")
    a("--out", default=None, help="root for data/, checkpoints/, outputs/, tensorboard_logs/ "
                                   "(default: $POSE_OUTPUT_ROOT, else the current directory)")
    a("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    a("--run-name", default=None, help="run folder name under checkpoints/<model>/ etc. (default: a timestamp)")
    if role != "infer":
        a("--batch-size", type=at_least(1), default=16, help="samples per process and step (default: %(default)s)")
        a("--workers", type=at_least(0), default=2, help="DataLoader worker processes (default: %(default)s)")
    if role == "train":
        a("--epochs", type=at_least(1), default=10, help="number of epochs (default: %(default)s)")
        a("--max-steps", type=at_least(0), default=None, help="stop after this many optimizer steps in all")
        a("--lr", type=at_least(0.0, above=True), default=1e-3, help="base learning rate (default: %(default)s)")
        a("--seed", type=int, default=0, help="seed for weights, data order and augmentation (default: %(default)s)")
        a("--resume", default=None, metavar="PATH|RUN|newest|auto",
          help="continue a run exactly from a checkpoint: a file, a run name of this model (its last.pt), newest "
               "(the newest last.pt), or auto (as newest, of --run-name's run when given; none: start fresh)")
        a("--init-from", default=None, metavar="PATH|RUN|newest",
          help="start from a checkpoint's weights only (fine-tuning): a file, a run name of this model (its best.pt, "
               "else last.pt) or newest (the newest run's)")
        a("--pretrained", default="none", metavar="none|imagenet|PATH",
          help="backbone weights: none (default, no network), imagenet (torch cache or download), or a file")
        a("--amp", choices=("none", "bf16", "fp16"), default="none",
          help="mixed precision autocast (fp16 adds a GradScaler); meant for CUDA (default: %(default)s)")
        a("--sync-bn", action="store_true", help="use SyncBatchNorm across processes under torchrun")
        a("--clip-grad", type=at_least(0.0), default=0.0,
          help="clip the gradient norm to this value; 0 = off (default: %(default)s)")
        a("--accumulate", type=at_least(1), default=1, help="micro-batches per optimizer step (default: %(default)s)")
        a("--val-every", default="1e", help="validate and checkpoint every N steps ('500') or N epochs ('1e'); "
                                             "'0' = only at the end (default: %(default)s)")
        a("--log-every", type=at_least(0), default=20, help="log losses and LR every N steps (default: %(default)s)")
        a("--hist-every", type=at_least(0), default=0,
          help="parameter/gradient histograms every N steps; 0 = off (default: %(default)s)")
        a("--keep-best", type=at_least(0), default=1,
          help="keep the best K checkpoints by the model's metric (default: %(default)s)")
    set_known_defaults(parser, defaults, "add_common_args")
    return parser


def at_least(low, above=False):
    """argparse type: a number (int when `low` is) >= low, or > low when `above`; `--batch-size -4` is a usage
    line at parse time, not a traceback from deep inside the DataLoader."""
    def number(text):
        value = type(low)(text)
        if value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"{text} is not {'above' if above else 'at least'} {low}")
        return value
    number.__name__ = type(low).__name__    # argparse names it in "invalid int value: 'x'"
    return number


def set_known_defaults(parser, defaults: dict, what: str) -> None:
    """parser.set_defaults, refusing a name no flag has (a typo would silently change nothing)."""
    unknown = sorted(set(defaults) - {action.dest for action in parser._actions})
    if unknown:
        raise TypeError(f"{what}: no flag for {unknown}")
    parser.set_defaults(**defaults)


def parse_with_preset(parser, presets: dict, argv=None, default: str = "cpu", default_with_data: str | None = None):
    """The one preset mechanism: `--preset NAME` picks a plain dict of defaults (near the top of train.py), set
    before the real parse so --help shows them and flags override them. default_with_data: the preset with --data."""
    parser.add_argument("--preset", choices=sorted(presets), default=default,
                        help="defaults to start from (flags given override them) (default: %(default)s)")
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", choices=sorted(presets), default=None)
    first.add_argument("--data", default=None)
    known = first.parse_known_args(argv)[0]
    name = known.preset or (default_with_data if known.data and default_with_data else default)
    set_known_defaults(parser, {"preset": name, **presets[name]}, f"preset {name!r}")
    return parser.parse_args(argv)


def output_root(out=None) -> Path:
    return Path(out or os.environ.get("POSE_OUTPUT_ROOT") or os.getcwd())


def output_dirs(model_name: str, run_name: str | None = None, out=None) -> dict[str, Path]:
    """Paths (not created) of a run: root, data (shared by models), checkpoints, outputs, tensorboard."""
    root = output_root(out)
    run = run_name or time.strftime("%Y%m%d-%H%M%S")
    return {"root": root, "run_name": run, "data": root / "data",
            "checkpoints": root / "checkpoints" / model_name / run,
            "outputs": root / "outputs" / model_name / run,
            "tensorboard": root / "tensorboard_logs" / model_name / run}


def data_dir(out=None) -> Path:
    """<root>/data: the built-in data sets and caches every model shares."""
    return output_root(out) / "data"


def checkpoint_from_spec(spec, model_name: str, out=None, names=("best.pt", "last.pt"), flag="--init-from") -> Path:
    """A checkpoint named on the command line: a file, `newest` (the newest run of this model that has one of
    `names`) or a run name (the first of `names` in that run); else one line saying what was looked for."""
    if Path(spec).is_file():
        return Path(spec)
    if spec == "newest":
        found, where = newest_checkpoint(model_name, out, names), output_root(out) / "checkpoints" / model_name
    else:
        where = output_dirs(model_name, spec, out)["checkpoints"]
        found = next((where / name for name in names if (where / name).is_file()), None)
    if found is None:
        raise SystemExit(f"{flag} {spec}: no such file, and no {' or '.join(names)} in {where}")
    return found


def resume_path(args, model_name: str, verbose: bool = True) -> Path | None:
    """--resume PATH|RUN|newest (checkpoint_from_spec, last.pt), or for 'auto' the newest last.pt of this model (of
    --run-name's run when given), None when there is none."""
    if not args.resume:
        return None
    if args.resume != "auto":
        return checkpoint_from_spec(args.resume, model_name, args.out, ("last.pt",), "--resume")
    if args.run_name:
        path = output_dirs(model_name, args.run_name, args.out)["checkpoints"] / "last.pt"
        path = path if path.is_file() else None
    else:
        path = newest_checkpoint(model_name, args.out, names=("last.pt",))
    if path is None and verbose:
        print(f"--resume auto: no last.pt under {output_root(args.out) / 'checkpoints' / model_name}"
              f"{'/' + args.run_name if args.run_name else ''}; starting fresh")
    return path


def run_dirs(args, model_name: str) -> dict[str, Path]:
    """output_dirs() of the run training writes: --run-name, else the resumed run's, else rank 0's timestamp;
    sets args.run_name, so a script can put its own outputs beside the run's."""
    if not hasattr(args, "world_size"):
        setup_device_and_distributed(args)
    if args.run_name is None:
        path = resume_path(args, model_name, verbose=False)
        resumed_here = path is not None and path.parent.parent.name == model_name
        name = path.parent.name if resumed_here else time.strftime("%Y%m%d-%H%M%S")
        args.run_name = broadcast_object(name, args.rank, args.world_size)
    return output_dirs(model_name, args.run_name, args.out)


def pick_device(requested=None) -> torch.device:
    """--device, else CUDA when there is one; a CUDA request without CUDA stops with one line."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {requested}: no CUDA device is available here; use --device cpu")
    return device


def end_process_group():
    """At exit, on CPUs (gloo): wait up to a minute for every rank, then leave. A rank 0 that left while another
    rank still talked to the store it hosts was now and then aborted (torchrun with a c10d rendezvous, two
    single-process nodes on one machine: about 1 run in 8 without a wait, none in 24 with one); a rank that never
    comes delays the exit only."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        with contextlib.suppress(RuntimeError):
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    dist.destroy_process_group()


def setup_device_and_distributed(args) -> torch.device:
    """Pick the device, join the torchrun process group if there is one, seed; sets args.device (a str), rank,
    world_size, local_rank and distributed."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0)) if world > 1 else 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if world > 1 else 0
    device = pick_device(getattr(args, "device", None))
    if device.type == "cuda":
        if world > 1:
            device = torch.device("cuda", local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        atexit.register(end_process_group)
    args.device, args.rank, args.world_size = str(device), rank, world
    args.local_rank, args.distributed = local_rank, world > 1
    if getattr(args, "seed", None) is not None:
        seed_everything(args.seed)
    if rank == 0:
        where = f", {world} processes ({dist.get_backend()})" if world > 1 else ""
        print(f"device: {device}{where}")
    return device


@contextlib.contextmanager
def local_main_first(args):
    """For built-in data: each machine's local rank 0 runs the block first (renders into its output root, whether
    machines share it or not; renders write a temporary folder and rename it, so two at once are safe), then the
    machine's other processes run it and find the data there."""
    distributed = getattr(args, "distributed", False)
    if distributed and args.local_rank != 0:
        dist.barrier()
    yield
    if distributed and args.local_rank == 0:
        dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def broadcast_object(obj, rank: int, world: int):
    """Rank 0's `obj` on every rank."""
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_checkpoint(path, state: dict) -> Path:
    """Write atomically (a temporary file beside it, fsync, os.replace): a write killed midway leaves the previous
    file untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as file:   # a file object: a full disk is OSError ENOSPC, not torch's "enforce fail"
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        # a write that failed partway surfaces as torch's RuntimeError, the OSError as its context
        cause = next((e for e in (error, error.__context__) if isinstance(e, OSError)), None)
        if cause is None:
            raise
        kept = f"; the previous {path.name} is kept" if path.is_file() else ""
        raise OSError(cause.errno, f"cannot save checkpoint ({cause.strerror}){kept}", str(path)) from None
    return path


def load_tensors(path):
    """torch.load(weights_only=True) to the CPU, without torch's warning about the pickle protocol of a plain
    pickle that it then refuses anyway (the caller's one-line error says so)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path) -> dict:
    """torch.load(weights_only=True); a missing or unreadable file stops with one line."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: no such checkpoint")
    try:
        return load_tensors(path)
    except pickle.UnpicklingError:
        raise SystemExit(f"{path}: cannot load checkpoint: not a torch.save file, or it holds objects other "
                         "than tensors and plain types (refused by weights_only=True)") from None
    except Exception as error:   # truncated or corrupted zip archive, ...
        first_sentence = str(error).strip().split(". ")[0] or type(error).__name__
        raise SystemExit(f"{path}: cannot load checkpoint: truncated or damaged ({first_sentence})") from None


def is_training_file(path, settings: dict, warn: bool = False) -> bool:
    """Whether annotation file `path` holds what a checkpoint (its `settings`) trained on (engine.fit stores the
    sha256 of --ann), however its path is spelled; `warn`: say that the scores are then on training images."""
    trained_on = settings.get("train_ann_sha256")
    found = bool(trained_on) and Path(path).is_file() and sha256_of(path) == trained_on
    if found and warn:
        print(f"warning: {path} is the annotation file this checkpoint was trained on: the scores below are on "
              "training images")
    return found


def newest_checkpoint(model_name: str, out=None, names=("best.pt", "last.pt")) -> Path | None:
    """The first of `names` in the newest run under <root>/checkpoints/<model_name>/ that has one (runs ordered
    by their newest best.pt or last.pt), or None."""
    files = lambda run: [path for path in (run / "best.pt", run / "last.pt") if path.is_file()]
    runs = [run for run in (output_root(out) / "checkpoints" / model_name).glob("*") if files(run)]
    runs.sort(key=lambda run: max(path.stat().st_mtime for path in files(run)), reverse=True)
    return next((run / name for run in runs for name in names if (run / name).is_file()), None)


def checkpoint_or_exit(checkpoint, model_names, train_command: str, out=None, hint: str = "") -> Path:
    """--checkpoint, else the newest checkpoint of these models' runs; with neither, one line saying how to get
    one and exit status 1."""
    if checkpoint:
        return Path(checkpoint)
    names = (model_names,) if isinstance(model_names, str) else tuple(model_names)
    found = [path for path in (newest_checkpoint(name, out) for name in names) if path is not None]
    if found:
        return max(found, key=lambda path: path.stat().st_mtime)
    print(f"no {' or '.join(names)} checkpoint under {output_root(out) / 'checkpoints'}: train one with "
          f"`{train_command}` or pass --checkpoint FILE{hint}", file=sys.stderr)
    raise SystemExit(1)


def require(mapping: dict, key: str, source) -> object:
    """mapping[key], or one line naming the file and the missing key: a checkpoint never falls back to a default."""
    if not isinstance(mapping, dict) or key not in mapping:
        raise SystemExit(f"{source}: checkpoint has no '{key}' (written by another program, or damaged)")
    return mapping[key]


def model_from_checkpoint(path, build_model, model_names, upgrade=None, device="cpu", checkpoint=None):
    """(model in eval mode, checkpoint): build_model(**checkpoint["arch"]) with its weights. upgrade(checkpoint,
    path) turns a format-1 checkpoint (arch and settings inside "config") into this one; `checkpoint`: the file's
    contents when the caller has read them already."""
    checkpoint = load_checkpoint(path) if checkpoint is None else checkpoint
    names = (model_names,) if isinstance(model_names, str) else tuple(model_names)
    owner = checkpoint.get("model_name") if isinstance(checkpoint, dict) else None
    if owner not in names:
        raise SystemExit(f"{path}: not a {' or '.join(names)} checkpoint (it belongs to {owner or 'an unknown model'})")
    if checkpoint.get("format", 1) < CHECKPOINT_FORMAT:
        if upgrade is None:
            raise SystemExit(f"{path}: checkpoint format {checkpoint.get('format', 1)} is too old for {owner}")
        checkpoint = upgrade(checkpoint, path)
    model = build_model(**require(checkpoint, "arch", path))
    try:
        model.load_state_dict(require(checkpoint, "model", path))
    except RuntimeError as error:
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise SystemExit(f"{path}: weights do not fit the model built from its arch ({detail})") from None
    return model.to(device).eval(), checkpoint


def load_weights(model, path) -> None:
    """--init-from: copy every tensor whose name and shape match (fine-tuning swaps heads); none is the wrong file."""
    state = load_checkpoint(path)
    weights = state.get("model", state)
    own = model.state_dict()
    matched = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise SystemExit(f"--init-from {path}: no weights match this model")
    model.load_state_dict(matched, strict=False)
    skipped = len(weights) - len(matched)
    missing = len(own) - len(matched)
    print(f"init-from {path}: loaded {len(matched)} tensors ({skipped} in the file unused, "
          f"{missing} of the model's left at their initial values)")


def plain(value):
    """A value as types a weights_only load accepts (vars(args) in checkpoints)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return str(value)
