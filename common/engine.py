"""The training loop every model folder shares: `fit`, made of small steps around one `Run` object.

    model, summary = fit(args, model, train_set, compute_loss, optimizer, model_name=..., arch=..., settings=...)
One process (`python <model>/train.py`) or several (`torchrun --nproc_per_node=N <model>/train.py`): DDP, AMP,
gradient accumulation and clipping, schedules per step or epoch, validation with early stopping, TensorBoard,
best-k checkpoints, and --resume that ends with the weights of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import random
import shlex
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.data import sha256_of
from common.loader import collate_skip_bad, make_loader
from common.runs import (CHECKPOINT_FORMAT, broadcast_object, checkpoint_from_spec, load_checkpoint, load_weights, plain,
                         resume_path, run_dirs, save_checkpoint, seed_everything, setup_device_and_distributed)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COUNTERS = ("epoch", "step", "batch_in_epoch", "best", "metrics", "early_stopping")   # what --resume restores
RESUME_ONLY = ("optimizer", "scheduler", "scaler", "rng")     # in last.pt, not in the best files


@dataclass
class Run:
    """One training run: what fit was given, where it writes, and the counters its checkpoints carry."""
    args: object
    model: nn.Module                 # the plain model (checkpoints, evaluation)
    optimizer: torch.optim.Optimizer
    scheduler: object
    scheduler_interval: str          # "step" or "epoch"
    compute_loss: object
    evaluate: object
    log_images: object
    model_name: str
    arch: dict                       # build_model(**arch) rebuilds the model
    settings: dict                   # input size, stride, sigma, layout ...: what eval and infer decode with
    best_metric: str | None
    higher_is_better: bool
    patience: int | None             # early stopping: validations without a new best
    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0          # micro-batches of this epoch already trained on
    best: list = field(default_factory=list)        # best-k checkpoints [{"file", "step", "value"}], best first
    metrics: dict = field(default_factory=dict)
    early_stopping: dict = field(default_factory=lambda: {"stale": 0, "best_value": None})
    device: torch.device = None      # from here on: set by start_run, or this process's bookkeeping
    rank: int = 0
    world: int = 1
    dirs: dict = None
    val_every: tuple = None          # ("step" | "epoch" | None, N)
    ddp_model: nn.Module = None      # what the loss calls: the DDP wrapper under torchrun, else the model
    scaler: torch.amp.GradScaler = None
    writer: SummaryWriter | None = None
    resumed_rng: dict | None = None
    stopped: bool = False            # early stopping ended the run
    loss_sums: dict = field(default_factory=dict)   # since the last logged step
    loss_count: int = 0
    last_loss: float = float("nan")
    last_batch: dict | None = None   # what log_images draws
    num_skipped: int = 0
    last_saved: tuple | None = None
    last_validated: tuple | None = None
    signal_received: int = 0         # SIGINT / SIGTERM number, set by the handler
    stop_signal: int = 0             # the same, agreed on by every rank: stop after this step

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def position(self):
        return self.epoch, self.batch_in_epoch, self.step


def fit(args, model: nn.Module, train_set, compute_loss, optimizer, *, model_name: str, arch: dict,
        settings: dict, scheduler=None, scheduler_interval: str = "epoch", evaluate=None,
        best_metric: str | None = None, higher_is_better: bool = True, collate_fn=None, log_images=None,
        early_stopping_patience: int | None = None):
    """Train until --epochs or --max-steps (or early stopping); returns (plain model, summary).

    compute_loss(model, batch) -> loss or (loss, {name: float}); `model` may be the DDP wrapper: call it.
    evaluate(model) -> {metric: float}: rank 0, plain model in eval mode, RNG untouched.
    log_images(model, batch) -> {name: HxWx3 uint8}: rank 0, after each validation, the last training batch.
    summary: steps, epochs, metrics, num_skipped, last_checkpoint, best_checkpoint, tensorboard, run_name.
    """
    run = start_run(Run(args, model, optimizer, scheduler, scheduler_interval, compute_loss, evaluate, log_images,
                        model_name, arch, settings, best_metric, higher_is_better, early_stopping_patience))
    loader = make_loader(train_set, batch_size=args.batch_size, shuffle=True, workers=args.workers, seed=args.seed,
                         collate_fn=collate_fn or collate_skip_bad, num_replicas=run.world, rank=run.rank,
                         drop_last=True)
    if run.resumed_rng is not None:
        set_rng_state(run.resumed_rng)
    else:
        seed_everything(args.seed + run.rank)       # ranks draw different dropout masks
    previous_handlers = catch_stop_signals(run)
    try:
        if run.is_main:
            run.dirs["checkpoints"].mkdir(parents=True, exist_ok=True)
            for stale in run.dirs["checkpoints"].glob(".*.tmp"):     # left by a write that was killed
                stale.unlink(missing_ok=True)
            # purge_step drops the events a crashed run logged after its last checkpoint
            run.writer = SummaryWriter(str(run.dirs["tensorboard"]),
                                       purge_step=run.step if run.resumed_rng is not None else None)
        while not run.stopped and not out_of_budget(run):
            if not train_one_epoch(run, loader):
                break               # --max-steps, early stopping or a stop signal, mid-epoch
            end_epoch(run)
        if run.stop_signal:
            save_and_exit(run)
        finish(run)
    finally:
        for number, handler in previous_handlers.items():
            signal.signal(number, handler)
        if run.writer is not None:
            run.writer.close()
    return run.model, summarize(run)


def catch_stop_signals(run: Run) -> dict:
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, then save_and_exit; a second one stops at once."""
    owner = os.getpid()

    def request_stop(number, frame):
        if os.getpid() != owner:     # a DataLoader worker (forked): keep serving batches until the loop ends
            return
        if run.signal_received:
            raise KeyboardInterrupt
        run.signal_received = number
        if run.is_main:
            print(f"\n{signal.Signals(number).name}: stopping after this step to save last.pt "
                  "(send it again to stop at once)", file=sys.stderr)
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {number: signal.signal(number, request_stop) for number in (signal.SIGINT, signal.SIGTERM)}


