"""The training loop every model folder shares, as small named functions around one `Run` object.

    model, summary = fit(args, model, train_set, compute_loss, optimizer, model_name=..., arch=..., settings=...)
`fit` reads top to bottom: start the run, then per epoch `train_one_epoch` and `end_epoch`, then `finish`.
One process (`python <model>/train.py`) or several (`torchrun --nproc_per_node=N <model>/train.py`,
`--batch-size` per process): DDP, AMP, gradient accumulation and clipping, per-step or per-epoch schedules,
validation, TensorBoard, and checkpoints that resume exactly (the same weights as an uninterrupted run).
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.loader import collate_skip_bad, make_loader
from common.runs import (CHECKPOINT_FORMAT, broadcast_object, gather_objects, load_checkpoint, load_weights, plain,
                         resume_path, run_dirs, save_checkpoint, seed_everything, setup_device_and_distributed)


@dataclass
class TrainState:
    """The counters a checkpoint carries and --resume restores."""
    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0          # micro-batches of this epoch already trained on
    best: list = field(default_factory=list)        # best-k checkpoints [{"file", "step", "value"}], best first
    metrics: dict = field(default_factory=dict)
    early_stopping: dict = field(default_factory=lambda: {"stale": 0, "best_value": None})

    @property
    def position(self):
        return self.epoch, self.batch_in_epoch, self.step


@dataclass
class Run:
    """One training run: what it trains, how, where it writes, and its TrainState."""
    args: object
    model: nn.Module                 # the plain model (checkpoints, evaluation)
    optimizer: torch.optim.Optimizer
    scheduler: object
    scheduler_interval: str          # "step" or "epoch"
    compute_loss: object
    evaluate: object
    log_images: object
    model_name: str
    arch: dict                       # build_model(**arch) rebuilds the model (stored in every checkpoint)
    settings: dict                   # input size, stride, sigma, layout ... (stored in every checkpoint)
    best_metric: str | None
    higher_is_better: bool
    patience: int | None             # early stopping: validations without a new best
    # set by start_run:
    device: torch.device = None
    rank: int = 0
    world: int = 1
    dirs: dict = None
    val_every: tuple = None          # ("step" | "epoch" | None, N)
    amp_dtype: torch.dtype | None = None
    accumulate: int = 1
    scaler: torch.amp.GradScaler = None
    ddp_model: nn.Module = None      # what the loss calls: the DDP wrapper under torchrun, else the model
    state: TrainState = field(default_factory=TrainState)
    resumed_rng: dict | None = None
    writer: SummaryWriter | None = None
    pbar: tqdm | None = None
    stopped: bool = False            # early stopping ended the run
    micro_in_step: int = 0
    loss_sums: dict = field(default_factory=dict)
    loss_count: int = 0
    last_loss: float = float("nan")
    last_batch: dict | None = None
    num_skipped: int = 0
    last_saved: tuple | None = None
    last_validated: tuple | None = None

    @property
    def is_main(self):
        return self.rank == 0


def fit(args, model: nn.Module, train_set, compute_loss, optimizer, *, model_name: str, arch: dict,
        settings: dict, scheduler=None, scheduler_interval: str = "epoch", evaluate=None,
        best_metric: str | None = None, higher_is_better: bool = True, collate_fn=None, log_images=None,
        early_stopping_patience: int | None = None):
    """Train until --epochs or --max-steps (or early stopping); returns (plain model, summary).

    compute_loss(model, batch) -> loss or (loss, {name: float}); `model` may be the DDP wrapper: call it.
    evaluate(model) -> {metric: float}: rank 0, plain model in eval mode, RNG untouched.
    log_images(model, batch) -> {name: HxWx3 uint8}: rank 0, after each validation, the last training batch.
    arch, settings: what eval and infer rebuild the model and its decoding from (stored in every checkpoint).
    summary: steps, epochs, metrics, num_skipped, last_checkpoint, best_checkpoint, tensorboard, run_name.
    """
    run = start_run(Run(args, model, optimizer, scheduler, scheduler_interval, compute_loss, evaluate, log_images,
                        model_name, arch, settings, best_metric, higher_is_better, early_stopping_patience))
    loader = make_loader(train_set, batch_size=args.batch_size, shuffle=True, workers=args.workers,
                         seed=args.seed, collate_fn=collate_fn or collate_skip_bad,
                         num_replicas=run.world, rank=run.rank, drop_last=True)
    start_rng(run)
    open_writer(run)
    try:
        while not run.stopped and not out_of_budget(run):
            if not train_one_epoch(run, loader):
                break               # --max-steps or early stopping, mid-epoch
            end_epoch(run)
        finish(run)
    finally:
        if run.writer is not None:
            run.writer.close()
    return run.model, summarize(run)


# --- Starting and ending a run ------------------------------------------------------------------------------

def start_run(run: Run) -> Run:
    """Device and process group, the run folder, --resume or --init-from, DDP."""
    args = run.args
    if run.scheduler_interval not in ("epoch", "step"):
        raise ValueError(f"scheduler_interval must be 'epoch' or 'step', not {run.scheduler_interval!r}")
    if not hasattr(args, "world_size"):
        setup_device_and_distributed(args)
    if args.max_steps is None and args.epochs is None:
        raise SystemExit("give --epochs or --max-steps")
    run.val_every, run.accumulate = parse_val_every(args.val_every), max(1, args.accumulate)
    run.device, run.rank, run.world = torch.device(args.device), args.rank, args.world_size
    run.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    if run.amp_dtype is not None and run.device.type != "cuda" and run.is_main:
        print(f"--amp {args.amp} on {run.device}: CPU autocast works but is rarely faster; it is there for tests")
    resume_from = resume_path(args, run.model_name, verbose=run.is_main)
    run.dirs = run_dirs(args, run.model_name)     # a resumed run keeps writing into its own run folder
    if run.device.type == "cpu":
        keep_freed_memory()
    run.model.to(run.device)
    if args.sync_bn and run.world > 1:
        if run.device.type == "cuda":
            run.model = nn.SyncBatchNorm.convert_sync_batchnorm(run.model)
        elif run.is_main:   # PyTorch's SyncBatchNorm runs on GPUs only
            print("--sync-bn: SyncBatchNorm needs CUDA; keeping per-process BatchNorm on CPU")
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp_dtype == torch.float16)
    run.ddp_model = run.model
    if resume_from is not None:
        restore(run, resume_from)
    elif args.init_from:
        load_weights(run.model, args.init_from)
    if run.world > 1:
        run.ddp_model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return run


def restore(run: Run, path) -> None:
    """--resume: weights, optimizer, scheduler, scaler, TrainState and this rank's RNG state."""
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
    run.state = TrainState(ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"], ckpt["best"], ckpt["metrics"],
                           ckpt["early_stopping"])
    run.resumed_rng = ckpt["rng"][run.rank] if run.rank < len(ckpt["rng"]) else ckpt["rng"][0]
    if run.is_main:
        if ckpt["world_size"] != run.world or ckpt["config"].get("batch_size") != run.args.batch_size:
            print("warning: resuming with another number of processes or batch size; "
                  "the data order will differ from the interrupted run's")
        if run.args.init_from:
            print(f"--init-from {run.args.init_from} ignored: resuming from {path}")
        print(f"resumed {path} at epoch {run.state.epoch}, step {run.state.step}")


