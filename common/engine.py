"""The one training loop every model folder uses, plus the shared command-line vocabulary and output layout.

Single process: `python <model>/train.py`; several GPUs (or CPU processes, gloo):
`torchrun --nproc_per_node=N <model>/train.py`. `--batch-size` is per process. `train()` does DDP, AMP,
gradient accumulation and clipping, per-step or per-epoch LR schedules, validation, TensorBoard, and
checkpoints that resume exactly (same weights as an uninterrupted run).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import math
import os
import pickle
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from common.data import collate_skip_bad, make_loader

CHECKPOINT_FORMAT = 1


# --- Command line and output folders ---------------------------------------------------------------------

def add_common_args(parser: argparse.ArgumentParser, **defaults) -> argparse.ArgumentParser:
    """Add the flags every script shares; `defaults` (by dest name, e.g. batch_size=32) override ours."""
    a = parser.add_argument
    a("--data", default=None, help="dataset folder (default: the built-in data, rendered into <root>/data/)")
    a("--ann", default=None, help="annotation file (COCO JSON / CSV) when not inside --data")
    a("--checkpoint", default=None, help="weights to evaluate / run (default: newest checkpoint of this model)")
    a("--out", default=None, help="root for data/, checkpoints/, outputs/, tensorboard_logs/ "
                                   "(default: $POSE_OUTPUT_ROOT, else the current directory)")
    a("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    a("--epochs", type=int, default=10, help="number of epochs (default: %(default)s)")
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps in all")
    a("--batch-size", type=int, default=16, help="samples per process and step (default: %(default)s)")
    a("--lr", type=float, default=1e-3, help="base learning rate (default: %(default)s)")
    a("--seed", type=int, default=0, help="seed for weights, data order and augmentation (default: %(default)s)")
    a("--workers", type=int, default=2, help="DataLoader worker processes (default: %(default)s)")
    a("--run-name", default=None, help="run folder name under checkpoints/<model>/ etc. (default: a timestamp)")
    a("--resume", default=None, metavar="PATH|auto",
      help="continue a run exactly from a checkpoint; 'auto' = newest last.pt of this model (of --run-name's run)")
    a("--init-from", default=None, metavar="CKPT", help="start from a checkpoint's weights only (fine-tuning)")
    a("--pretrained", default="none", metavar="none|imagenet|PATH",
      help="backbone weights: none (default, no network), imagenet (torch cache or download), or a file")
    a("--amp", choices=("none", "bf16", "fp16"), default="none",
      help="mixed precision autocast (fp16 adds a GradScaler); meant for CUDA (default: %(default)s)")
    a("--sync-bn", action="store_true", help="use SyncBatchNorm across processes under torchrun")
    a("--clip-grad", type=float, default=0.0, help="clip the gradient norm to this value; 0 = off (default: %(default)s)")
    a("--accumulate", type=int, default=1, help="micro-batches per optimizer step (default: %(default)s)")
    a("--val-every", default="1e", help="validate and checkpoint every N steps ('500') or N epochs ('1e'); "
                                         "'0' = only at the end (default: %(default)s)")
    a("--log-every", type=int, default=20, help="log losses and LR every N steps (default: %(default)s)")
    a("--hist-every", type=int, default=0, help="parameter/gradient histograms every N steps; 0 = off (default: %(default)s)")
    a("--keep-best", type=int, default=1, help="keep the best K checkpoints by the model's metric (default: %(default)s)")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise TypeError(f"add_common_args: unknown default(s) {unknown}")
    parser.set_defaults(**defaults)
    return parser


def parse_val_every(spec) -> tuple[str | None, int]:
    """'1e' -> ('epoch', 1); '500' -> ('step', 500); '0' / 'none' / 'end' -> (None, 0)."""
    text = str(spec).strip().lower()
    if text in ("", "0", "none", "end", "0e"):
        return None, 0
    unit = "epoch" if text.endswith("e") else "step"
    try:
        n = int(text[:-1] if unit == "epoch" else text)
    except ValueError:
        raise SystemExit(f"--val-every {spec!r}: expected N (steps) or Ne (epochs), e.g. 500 or 1e") from None
    if n < 0:
        raise SystemExit(f"--val-every {spec!r}: must not be negative")
    return (unit, n) if n else (None, 0)


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


# --- Device, distributed, RNG ----------------------------------------------------------------------------

def setup_device_and_distributed(args) -> torch.device:
    """Pick the device, join the torchrun process group if there is one, seed. Sets on `args`:
    device (str), rank, world_size, local_rank, distributed."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0)) if world > 1 else 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if world > 1 else 0
    requested = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {requested}: no CUDA device is available here; use --device cpu")
        if world > 1:
            device = torch.device("cuda", local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    args.device, args.rank, args.world_size = str(device), rank, world
    args.local_rank, args.distributed = local_rank, world > 1
    if getattr(args, "seed", None) is not None:
        seed_everything(args.seed)
    if rank == 0:
        where = f", {world} processes ({dist.get_backend()})" if world > 1 else ""
        print(f"device: {device}{where}")
    return device


def keep_freed_memory(libc_name: str = "libc.so.6") -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    By default glibc serves blocks of more than a few MB with fresh mmap()s and trims the heap on free,
    so on CPU every training step page-faults its activation tensors in again. Measured on our 2 cores,
    100 steps of simple_baseline's default run: 2.3-2.5 million minor page faults and 8.6-9.8 s of kernel
    time before, 0.39 million and 3.3-3.7 s with this (the wall-clock gain, about 2%, is within the
    machine's noise). Numerics are unchanged.
    The same as starting python with MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set, which a
    user's environment still overrides. Returns False where there is no glibc (macOS, Windows, musl).
    """
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")):
        return False   # someone tuned the allocator already (or swapped it for jemalloc/tcmalloc)
    try:
        mallopt = ctypes.CDLL(libc_name).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3    # from glibc's <malloc.h>
    # 32 MiB is glibc's largest mmap threshold: bigger blocks (checkpoint loading) still use mmap.
    return bool(mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 1 << 30)
                and mallopt(m_top_pad, 64 << 20))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel (or torch.compile) wrapper."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule":     # torch.compile; no torch._dynamo import needed
            model = model._orig_mod
        else:
            return model


def get_rng_state() -> dict:
    """RNG states as tensors and plain types, so checkpoints load with weights_only=True."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def preserved_rng():
    """Run a block (validation, image logging, DataLoader start-up) without moving the training RNGs,
    so a run that validates or restarts at step k draws the same random numbers as one that does not."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def _broadcast(obj, rank: int, world: int):
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# --- Checkpoints -----------------------------------------------------------------------------------------

def save_checkpoint(path, state: dict) -> Path:
    """Write atomically: a temporary file in the same folder, fsync, then os.replace over `path`.
    A write killed midway leaves the previous file untouched (and at worst a stray *.tmp)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise SystemExit(f"{path}: cannot load checkpoint: not a torch.save file, or it holds objects other "
                         "than tensors and plain types (refused by weights_only=True)") from None
    except Exception as error:   # truncated or corrupted zip archive, ...
        first_sentence = str(error).strip().split(". ")[0] or type(error).__name__
        raise SystemExit(f"{path}: cannot load checkpoint ({first_sentence})") from None


def newest_checkpoint(model_name: str, out=None, kind: str = "best") -> Path | None:
    """The newest run's checkpoint under <root>/checkpoints/<model_name>/ (runs ordered by their newest file).
    kind="best": that run's best.pt, else its last.pt; kind="last": its last.pt. None when there is none."""
    base = output_root(out) / "checkpoints" / model_name
    runs = [d for d in base.glob("*") if (d / "last.pt").is_file() or (d / "best.pt").is_file()]
    if not runs:
        return None
    newest = lambda d: max(p.stat().st_mtime for p in (d / "last.pt", d / "best.pt") if p.is_file())
    for run in sorted(runs, key=newest, reverse=True):
        names = ("best.pt", "last.pt") if kind == "best" else ("last.pt",)
        for name in names:
            if (run / name).is_file():
                return run / name
    return None


def checkpoint_or_exit(checkpoint, model_names, train_command: str, out=None, hint: str = "") -> Path:
    """What eval/infer scripts run on: --checkpoint when given, else the newest checkpoint of these models'
    runs (newest_checkpoint); with neither, one line saying how to get one, then exit status 1."""
    if checkpoint:
        return Path(checkpoint)
    names = (model_names,) if isinstance(model_names, str) else tuple(model_names)
    found = [path for path in (newest_checkpoint(name, out) for name in names) if path is not None]
    if found:
        return max(found, key=lambda path: path.stat().st_mtime)
    print(f"no {' or '.join(names)} checkpoint under {output_root(out) / 'checkpoints'}: train one with "
          f"`{train_command}` or pass --checkpoint FILE{hint}", file=sys.stderr)
    raise SystemExit(1)


def load_weights(model: nn.Module, path) -> None:
    """--init-from: copy every tensor whose name and shape match; say what was left out (fine-tuning
    usually swaps a head). Stops when nothing matches, which means the wrong file."""
    state = load_checkpoint(path)
    weights = state.get("model", state)
    own = unwrap(model).state_dict()
    matched = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise SystemExit(f"--init-from {path}: no weights match this model")
    unwrap(model).load_state_dict(matched, strict=False)
    skipped = len(weights) - len(matched)
    missing = len(own) - len(matched)
    print(f"init-from {path}: loaded {len(matched)} tensors ({skipped} in the file unused, "
          f"{missing} of the model's left at their initial values)")


def _plain(value):
    """vars(args) as types a weights_only load accepts."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _extra_state_dict(extra):
    if extra is None or hasattr(extra, "state_dict"):
        return None if extra is None else extra.state_dict()
    return {name: obj.state_dict() for name, obj in extra.items()}


def _load_extra_state_dict(extra, state) -> None:
    if extra is None or state is None:
        return
    pairs = [(extra, state)] if hasattr(extra, "load_state_dict") else [(o, state[n]) for n, o in extra.items()]
    for obj, obj_state in pairs:
        obj.load_state_dict(obj_state)


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# --- The loop --------------------------------------------------------------------------------------------

def _resume_path(args, model_name: str, verbose: bool = True) -> Path | None:
    """--resume PATH, or for 'auto' the newest last.pt of this model (of --run-name's run when given)."""
    if not args.resume:
        return None
    if args.resume != "auto":
        return Path(args.resume)
    if args.run_name:
        path = output_dirs(model_name, args.run_name, args.out)["checkpoints"] / "last.pt"
        path = path if path.is_file() else None
    else:
        path = newest_checkpoint(model_name, args.out, kind="last")
    if path is None and verbose:
        print(f"--resume auto: no last.pt under {output_root(args.out) / 'checkpoints' / model_name}"
              f"{'/' + args.run_name if args.run_name else ''}; starting fresh")
    return path


def run_dirs(args, model_name: str) -> dict[str, Path]:
    """output_dirs() of the run train() will write: --run-name, else the run being resumed, else a timestamp
    (rank 0's under torchrun). Sets args.run_name, so a script can put its own outputs beside the run's."""
    if not hasattr(args, "world_size"):
        setup_device_and_distributed(args)
    if args.run_name is None:
        resume_path = _resume_path(args, model_name, verbose=False)
        resumed_here = resume_path is not None and resume_path.parent.parent.name == model_name
        name = resume_path.parent.name if resumed_here else time.strftime("%Y%m%d-%H%M%S")
        args.run_name = _broadcast(name, args.rank, args.world_size)
    return output_dirs(model_name, args.run_name, args.out)


def _rank_best(best: list[dict], step: int, value: float, keep: int, higher_is_better: bool):
    """Best-k bookkeeping: returns (new list, file name to write or None, entries that fell out)."""
    entry = {"file": f"best_step{step:08d}.pt", "step": step, "value": float(value)}
    # sorted() is stable, so on a tie the older checkpoint stays ahead
    ranked = sorted(best + [entry], key=lambda e: -e["value"] if higher_is_better else e["value"])
    if entry not in ranked[:keep]:
        return best, None, []
    return ranked[:keep], entry["file"], ranked[keep:]


def _stop_if_not_finite(loss, parts: dict, *, step: int, epoch: int, last_checkpoint: Path, world: int) -> None:
    """Every rank calls this before backward; all stop together when any rank's loss is inf/nan."""
    local_bad = not bool(torch.isfinite(loss.detach()).all())
    bad = torch.tensor(float(local_bad), device=loss.device)
    if world > 1:
        dist.all_reduce(bad)
    if bad.item() == 0:
        return
    names = [n for n, v in parts.items() if not math.isfinite(float(v))] or ["loss"]
    what = f"{', '.join(names)} = {float(loss.detach().float().sum()):g}" if local_bad else "on another rank"
    where = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint.is_file()
             else "no checkpoint was written yet")
    raise SystemExit(f"non-finite loss at step {step} (epoch {epoch}): {what}; stopping, {where}")


def _log_training(writer, sums: dict, count: int, optimizer, grad_norm, step: int, world: int, device) -> None:
    """Mean losses over the last `count` micro-batches and all ranks, plus LR; collective on every rank."""
    names = sorted(sums)
    means = torch.tensor([sums[n] / count for n in names], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(means)
        means /= world
    if writer is None:
        return
    for name, value in zip(names, means.tolist()):
        writer.add_scalar("loss/train" if name == "loss" else f"loss/{name}", value, step)
    for i, group in enumerate(optimizer.param_groups):
        writer.add_scalar("lr" if i == 0 else f"lr/group{i}", group["lr"], step)
    if grad_norm is not None:
        writer.add_scalar("grad_norm", float(grad_norm), step)


def _write_histograms(writer, model: nn.Module, step: int) -> None:
    for name, p in model.named_parameters():
        writer.add_histogram(f"params/{name}", p.detach().float().cpu(), step)
        if p.grad is not None:
            writer.add_histogram(f"grads/{name}", p.grad.detach().float().cpu(), step)


def planned_steps(args, num_samples: int) -> int:
    """Optimizer steps `train` will take over `num_samples` training samples, for schedules that span the run:
    full batches only (the last partial one is dropped) over all processes, --accumulate micro-batches per
    step (an epoch's leftover micro-batches make one more), and whichever of --epochs / --max-steps ends first."""
    per_epoch = max(num_samples // (args.batch_size * getattr(args, "world_size", 1)), 1)
    per_epoch = math.ceil(per_epoch / max(1, args.accumulate))
    limits = [n for n in (args.epochs and args.epochs * per_epoch, args.max_steps) if n]
    if not limits:
        raise SystemExit("give --epochs or --max-steps")
    return min(limits)


def train(args, model: nn.Module, train_set, compute_loss, optimizer, *, scheduler=None,
          scheduler_interval: str = "epoch", evaluate=None, best_metric: str | None = None,
          higher_is_better: bool = True, collate_fn=None, extra_state=None, log_images=None,
          model_name: str, find_unused_parameters: bool = False, early_stopping_patience: int | None = None):
    """Train `model` on `train_set`; returns (unwrapped model, summary dict).

    compute_loss(model, batch) -> (loss tensor, {name: float}): `model` may be the DDP wrapper, so call it,
        don't reach into its attributes (use unwrap(model)). Batches are dicts already on the device.
    evaluate(model) -> {metric: float}: runs on rank 0 with the plain model in eval mode.
    log_images(model, batch) -> {name: HxWx3 uint8}: rank 0, eval mode, no grad, after each validation.
    extra_state: an object with state_dict()/load_state_dict(), or a dict of them, saved in checkpoints.
    early_stopping_patience: stop after this many validations in a row without a new best `best_metric`.
    """
    if scheduler_interval not in ("epoch", "step"):
        raise ValueError(f"scheduler_interval must be 'epoch' or 'step', not {scheduler_interval!r}")
    if not hasattr(args, "world_size"):
        setup_device_and_distributed(args)
    device, rank, world = torch.device(args.device), args.rank, args.world_size
    is_main = rank == 0
    if args.max_steps is None and args.epochs is None:
        raise SystemExit("give --epochs or --max-steps")
    val_unit, val_every = parse_val_every(args.val_every)
    accumulate = max(1, args.accumulate)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    if amp_dtype is not None and device.type != "cuda" and is_main:
        print(f"--amp {args.amp} on {device}: CPU autocast works but is rarely faster; it is there for tests")

    resume_path = _resume_path(args, model_name, verbose=is_main)
    dirs = run_dirs(args, model_name)     # a resumed run keeps writing into its own run folder
    ckpt_dir = dirs["checkpoints"]

    if device.type == "cpu":
        keep_freed_memory()
    model.to(device)
    if args.sync_bn and world > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif is_main:   # PyTorch's SyncBatchNorm runs on GPUs only
            print("--sync-bn: SyncBatchNorm needs CUDA; keeping per-process BatchNorm on CPU")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    epoch = step = batch_in_epoch = 0     # batch_in_epoch: micro-batches of this epoch already trained on
    best: list[dict] = []                 # [{"file", "step", "value"}], best first
    metrics: dict = {}
    stale, best_value = 0, None           # early stopping: validations since best_metric last improved
    rng_state = None
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        if ckpt.get("model_name") != model_name or "optimizer" not in ckpt:
            raise SystemExit(f"--resume {resume_path}: not a {model_name} training checkpoint "
                             f"(model_name {ckpt.get('model_name')!r}); use --init-from for weights only")
        unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt["scheduler"] is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        _load_extra_state_dict(extra_state, ckpt["extra"])
        epoch, step, batch_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]
        best, metrics = ckpt["best"], ckpt["metrics"]
        stale, best_value = ckpt["early_stopping"]["stale"], ckpt["early_stopping"]["best_value"]
        rng_state = ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0]
        if is_main:
            if ckpt["world_size"] != world or ckpt["config"].get("batch_size") != args.batch_size:
                print("warning: resuming with another number of processes or batch size; "
                      "the data order will differ from the interrupted run's")
            if args.init_from:
                print(f"--init-from {args.init_from} ignored: resuming from {resume_path}")
            print(f"resumed {resume_path} at epoch {epoch}, step {step}")
    elif args.init_from:
        load_weights(model, args.init_from)
    ddp_model = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters)

    loader = make_loader(train_set, batch_size=args.batch_size, shuffle=True, workers=args.workers,
                         seed=args.seed, collate_fn=collate_fn or collate_skip_bad,
                         num_replicas=world, rank=rank, drop_last=True)
    if rng_state is not None:
        set_rng_state(rng_state)
    else:
        seed_everything(args.seed + rank)   # ranks draw different dropout masks, all from (seed, rank)

    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter  # slow import, rank 0 only
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        # purge_step drops the events a crashed run logged after its last checkpoint
        writer = SummaryWriter(str(dirs["tensorboard"]), purge_step=step if resume_path else None)

    last_saved = last_validated = last_batch = None

    def save(new_metrics: dict | None = None) -> None:
        """last.pt, plus a best-k file when `new_metrics` makes the cut. Every rank calls it (RNG gather)."""
        nonlocal best, last_saved
        if last_saved == (epoch, batch_in_epoch, step) and new_metrics is None:
            return
        last_saved = (epoch, batch_in_epoch, step)
        value = (new_metrics or {}).get(best_metric) if best_metric else None
        new_file, dropped = None, []
        if value is not None and math.isfinite(value) and args.keep_best > 0:
            best, new_file, dropped = _rank_best(best, step, value, args.keep_best, higher_is_better)
        state = {"format": CHECKPOINT_FORMAT, "model_name": model_name, "model": unwrap(model).state_dict(),
                 "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                 "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "world_size": world,
                 "rng": _gather(get_rng_state(), world), "best": best, "metrics": metrics,
                 "early_stopping": {"stale": stale, "best_value": best_value},
                 "best_metric": best_metric, "config": _plain(vars(args)), "extra": _extra_state_dict(extra_state)}
        if not is_main:
            return
        if new_file:
            save_checkpoint(ckpt_dir / new_file, state)
            for entry in dropped:
                (ckpt_dir / entry["file"]).unlink(missing_ok=True)
            if best[0]["file"] == new_file:
                save_checkpoint(ckpt_dir / "best.pt", state)
        save_checkpoint(ckpt_dir / "last.pt", state)

    def validate() -> bool:
        """Evaluate, log and checkpoint; True when early stopping says the run is over."""
        nonlocal metrics, last_validated, stale, best_value
        last_validated = (epoch, batch_in_epoch, step)
        new = None
        if is_main and evaluate is not None:
            model.eval()
            with preserved_rng():
                new = {name: float(value) for name, value in evaluate(unwrap(model)).items()}
                if log_images is not None and last_batch is not None:
                    with torch.no_grad():
                        for name, image in log_images(unwrap(model), last_batch).items():
                            writer.add_image(name, image, step, dataformats="HWC")
            model.train()
            for name, value in new.items():  # a name with a '/' ("loss/val") is already a full tag
                writer.add_scalar(name if "/" in name else f"metrics/{name}", value, step)
            print(f"epoch {epoch} step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in new.items()))
        new = _broadcast(new, rank, world)
        if new is not None:
            metrics = new
        value = (new or {}).get(best_metric) if best_metric else None
        if value is not None and math.isfinite(value):
            improved = best_value is None or (value > best_value if higher_is_better else value < best_value)
            best_value, stale = (value, 0) if improved else (best_value, stale + 1)
        save(new)
        if early_stopping_patience is not None and stale >= early_stopping_patience:
            if is_main:
                print(f"early stopping: {best_metric} has not improved in {stale} validations")
            return True
        return False

    # With workers=0 the dataset's per-sample seeding runs in this process: keep it off the training RNG.
    loading_rng = preserved_rng if args.workers == 0 else contextlib.nullcontext
    sums, count, num_skipped, micro_in_step, last_loss = {}, 0, 0, 0, float("nan")
    pbar = None
    model.train()
    stop_early = False
    try:
        while (args.epochs is None or epoch < args.epochs) and (args.max_steps is None or step < args.max_steps) \
                and not stop_early:
            loader.sampler.set_epoch(epoch, start_index=batch_in_epoch * args.batch_size)
            with preserved_rng():       # starting the workers draws a base seed from the global RNG
                batches = iter(loader)
            pbar = tqdm(total=len(loader) + batch_in_epoch, initial=batch_in_epoch, desc=f"epoch {epoch}",
                        disable=not is_main, dynamic_ncols=True, leave=False)
            # One batch of look-ahead tells which batch ends the epoch: a partial accumulation window
            # there still gets its optimizer step (with gradients synced across ranks).
            with loading_rng():
                upcoming = next(batches, None)
            if upcoming is None and batch_in_epoch == 0:
                raise SystemExit(f"the training set yields no batches ({len(train_set)} samples, "
                                 f"batch size {args.batch_size} x {world} processes)")
            stopped_mid_epoch = False
            while upcoming is not None:
                batch = upcoming
                with loading_rng():
                    upcoming = next(batches, None)
                num_skipped += int(batch.pop("num_skipped", 0))
                batch_in_epoch += 1
                pbar.update(1)
                if batch:
                    batch = _to_device(batch, device)
                    micro_in_step += 1
                    take_step = micro_in_step == accumulate or upcoming is None
                    no_sync = ddp_model.no_sync if world > 1 and not take_step else contextlib.nullcontext
                    with no_sync():
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                            out = compute_loss(ddp_model, batch)
                        loss, parts = out if isinstance(out, tuple) else (out, {})
                        _stop_if_not_finite(loss, parts, step=step + 1, epoch=epoch,
                                            last_checkpoint=ckpt_dir / "last.pt", world=world)
                        scaler.scale(loss / accumulate).backward()
                    last_loss, last_batch = float(loss.detach()), batch
                    for name, value in {"loss": last_loss, **parts}.items():
                        sums[name] = sums.get(name, 0.0) + float(value)
                    count += 1
                elif world > 1:     # the ranks would fall out of step
                    raise SystemExit(f"rank {rank}: a whole batch of unreadable samples at step {step + 1}; "
                                     "fix or remove the files named in the warnings above")
                else:               # all samples unreadable (warned about): nothing to learn from
                    take_step = micro_in_step > 0 and upcoming is None
                if not take_step:
                    continue

                grad_norm = None
                if args.clip_grad > 0:
                    scaler.unscale_(optimizer)
                    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                step, micro_in_step = step + 1, 0
                if is_main and args.hist_every and step % args.hist_every == 0:
                    _write_histograms(writer, unwrap(model), step)
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None and scheduler_interval == "step":
                    scheduler.step()
                if args.log_every and step % args.log_every == 0 and count:
                    _log_training(writer, sums, count, optimizer, grad_norm, step, world, device)
                    sums, count = {}, 0
                pbar.set_postfix(step=step, loss=f"{last_loss:.4g}")
                if args.max_steps is not None and step >= args.max_steps:
                    stopped_mid_epoch = upcoming is not None
                    break
                if val_unit == "step" and step % val_every == 0 and validate():
                    stop_early, stopped_mid_epoch = True, upcoming is not None
                    break
            pbar.close()
            if stopped_mid_epoch:
                break
            epoch, batch_in_epoch = epoch + 1, 0
            if scheduler is not None and scheduler_interval == "epoch":
                scheduler.step()
            if val_unit == "epoch" and epoch % val_every == 0:
                stop_early = validate()
            else:
                save()
        # A last validation unless this very state was just validated; last.pt always ends at the final state.
        if evaluate is not None and last_validated != (epoch, batch_in_epoch, step):
            validate()
        else:
            save()
    finally:
        if pbar is not None:
            pbar.close()
        if writer is not None:
            writer.close()

    if world > 1:
        # Each rank's last forward updated its own BatchNorm statistics; end with rank 0's (the ones its
        # checkpoint holds) everywhere, as DDP itself would at the next forward.
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer.data, src=0)
        skipped = torch.tensor(num_skipped, device=device)
        dist.all_reduce(skipped)
        num_skipped = int(skipped.item())
        dist.barrier()
    summary = {"steps": step, "epochs": epoch, "metrics": metrics, "num_skipped": num_skipped,
               "last_checkpoint": ckpt_dir / "last.pt",
               "best_checkpoint": ckpt_dir / best[0]["file"] if best else None,
               "tensorboard": dirs["tensorboard"], "run_name": dirs["run_name"]}
    if is_main:
        if num_skipped:
            print(f"skipped {num_skipped} bad samples (see the warnings above)")
        print(f"trained {step} steps; checkpoints in {ckpt_dir}, TensorBoard logs in {dirs['tensorboard']}")
    return unwrap(model), summary