def save_and_exit(run: Run) -> None:
    """After a stop signal: last.pt at this step boundary, the command that continues the run, exit 128 + signal."""
    flush_training_log(run)
    save(run)
    if run.is_main:
        # the same command, its --resume (if any) now pointing at this run's last.pt
        argv = [word for before, word in zip(sys.argv, sys.argv[1:]) if "--resume" not in (before, word[:8])]
        last = run.dirs["checkpoints"] / "last.pt"
        print(f"stopped by {signal.Signals(run.stop_signal).name} at step {run.step}; saved {last}\ncontinue with: "
              f"{shlex.join(['python', sys.argv[0], *argv, '--resume', str(last)])}", file=sys.stderr)
    raise SystemExit(128 + run.stop_signal)


def start_run(run: Run) -> Run:
    """Device and process group, the run folder, --resume or --init-from, DDP."""
    args = run.args
    if run.scheduler_interval not in ("epoch", "step"):
        raise ValueError(f"scheduler_interval must be 'epoch' or 'step', not {run.scheduler_interval!r}")
    if not hasattr(args, "world_size"):
        setup_device_and_distributed(args)
    if args.max_steps is None and args.epochs is None:
        raise SystemExit("give --epochs or --max-steps")
    run.val_every = parse_val_every(args.val_every)
    run.device, run.rank, run.world = torch.device(args.device), args.rank, args.world_size
    if args.amp in AMP_DTYPES and run.device.type != "cuda" and run.is_main:
        print(f"--amp {args.amp} on {run.device}: CPU autocast works but is rarely faster; it is there for tests")
    resume_from = resume_path(args, run.model_name, verbose=run.is_main)
    run.dirs = run_dirs(args, run.model_name)     # a resumed run keeps writing into its own run folder
    # eval knows the training file by content; a folder that trains on another file (built-in data) stored its own
    if "train_ann_sha256" not in run.settings and getattr(args, "ann", None) and os.path.isfile(args.ann):
        run.settings["train_ann_sha256"] = sha256_of(args.ann)
    if run.device.type == "cpu":
        keep_freed_memory()
    run.model.to(run.device)
    if args.sync_bn and run.world > 1:
        if run.device.type == "cuda":
            run.model = nn.SyncBatchNorm.convert_sync_batchnorm(run.model)
        elif run.is_main:   # PyTorch's SyncBatchNorm runs on GPUs only
            print("--sync-bn: SyncBatchNorm needs CUDA; keeping per-process BatchNorm on CPU")
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=args.amp == "fp16")
    if resume_from is not None:
        restore(run, resume_from)
    elif args.init_from:
        load_weights(run.model, checkpoint_from_spec(args.init_from, run.model_name, args.out))
    run.ddp_model = run.model
    if run.world > 1:
        run.ddp_model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return run