def start_rng(run: Run) -> None:
    """The resumed RNG state, else seeds drawn from (seed, rank): ranks draw different dropout masks."""
    if run.resumed_rng is not None:
        set_rng_state(run.resumed_rng)
    else:
        seed_everything(run.args.seed + run.rank)


def open_writer(run: Run) -> None:
    if not run.is_main:
        return
    run.dirs["checkpoints"].mkdir(parents=True, exist_ok=True)
    # purge_step drops the events a crashed run logged after its last checkpoint
    purge_step = run.state.step if run.resumed_rng is not None else None
    run.writer = SummaryWriter(str(run.dirs["tensorboard"]), purge_step=purge_step)


def out_of_budget(run: Run) -> bool:
    args, state = run.args, run.state
    return ((args.epochs is not None and state.epoch >= args.epochs)
            or (args.max_steps is not None and state.step >= args.max_steps))


def finish(run: Run) -> None:
    """A last validation unless this very state was just validated; last.pt always ends at the final state."""
    if run.evaluate is not None and run.last_validated != run.state.position:
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
    ckpt_dir, state = run.dirs["checkpoints"], run.state
    if run.is_main:
        if run.num_skipped:
            print(f"skipped {run.num_skipped} bad samples (see the warnings above)")
        print(f"trained {state.step} steps; checkpoints in {ckpt_dir}, TensorBoard logs in {run.dirs['tensorboard']}")
    return {"steps": state.step, "epochs": state.epoch, "metrics": state.metrics, "num_skipped": run.num_skipped,
            "last_checkpoint": ckpt_dir / "last.pt",
            "best_checkpoint": ckpt_dir / state.best[0]["file"] if state.best else None,
            "tensorboard": run.dirs["tensorboard"], "run_name": run.dirs["run_name"]}


# --- The epoch, the step ------------------------------------------------------------------------------------

def train_one_epoch(run: Run, loader) -> bool:
    """Train from where the epoch stands to its end; False when the run stopped before the end."""
    state = run.state
    loader.sampler.set_epoch(state.epoch, start_index=state.batch_in_epoch * run.args.batch_size)
    with preserved_rng():       # starting the workers draws a base seed from the global RNG
        batches = iter(loader)
    run.pbar = tqdm(total=len(loader) + state.batch_in_epoch, initial=state.batch_in_epoch,
                    desc=f"epoch {state.epoch}", disable=not run.is_main, dynamic_ncols=True, leave=False)
    # With workers=0 the dataset's per-sample seeding runs in this process: keep it off the training RNG.
    loading_rng = preserved_rng if run.args.workers == 0 else contextlib.nullcontext
    try:
        # One batch of look-ahead tells which batch ends the epoch: a partial accumulation window there
        # still gets its optimizer step (with gradients synced across ranks).
        with loading_rng():
            upcoming = next(batches, None)
        if upcoming is None and state.batch_in_epoch == 0:
            raise SystemExit(f"the training set yields no batches ({len(loader.dataset)} samples, "
                             f"batch size {run.args.batch_size} x {run.world} processes)")
        while upcoming is not None:
            batch = upcoming
            with loading_rng():
                upcoming = next(batches, None)
            if not forward_backward(run, batch, last_in_epoch=upcoming is None):
                continue
            optimizer_step(run)
            if run.args.max_steps is not None and state.step >= run.args.max_steps:
                return upcoming is None
            unit, every = run.val_every
            if unit == "step" and state.step % every == 0 and validate(run):
                run.stopped = True
                return upcoming is None
        return True
    finally:
        run.pbar.close()


def forward_backward(run: Run, batch: dict, last_in_epoch: bool) -> bool:
    """Loss and backward of one micro-batch; True when an optimizer step is due."""
    run.num_skipped += int(batch.pop("num_skipped", 0))
    run.state.batch_in_epoch += 1
    run.pbar.update(1)
    if not batch:
        if run.world > 1:     # the ranks would fall out of step
            raise SystemExit(f"rank {run.rank}: a whole batch of unreadable samples at step {run.state.step + 1}; "
                             "fix or remove the files named in the warnings above")
        return run.micro_in_step > 0 and last_in_epoch   # all samples unreadable (warned about)
    batch = to_device(batch, run.device)
    run.micro_in_step += 1
    take_step = run.micro_in_step == run.accumulate or last_in_epoch
    no_sync = run.ddp_model.no_sync if run.world > 1 and not take_step else contextlib.nullcontext
    with no_sync():
        with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            out = run.compute_loss(run.ddp_model, batch)
        loss, parts = out if isinstance(out, tuple) else (out, {})
        stop_if_not_finite(run, loss, parts)
        run.scaler.scale(loss / run.accumulate).backward()
    run.last_loss, run.last_batch = float(loss.detach()), batch
    for name, value in {"loss": run.last_loss, **parts}.items():
        run.loss_sums[name] = run.loss_sums.get(name, 0.0) + float(value)
    run.loss_count += 1
    return take_step