def restore(run: Run, path) -> None:
    """--resume: weights, optimizer, scheduler, scaler, the counters and this rank's RNG state."""
    ckpt = load_checkpoint(path)
    if ckpt.get("model_name") != run.model_name or "optimizer" not in ckpt:
        raise SystemExit(f"--resume {path}: not a {run.model_name} training checkpoint "
                         f"(model_name {ckpt.get('model_name')!r}); use --init-from for weights only")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.scheduler is not None and ckpt["scheduler"] is not None:
        run.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"] is not None:
        run.scaler.load_state_dict(ckpt["scaler"])
    for name in COUNTERS:
        setattr(run, name, ckpt[name])
    run.resumed_rng = ckpt["rng"][run.rank] if run.rank < len(ckpt["rng"]) else ckpt["rng"][0]
    if run.is_main:
        if ckpt["world_size"] != run.world or ckpt["config"].get("batch_size") != run.args.batch_size:
            print("warning: resuming with another number of processes or batch size; "
                  "the data order will differ from the interrupted run's")
        if run.args.init_from:
            print(f"--init-from {run.args.init_from} ignored: resuming from {path}")
        print(f"resumed {path} at epoch {run.epoch}, step {run.step}")


def out_of_budget(run: Run) -> bool:
    args = run.args
    return ((args.epochs is not None and run.epoch >= args.epochs)
            or (args.max_steps is not None and run.step >= args.max_steps))


def train_one_epoch(run: Run, loader) -> bool:
    """Train from where the epoch stands to its end; False when the run stopped before the end."""
    args = run.args
    loader.sampler.set_epoch(run.epoch, start_index=run.batch_in_epoch * args.batch_size)
    with preserved_rng():       # starting the workers draws a base seed from the global RNG
        batches = iter(loader)
    # With workers=0 the dataset's per-sample seeding runs in this process: keep it off the training RNG.
    loading_rng = preserved_rng if args.workers == 0 else contextlib.nullcontext
    # One batch of look-ahead tells which batch ends the epoch: a partial accumulation window there still
    # gets its optimizer step (with gradients synced across ranks).
    with loading_rng():
        upcoming = next(batches, None)
    if upcoming is None and run.batch_in_epoch == 0:
        raise SystemExit(f"the training set yields no batches ({len(loader.dataset)} samples, "
                         f"batch size {args.batch_size} x {run.world} processes)")
    micro_batches, accumulate = 0, max(1, args.accumulate)
    with tqdm(total=len(loader) + run.batch_in_epoch, initial=run.batch_in_epoch, desc=f"epoch {run.epoch}",
              disable=not run.is_main, dynamic_ncols=True, leave=False) as progress:
        while upcoming is not None:
            batch = upcoming
            with loading_rng():
                upcoming = next(batches, None)
            run.batch_in_epoch += 1
            progress.update(1)
            run.num_skipped += int(batch.pop("num_skipped", 0))
            if batch:
                micro_batches += 1
                forward_backward(run, batch, sync=micro_batches == accumulate or upcoming is None)
            elif run.world > 1:     # a batch of unreadable samples only: the ranks would fall out of step
                raise SystemExit(f"rank {run.rank}: a whole batch of unreadable samples at step {run.step + 1}; "
                                 "fix or remove the files named in the warnings above")
            if micro_batches == 0 or (micro_batches < accumulate and upcoming is not None):
                continue
            micro_batches = 0
            optimizer_step(run)
            progress.set_postfix(step=run.step, loss=f"{run.last_loss:.4g}")
            if run.stop_signal:
                return False
            if args.max_steps is not None and run.step >= args.max_steps:
                return upcoming is None
            unit, every = run.val_every
            if unit == "step" and run.step % every == 0 and validate(run):
                run.stopped = True
                return upcoming is None
    return True