def optimizer_step(run: Run) -> None:
    """Clip, step (through the GradScaler), schedule per step, log."""
    args, state = run.args, run.state
    grad_norm = None
    if args.clip_grad > 0:
        run.scaler.unscale_(run.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(run.model.parameters(), args.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    state.step, run.micro_in_step = state.step + 1, 0
    if run.is_main and args.hist_every and state.step % args.hist_every == 0:
        write_histograms(run.writer, run.model, state.step)
    run.optimizer.zero_grad(set_to_none=True)
    if run.scheduler is not None and run.scheduler_interval == "step":
        run.scheduler.step()
    if args.log_every and state.step % args.log_every == 0 and run.loss_count:
        log_training(run, grad_norm)
        run.loss_sums, run.loss_count = {}, 0
    run.pbar.set_postfix(step=state.step, loss=f"{run.last_loss:.4g}")


def end_epoch(run: Run) -> None:
    state = run.state
    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    if run.scheduler is not None and run.scheduler_interval == "epoch":
        run.scheduler.step()
    unit, every = run.val_every
    if unit == "epoch" and state.epoch % every == 0:
        run.stopped = validate(run)
    else:
        save(run)


def stop_if_not_finite(run: Run, loss, parts: dict) -> None:
    """Every rank calls this before backward; all stop together when any rank's loss is inf/nan."""
    local_bad = not bool(torch.isfinite(loss.detach()).all())
    bad = torch.tensor(float(local_bad), device=loss.device)
    if run.world > 1:
        dist.all_reduce(bad)
    if bad.item() == 0:
        return
    names = [n for n, v in parts.items() if not math.isfinite(float(v))] or ["loss"]
    what = f"{', '.join(names)} = {float(loss.detach().float().sum()):g}" if local_bad else "on another rank"
    last = run.dirs["checkpoints"] / "last.pt"
    where = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
    raise SystemExit(f"non-finite loss at step {run.state.step + 1} (epoch {run.state.epoch}): {what}; "
                     f"stopping, {where}")


# --- Validation and checkpoints -----------------------------------------------------------------------------

def validate(run: Run) -> bool:
    """Evaluate (rank 0), log and checkpoint; True when early stopping says the run is over."""
    state = run.state
    run.last_validated = state.position
    new = evaluate_and_log(run) if run.is_main and run.evaluate is not None else None
    new = broadcast_object(new, run.rank, run.world)
    if new is not None:
        state.metrics = new
    value = (new or {}).get(run.best_metric) if run.best_metric else None
    stopping = state.early_stopping
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
    step = run.state.step
    run.model.eval()
    with preserved_rng():
        new = {name: float(value) for name, value in run.evaluate(run.model).items()}
        if run.log_images is not None and run.last_batch is not None:
            with torch.no_grad():
                for name, image in run.log_images(run.model, run.last_batch).items():
                    run.writer.add_image(name, image, step, dataformats="HWC")
    run.model.train()
    for name, value in new.items():  # a name with a '/' ("loss/val") is already a full tag
        run.writer.add_scalar(name if "/" in name else f"metrics/{name}", value, step)
    print(f"epoch {run.state.epoch} step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in new.items()))
    return new


def save(run: Run, new_metrics: dict | None = None) -> None:
    """last.pt, plus a best-k file when `new_metrics` makes the cut. Every rank calls it (RNG gather)."""
    state = run.state
    if run.last_saved == state.position and new_metrics is None:
        return
    run.last_saved = state.position
    value = (new_metrics or {}).get(run.best_metric) if run.best_metric else None
    new_file, dropped = None, []
    if value is not None and math.isfinite(value) and run.args.keep_best > 0:
        state.best, new_file, dropped = rank_best(state.best, state.step, value, run.args.keep_best,
                                                  run.higher_is_better)
    checkpoint = checkpoint_state(run)
    if not run.is_main:
        return
    ckpt_dir = run.dirs["checkpoints"]
    if new_file:
        save_checkpoint(ckpt_dir / new_file, checkpoint)
        for entry in dropped:
            (ckpt_dir / entry["file"]).unlink(missing_ok=True)
        if state.best[0]["file"] == new_file:
            save_checkpoint(ckpt_dir / "best.pt", checkpoint)
    save_checkpoint(ckpt_dir / "last.pt", checkpoint)


def checkpoint_state(run: Run) -> dict:
    """Everything --resume needs, plus what eval and infer rebuild the model from (arch, settings)."""
    state = run.state
    return {"format": CHECKPOINT_FORMAT, "model_name": run.model_name, "arch": plain(run.arch),
            "settings": plain(run.settings), "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
            "epoch": state.epoch, "step": state.step, "batch_in_epoch": state.batch_in_epoch,
            "world_size": run.world, "rng": gather_objects(get_rng_state(), run.world), "best": state.best,
            "metrics": state.metrics, "early_stopping": dict(state.early_stopping), "best_metric": run.best_metric,
            "config": plain(vars(run.args))}


def rank_best(best: list[dict], step: int, value: float, keep: int, higher_is_better: bool):
    """Best-k bookkeeping: returns (new list, file name to write or None, entries that fell out)."""
    entry = {"file": f"best_step{step:08d}.pt", "step": step, "value": float(value)}
    # sorted() is stable, so on a tie the older checkpoint stays ahead
    ranked = sorted(best + [entry], key=lambda e: -e["value"] if higher_is_better else e["value"])
    if entry not in ranked[:keep]:
        return best, None, []
    return ranked[:keep], entry["file"], ranked[keep:]


# --- TensorBoard --------------------------------------------------------------------------------------------

def log_training(run: Run, grad_norm) -> None:
    """Mean losses over the last micro-batches and all ranks, plus LR; collective on every rank."""
    names, step = sorted(run.loss_sums), run.state.step
    means = torch.tensor([run.loss_sums[n] / run.loss_count for n in names], dtype=torch.float64, device=run.device)
    if run.world > 1:
        dist.all_reduce(means)
        means /= run.world
    if run.writer is None:
        return
    for name, value in zip(names, means.tolist()):
        run.writer.add_scalar("loss/train" if name == "loss" else f"loss/{name}", value, step)
    for i, group in enumerate(run.optimizer.param_groups):
        run.writer.add_scalar("lr" if i == 0 else f"lr/group{i}", group["lr"], step)
    if grad_norm is not None:
        run.writer.add_scalar("grad_norm", float(grad_norm), step)


def write_histograms(writer, model: nn.Module, step: int) -> None:
    for name, p in model.named_parameters():
        writer.add_histogram(f"params/{name}", p.detach().float().cpu(), step)
        if p.grad is not None:
            writer.add_histogram(f"grads/{name}", p.grad.detach().float().cpu(), step)


# --- Helpers ------------------------------------------------------------------------------------------------

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


def planned_steps(args, num_samples: int) -> int:
    """Optimizer steps `fit` will take over `num_samples` training samples, for schedules that span the run:
    full batches only (the last partial one is dropped) over all processes, --accumulate micro-batches per
    step (an epoch's leftover micro-batches make one more), and whichever of --epochs / --max-steps ends first."""
    per_epoch = max(num_samples // (args.batch_size * getattr(args, "world_size", 1)), 1)
    per_epoch = math.ceil(per_epoch / max(1, args.accumulate))
    limits = [n for n in (args.epochs and args.epochs * per_epoch, args.max_steps) if n]
    if not limits:
        raise SystemExit("give --epochs or --max-steps")
    return min(limits)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel (or torch.compile) wrapper."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule":     # torch.compile; no torch._dynamo import needed
            model = model._orig_mod
        else:
            return model


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


def keep_freed_memory(libc_name: str = "libc.so.6") -> bool:
    """Ask glibc's malloc to keep freed memory for reuse: by default it serves blocks over a few MB with fresh
    mmap()s and trims the heap on free, so every CPU training step page-faults its activations in again
    (simple_baseline, 100 steps on 2 cores: 2.3-2.5 million minor faults before, 0.39 million with this;
    numerics unchanged). MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the environment still win.
    Returns False where there is no glibc (macOS, Windows, musl)."""
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