def forward_backward(run: Run, batch: dict, sync: bool) -> None:
    """Loss and backward of one micro-batch; under DDP the gradients are synced only when `sync`."""
    batch = to_device(batch, run.device)
    no_sync = contextlib.nullcontext if sync or run.world == 1 else run.ddp_model.no_sync
    with no_sync():
        amp_dtype = AMP_DTYPES.get(run.args.amp)
        with torch.autocast(run.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = run.compute_loss(run.ddp_model, batch)
        loss, parts = out if isinstance(out, tuple) else (out, {})
        stop_if_not_finite(run, loss, parts)
        run.scaler.scale(loss / max(1, run.args.accumulate)).backward()
    run.last_loss, run.last_batch = float(loss.detach()), batch
    for name, value in {"loss": run.last_loss, **parts}.items():
        run.loss_sums[name] = run.loss_sums.get(name, 0.0) + float(value)
    run.loss_count += 1


def stop_if_not_finite(run: Run, loss, parts: dict) -> None:
    """Every rank calls this before backward; all stop together when any rank's loss is inf/nan. The same
    collective tells every rank whether any received a stop signal (they then stop after the same step)."""
    local_bad = not bool(torch.isfinite(loss.detach()).all())
    flags = torch.tensor([float(local_bad), float(run.signal_received)], device=loss.device)
    if run.world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, stop = flags.tolist()
    run.stop_signal = int(stop)
    if bad == 0:
        return
    names = [n for n, v in parts.items() if not math.isfinite(float(v))] or ["loss"]
    what = f"{', '.join(names)} = {float(loss.detach().float().sum()):g}" if local_bad else "on another rank"
    last = run.dirs["checkpoints"] / "last.pt"
    where = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
    raise SystemExit(f"non-finite loss at step {run.step + 1} (epoch {run.epoch}): {what}; stopping, {where}")


def optimizer_step(run: Run) -> None:
    """Clip, step (through the GradScaler), schedule per step, log."""
    args = run.args
    grad_norm = None
    if args.clip_grad > 0:
        run.scaler.unscale_(run.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(run.model.parameters(), args.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.step += 1
    if run.is_main and args.hist_every and run.step % args.hist_every == 0:
        for name, p in run.model.named_parameters():
            run.writer.add_histogram(f"params/{name}", p.detach().float().cpu(), run.step)
            if p.grad is not None:
                run.writer.add_histogram(f"grads/{name}", p.grad.detach().float().cpu(), run.step)
    run.optimizer.zero_grad(set_to_none=True)
    if run.scheduler is not None and run.scheduler_interval == "step":
        run.scheduler.step()
    if args.log_every and run.step % args.log_every == 0:
        flush_training_log(run, grad_norm)


def flush_training_log(run: Run, grad_norm=None) -> None:
    """Log what was summed since the last log; at the end too, so a run shorter than --log-every has its losses."""
    if run.loss_count:
        log_training(run, grad_norm)


def log_training(run: Run, grad_norm) -> None:
    """Mean losses since the last log, over all ranks (collective on every rank), plus LR and grad norm."""
    names = sorted(run.loss_sums)
    means = torch.tensor([run.loss_sums[n] / run.loss_count for n in names], dtype=torch.float64, device=run.device)
    run.loss_sums, run.loss_count = {}, 0
    if run.world > 1:
        dist.all_reduce(means)
        means /= run.world
    if run.writer is None:
        return
    for name, value in zip(names, means.tolist()):
        run.writer.add_scalar("loss/train" if name == "loss" else f"loss/{name}", value, run.step)
    for i, group in enumerate(run.optimizer.param_groups):
        run.writer.add_scalar("lr" if i == 0 else f"lr/group{i}", group["lr"], run.step)
    if grad_norm is not None:
        run.writer.add_scalar("grad_norm", float(grad_norm), run.step)


def end_epoch(run: Run) -> None:
    run.epoch, run.batch_in_epoch = run.epoch + 1, 0
    if run.scheduler is not None and run.scheduler_interval == "epoch":
        run.scheduler.step()
    unit, every = run.val_every
    if unit == "epoch" and run.epoch % every == 0:
        run.stopped = validate(run)
    else:
        save(run)


def validate(run: Run) -> bool:
    """Evaluate (rank 0), log and checkpoint; True when early stopping says the run is over."""
    run.last_validated = run.position
    new = evaluate_and_log(run) if run.is_main and run.evaluate is not None else None
    new = broadcast_object(new, run.rank, run.world)
    if new is not None:
        run.metrics = new
    value = (new or {}).get(run.best_metric) if run.best_metric else None
    stopping = run.early_stopping
    if value is not None and math.isfinite(value):
        best_value = stopping["best_value"]
        improved = best_value is None or (value > best_value if run.higher_is_better else value < best_value)
        stopping["best_value"], stopping["stale"] = (value, 0) if improved else (best_value, stopping["stale"] + 1)
    save(run, new)
    if run.patience is not None and stopping["stale"] >= run.patience:
        if run.is_main:
            print(f"early stopping: {run.best_metric} has not improved in {stopping['stale']} validations")
        return True
    return False


def evaluate_and_log(run: Run) -> dict:
    """The metrics of the plain model in eval mode (and the log_images pictures), without moving any RNG."""
    run.model.eval()
    with preserved_rng():
        new = {name: float(value) for name, value in run.evaluate(run.model).items()}
        if run.log_images is not None and run.last_batch is not None:
            with torch.no_grad():
                for name, image in run.log_images(run.model, run.last_batch).items():
                    run.writer.add_image(f"images/{name}", image, run.step, dataformats="HWC")
    run.model.train()
    for name, value in new.items():  # a name with a '/' ("loss/val") is already a full tag
        run.writer.add_scalar(name if "/" in name else f"metrics/{name}", value, run.step)
    print(f"epoch {run.epoch} step {run.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in new.items()))
    return new


def save(run: Run, new_metrics: dict | None = None) -> None:
    """last.pt, plus a best-k file when `new_metrics` makes the cut. Every rank calls it (RNG gather)."""
    if run.last_saved == run.position and new_metrics is None:
        return
    run.last_saved = run.position
    value = (new_metrics or {}).get(run.best_metric) if run.best_metric else None
    new_file, dropped = None, []
    if value is not None and math.isfinite(value) and run.args.keep_best > 0:
        entry = {"file": f"best_step{run.step:08d}.pt", "step": run.step, "value": float(value)}
        # sorted() is stable, so on a tie the older checkpoint stays ahead
        ranked = sorted(run.best + [entry], key=lambda e: -e["value"] if run.higher_is_better else e["value"])
        keep = run.args.keep_best
        if entry in ranked[:keep]:
            run.best, new_file, dropped = ranked[:keep], entry["file"], ranked[keep:]
    checkpoint = checkpoint_state(run)
    if not run.is_main:
        return
    folder = run.dirs["checkpoints"]
    if new_file:    # weights only (and what rebuilds the model): last.pt alone carries what --resume needs
        save_checkpoint(folder / new_file, {k: v for k, v in checkpoint.items() if k not in RESUME_ONLY})
        for entry in dropped:
            (folder / entry["file"]).unlink(missing_ok=True)
        if run.best[0]["file"] == new_file:     # best.pt: a second name for that file, not a second copy
            (folder / ".best.pt.tmp").unlink(missing_ok=True)
            try:
                os.link(folder / new_file, folder / ".best.pt.tmp")
            except OSError:     # a file system without hard links
                shutil.copyfile(folder / new_file, folder / ".best.pt.tmp")
            os.replace(folder / ".best.pt.tmp", folder / "best.pt")
    save_checkpoint(folder / "last.pt", checkpoint)


def checkpoint_state(run: Run) -> dict:
    """Everything --resume needs, plus what eval and infer rebuild the model from (arch, settings)."""
    rng = [get_rng_state()]
    if run.world > 1:
        rng = [None] * run.world
        dist.all_gather_object(rng, get_rng_state())
    return {"format": CHECKPOINT_FORMAT, "model_name": run.model_name, "arch": plain(run.arch),
            "settings": plain(run.settings), "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
            **{name: getattr(run, name) for name in COUNTERS}, "world_size": run.world, "rng": rng,
            "best_metric": run.best_metric, "config": plain(vars(run.args))}


def finish(run: Run) -> None:
    """A last validation unless this very state was just validated; last.pt always ends at the final state."""
    flush_training_log(run)
    if run.evaluate is not None and run.last_validated != run.position:
        validate(run)
    else:
        save(run)
    if run.world > 1:
        # Each rank's last forward updated its own BatchNorm statistics; end with rank 0's (the ones its
        # checkpoint holds) everywhere, as DDP itself would at the next forward.
        for buffer in run.model.buffers():
            dist.broadcast(buffer.data, src=0)
        skipped = torch.tensor(run.num_skipped, device=run.device)
        dist.all_reduce(skipped)
        run.num_skipped = int(skipped.item())
        dist.barrier()


def summarize(run: Run) -> dict:
    folder = run.dirs["checkpoints"]
    if run.is_main:
        if run.num_skipped:
            print(f"skipped {run.num_skipped} bad samples (see the warnings above)")
        print(f"trained {run.step} steps; checkpoints in {folder}, TensorBoard logs in {run.dirs['tensorboard']}")
    return {"steps": run.step, "epochs": run.epoch, "metrics": run.metrics, "num_skipped": run.num_skipped,
            "last_checkpoint": folder / "last.pt",
            "best_checkpoint": folder / run.best[0]["file"] if run.best else None,
            "tensorboard": run.dirs["tensorboard"], "run_name": run.dirs["run_name"]}


def parse_val_every(spec) -> tuple[str | None, int]:
    """'1e' -> ('epoch', 1); '500' -> ('step', 500); '0' / 'none' / 'end' -> (None, 0)."""
    text = str(spec).strip().lower()
    unit = "epoch" if text.endswith("e") else "step"
    try:
        every = 0 if text in ("", "none", "end") else int(text.removesuffix("e"))
    except ValueError:
        raise SystemExit(f"--val-every {spec!r}: expected N (steps) or Ne (epochs), e.g. 500 or 1e") from None
    if every < 0:
        raise SystemExit(f"--val-every {spec!r}: must not be negative")
    return (unit, every) if every else (None, 0)


def planned_steps(args, num_samples: int) -> int:
    """The optimizer steps `fit` takes over `num_samples` samples (for schedules spanning the run): full batches
    over all processes, --accumulate micro-batches a step (an epoch's leftover makes one more), --epochs or
    --max-steps, whichever ends first."""
    per_epoch = max(num_samples // (args.batch_size * getattr(args, "world_size", 1)), 1)
    per_epoch = math.ceil(per_epoch / max(1, args.accumulate))
    limits = [n for n in (args.epochs and args.epochs * per_epoch, args.max_steps) if n]
    if not limits:
        raise SystemExit("give --epochs or --max-steps")
    return min(limits)


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


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
    n, p = state["numpy"], state["python"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def preserved_rng():
    """Run a block (validation, image logging, DataLoader start-up) without moving the training RNGs."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory: by default every CPU training step page-faults its activations
    in again (simple_baseline, 100 steps on 2 cores: 2.3-2.5 million minor faults before, 0.39 million after)."""
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")):
        return False   # someone tuned the allocator already (or swapped it for jemalloc/tcmalloc)
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False   # no glibc (macOS, Windows, musl)
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3    # from glibc's <malloc.h>
    # 32 MiB is glibc's largest mmap threshold: bigger blocks (checkpoint loading) still use mmap.
    return bool(mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 1 << 30)
                and mallopt(m_top_pad, 64 << 20))
