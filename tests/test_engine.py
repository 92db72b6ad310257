"""Tests of the shared training loop (common/engine.py), runs (common/runs.py: the flags, presets, folders and
checkpoints) and the pretrained-weights policy (common/pretrained.py): two-process DDP, exact mid-epoch resume,
atomic checkpoints, non-finite losses, best-k, TensorBoard, presets, the checkpoint contract, --pretrained.
All on CPU with a 64-sample data set and a ~300-parameter model.
"""
import argparse
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common import engine, pretrained, runs
from common.data import BadImageError
from common.engine import fit
from common.loader import make_loader
from common.runs import load_checkpoint, newest_checkpoint, output_dirs, save_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_worker as tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_tiny(tmp_path, *flags, compute_loss=tiny.mse_loss, **train_kwargs):
    args = tiny.make_parser().parse_args(["--out", str(tmp_path), "--device", "cpu", *flags])
    model, optimizer, scheduler = tiny.build(args)
    train_kwargs.setdefault("scheduler_interval", "step")
    dataset = train_kwargs.pop("dataset", None) or tiny.NoisyRegression()
    return fit(args, model, dataset, compute_loss, optimizer, scheduler=scheduler, model_name="tiny",
               arch=tiny.ARCH, settings={"note": "tiny"}, **train_kwargs)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_torchrun_two_ranks_end_with_equal_weights(tmp_path):
    with socket.socket() as s:      # a free port, so parallel test runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POSE_OUTPUT_ROOT": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", str(REPO / "tests" / "_ddp_worker.py"),
           "--out", str(tmp_path), "--device", "cpu", "--max-steps", "5", "--sync-bn", "--workers", "0"]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert_same_weights(rank0, rank1)
    # The ranks really trained (SGD moved the weights away from the seeded init).
    torch.manual_seed(0)
    assert not torch.equal(tiny.tiny_model().state_dict()["0.weight"], rank0["0.weight"])


def test_two_nodes_with_c10d_rendezvous_and_unshared_roots(tmp_path):
    """Two single-process "machines" on localhost (torchrun --nnodes=2, gloo, a c10d rendezvous), each with its own
    output root: each renders the built-in data into its root before training, and both end with the same weights."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = []
    for node in range(2):
        root = tmp_path / f"node{node}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=posezoo-test",
               str(REPO / "tests" / "_ddp_worker.py"), "--out", str(root), "--device", "cpu", "--max-steps", "4",
               "--workers", "0", "--scenes", "2"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "POSE_OUTPUT_ROOT": str(root)}
        nodes.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(out[-3000:] for out in outputs)
    weights = [list((tmp_path / f"node{node}").glob("rank*.pt")) for node in range(2)]
    assert sorted(path.name for paths in weights for path in paths) == ["rank0.pt", "rank1.pt"]
    for node in range(2):
        assert len(list((tmp_path / f"node{node}" / "data" / "multi_person" / "images" / "train").iterdir())) == 2
    assert_same_weights(*(torch.load(paths[0], weights_only=True) for paths in weights))


def test_resume_mid_epoch_gives_identical_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path))

    def evaluate(model):    # draws random numbers on purpose: validation must not move the training RNG
        return {"score": float(torch.rand(1)) + float(torch.from_numpy(__import__("numpy").random.rand(1)))}

    common = ["--workers", "2", "--val-every", "5", "--max-steps"]
    straight, _ = run_tiny(tmp_path / "a", *common, "12", "--run-name", "straight", evaluate=evaluate,
                           best_metric="score")
    # 64 samples / batch 8 = 8 steps per epoch: stop at step 3 (mid-epoch 0), resume across the epoch end.
    run_tiny(tmp_path / "b", *common, "3", "--run-name", "split", evaluate=evaluate, best_metric="score")
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoints" / "tiny" / "split" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]) == (0, 3, 3)
    resumed, summary = run_tiny(tmp_path / "b", *common, "12", "--resume", "auto", evaluate=evaluate,
                                best_metric="score")
    assert summary["run_name"] == "split" and summary["steps"] == 12
    assert_same_weights(straight.state_dict(), resumed.state_dict())
    # and the comparison is not vacuous: a different seed trains to different weights
    other, _ = run_tiny(tmp_path / "c", *common, "12", "--seed", "1", "--workers", "0")
    assert not torch.equal(other.state_dict()["0.weight"], straight.state_dict()["0.weight"])


def test_resume_with_accumulation_clipping_and_fp16_scaler(tmp_path, monkeypatch):
    """Same exactness through gradient accumulation (7 micro-batches per epoch: a partial window at each
    epoch end), gradient clipping, the fp16 GradScaler state, a per-epoch schedule and per-epoch validation;
    single process, workers=0 (main-process loading must not move the training RNG either)."""
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path))
    flags = ["--accumulate", "2", "--clip-grad", "0.5", "--amp", "fp16", "--batch-size", "9", "--val-every", "1e",
             "--max-steps"]
    kwargs = dict(scheduler_interval="epoch", evaluate=lambda m: {"r": float(torch.rand(1))}, best_metric="r")
    straight, _ = run_tiny(tmp_path, *flags, "7", "--run-name", "straight", **kwargs)
    run_tiny(tmp_path, *flags, "2", "--run-name", "split", **kwargs)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "tiny" / "split" / "last.pt")
    assert ckpt["scaler"] is not None and ckpt["batch_in_epoch"] == 4
    resumed, summary = run_tiny(tmp_path, *flags, "7", "--resume", str(tmp_path / "checkpoints/tiny/split/last.pt"),
                                **kwargs)
    assert summary["steps"] == 7 and summary["epochs"] == 1
    assert_same_weights(straight.state_dict(), resumed.state_dict())


def test_checkpoint_write_killed_midway_leaves_previous_loadable(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "m" / "run" / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    real_save = torch.save

    def dies_halfway(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(runs.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]      # the half-written temp file is gone
    # A SIGKILL gets no clean-up: the half-written temp file stays, and nothing reads it.
    monkeypatch.setattr(runs.os, "unlink", lambda p: None)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 3, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert len(list(path.parent.glob(".last.pt.*.tmp"))) == 1
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert newest_checkpoint("m", out=tmp_path) == path
    with pytest.raises(SystemExit, match="cannot load checkpoint"):     # one line, not a traceback
        load_checkpoint(next(path.parent.glob(".last.pt.*.tmp")))


def test_nonfinite_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path))
    calls = []

    def loss_goes_nan(model, batch):
        calls.append(1)
        loss, parts = tiny.mse_loss(model, batch)
        if len(calls) == 5:
            loss = loss * float("nan")
            parts["mse"] = float("nan")
        return loss, parts

    with pytest.raises(SystemExit) as excinfo:
        run_tiny(tmp_path, "--val-every", "2", "--run-name", "r", compute_loss=loss_goes_nan)
    message = str(excinfo.value.code)
    assert "non-finite loss at step 5" in message and "mse" in message and "\n" not in message
    last = tmp_path / "checkpoints" / "tiny" / "r" / "last.pt"
    assert str(last) in message
    state = load_checkpoint(last)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_best_k_tensorboard_and_weights_only_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path))
    scores = iter([0.1, 0.5, 0.3, 0.7, 0.2, 0.6])
    images = []

    def log_images(model, batch):
        images.append(batch["x"].shape)
        return {"pred": torch.zeros(4, 5, 3, dtype=torch.uint8).numpy()}

    _, summary = run_tiny(tmp_path, "--val-every", "2", "--max-steps", "12", "--keep-best", "2",
                          "--hist-every", "4", "--run-name", "r", evaluate=lambda m: {"ap": next(scores)},
                          best_metric="ap", log_images=log_images)
    ckpt_dir = tmp_path / "checkpoints" / "tiny" / "r"
    # validations at steps 2, 4, ..., 12 scored .1 .5 .3 .7 .2 .6: the best two are steps 8 and 12
    assert sorted(p.name for p in ckpt_dir.glob("best_step*.pt")) == ["best_step00000008.pt", "best_step00000012.pt"]
    assert load_checkpoint(ckpt_dir / "best.pt")["step"] == 8
    # one full file for --resume; the best ones hold the weights only, and best.pt is the best one's second name
    assert (ckpt_dir / "best.pt").stat().st_ino == (ckpt_dir / "best_step00000008.pt").stat().st_ino
    assert "optimizer" in load_checkpoint(ckpt_dir / "last.pt")
    assert not {"optimizer", "rng"} & set(load_checkpoint(ckpt_dir / "best_step00000012.pt"))
    assert summary["best_checkpoint"] == ckpt_dir / "best_step00000008.pt"
    assert newest_checkpoint("tiny") == ckpt_dir / "best.pt"
    assert newest_checkpoint("tiny", names=("last.pt",)) == ckpt_dir / "last.pt"
    for path in ckpt_dir.glob("*.pt"):
        state = torch.load(path, weights_only=True)     # numpy/python RNG states stored as tensors
        assert state["config"]["batch_size"] == 8
    engine.set_rng_state(load_checkpoint(ckpt_dir / "last.pt")["rng"][0])
    assert len(images) == 6
    events = list((tmp_path / "tensorboard_logs" / "tiny" / "r").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_tensorboard_tags_and_a_run_shorter_than_log_every(tmp_path, monkeypatch):
    """One tag scheme for the five folders; a run shorter than --log-every still logs its loss and LR."""
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path))
    run_tiny(tmp_path, "--max-steps", "3", "--log-every", "100", "--run-name", "r",
             evaluate=lambda m: {"loss/val": 1.0, "ap": 0.5}, best_metric="ap",
             log_images=lambda model, batch: {"pred": np.zeros((4, 5, 3), np.uint8)})
    events = EventAccumulator(str(tmp_path / "tensorboard_logs" / "tiny" / "r")).Reload()
    assert set(events.Tags()["scalars"]) == {"loss/train", "loss/mse", "lr", "loss/val", "metrics/ap"}
    assert events.Tags()["images"] == ["images/pred"]
    assert [event.step for event in events.Scalars("loss/train")] == [3]


class SomeUnreadable(tiny.NoisyRegression):
    """Samples 3, 4 and 5 are 'unreadable images'; with batch 3 and no shuffling one batch is all bad."""

    def __getitem__(self, i):
        if i in (3, 4, 5):
            raise BadImageError(f"img{i}.png: empty file (0 bytes)")
        return super().__getitem__(i)


def test_early_stopping_after_patience_validations_without_improvement(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path))
    scores = iter([0.5, 0.7, 0.6, 0.7, 0.65, 0.9, 0.9, 0.9])   # best 0.7 at validation 2, then no new best

    def evaluate(model):
        return {"score": next(scores)}

    _, summary = run_tiny(tmp_path, "--val-every", "2", "--max-steps", "16", evaluate=evaluate,
                          best_metric="score", early_stopping_patience=3)
    assert summary["steps"] == 10 and summary["metrics"]["score"] == 0.65   # validations at steps 2..10
    assert "early stopping: score has not improved in 3 validations" in capsys.readouterr().out
    ckpt = load_checkpoint(summary["last_checkpoint"])
    assert ckpt["early_stopping"] == {"stale": 3, "best_value": 0.7}


def test_bad_samples_are_skipped_counted_and_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path))
    monkeypatch.setattr(engine, "make_loader", lambda *a, **k: make_loader(*a, **{**k, "shuffle": False}))
    with pytest.warns(UserWarning) as caught:
        _, summary = run_tiny(tmp_path, "--epochs", "1", "--batch-size", "3", dataset=SomeUnreadable(size=12))
    assert sorted(str(w.message).split(": ")[1] for w in caught) == ["img3.png", "img4.png", "img5.png"]
    assert summary["num_skipped"] == 3 and summary["steps"] == 3     # 4 batches, the all-bad one skipped
    assert "skipped 3 bad samples" in capsys.readouterr().out


def test_init_from_loads_weights_only(tmp_path, monkeypatch):
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path))
    first, _ = run_tiny(tmp_path, "--max-steps", "2", "--run-name", "a")
    args = tiny.make_parser().parse_args(["--device", "cpu", "--max-steps", "0", "--run-name", "b",
                                          "--init-from", str(tmp_path / "checkpoints/tiny/a/last.pt")])
    model, optimizer, _ = tiny.build(args)
    model, summary = fit(args, model, tiny.NoisyRegression(), tiny.mse_loss, optimizer, model_name="tiny",
                         arch=tiny.ARCH, settings={})
    assert summary["steps"] == 0      # a fresh run (step 0), only the weights came from the checkpoint
    assert_same_weights(first.state_dict(), model.state_dict())
    # run_dirs names the folder a run will write: the resumed run's, else --run-name, else a timestamp
    parse = tiny.make_parser().parse_args
    assert runs.run_dirs(parse(["--device", "cpu", "--resume", "auto"]), "tiny")["run_name"] == "b"   # the newest
    args = parse(["--device", "cpu", "--resume", "auto", "--run-name", "c"])
    assert runs.run_dirs(args, "tiny")["run_name"] == "c" and runs.resume_path(args, "tiny") is None
    args = parse(["--device", "cpu", "--resume", "auto", "--run-name", "a"])
    assert runs.resume_path(args, "tiny") == tmp_path / "checkpoints/tiny/a/last.pt"
    # a run name or `newest` instead of a path (issue 20): run a's file by its name, run b's as the newest
    assert runs.resume_path(parse(["--resume", "a"]), "tiny") == tmp_path / "checkpoints/tiny/a/last.pt"
    assert runs.resume_path(parse(["--resume", "newest"]), "tiny") == tmp_path / "checkpoints/tiny/b/last.pt"
    assert runs.checkpoint_from_spec("a", "tiny") == tmp_path / "checkpoints/tiny/a/last.pt"   # a has no best.pt
    with pytest.raises(SystemExit, match="--init-from nope: no such file, and no best.pt or last.pt in .*tiny/nope"):
        runs.checkpoint_from_spec("nope", "tiny")
    args = tiny.make_parser().parse_args(["--device", "cpu", "--max-steps", "0", "--run-name", "d", "--init-from", "a"])
    model, optimizer, _ = tiny.build(args)
    model, _ = fit(args, model, tiny.NoisyRegression(), tiny.mse_loss, optimizer, model_name="tiny", arch=tiny.ARCH,
                   settings={})
    assert_same_weights(first.state_dict(), model.state_dict())


def test_cli_vocabulary_and_output_dirs(tmp_path, monkeypatch):
    parser = tiny.make_parser()
    for flag in ("--data", "--ann", "--checkpoint", "--out", "--device", "--epochs", "--max-steps", "--batch-size",
                 "--lr", "--seed", "--workers", "--run-name", "--resume", "--init-from", "--pretrained", "--amp",
                 "--sync-bn", "--clip-grad", "--accumulate", "--val-every", "--log-every", "--hist-every",
                 "--keep-best"):
        assert flag in parser.format_help()
    args = parser.parse_args([])
    assert args.pretrained == "none" and args.batch_size == 8       # per-model default wins
    with pytest.raises(TypeError):
        runs.add_common_args(argparse.ArgumentParser(), batchsize=3)
    for role, absent in (("eval", "--lr"), ("infer", "--data")):
        text = runs.add_common_args(argparse.ArgumentParser(), role=role).format_help()
        assert "--checkpoint" in text and "--device" in text and absent not in text
    assert engine.parse_val_every("1e") == ("epoch", 1)
    assert engine.parse_val_every("500") == ("step", 500)
    assert engine.parse_val_every("0") == (None, 0)
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path))
    dirs = output_dirs("m", "run1")
    assert dirs["checkpoints"] == tmp_path / "checkpoints" / "m" / "run1"
    assert dirs["tensorboard"] == tmp_path / "tensorboard_logs" / "m" / "run1"
    assert output_dirs("m", "run1", out=tmp_path / "x")["outputs"] == tmp_path / "x" / "outputs" / "m" / "run1"
    assert newest_checkpoint("m") is None


# ---------------------------------------------------------------------------------------------------------
# --pretrained

@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: any download attempt raises; the torch hub cache is an empty temporary folder."""
    def no_network(*a, **k):
        raise urllib.error.URLError("network is unreachable (test)")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path


def test_pretrained_none_never_touches_network(offline, monkeypatch):
    def must_not_be_called(*a, **k):
        raise AssertionError("network used with --pretrained none")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", must_not_be_called)
    loaded = []
    assert pretrained.resolve_pretrained("none", filename="w.pth", url="https://example.invalid/w.pth",
                                         load_fn=loaded.append) is None
    assert loaded == []


def test_pretrained_imagenet_offline_stops_with_one_line(offline):
    with pytest.raises(SystemExit) as excinfo:
        pretrained.resolve_pretrained("imagenet", filename="resnet18-f37072fd.pth",
                                      url="https://example.invalid/resnet18-f37072fd.pth", load_fn=print)
    message = str(excinfo.value.code)
    expected = offline / "torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in message and "--pretrained none" in message and "--pretrained PATH" in message
    assert "\n" not in message


def test_pretrained_imagenet_from_cache_and_from_path(offline):
    weights = {"w": torch.arange(3.0)}
    cached = offline / "torch_home" / "hub" / "checkpoints" / "tiny.pth"
    cached.parent.mkdir(parents=True)
    torch.save(weights, cached)
    loaded = []
    assert pretrained.resolve_pretrained("imagenet", filename="tiny.pth", url="https://example.invalid/tiny.pth",
                                         load_fn=loaded.append) == cached
    other = offline / "mine.pt"
    torch.save({"model": weights, "step": 3}, other)    # one of our checkpoints works as --pretrained PATH
    assert pretrained.resolve_pretrained(str(other), filename="tiny.pth", load_fn=loaded.append) == other
    assert all(torch.equal(d["w"], weights["w"]) for d in loaded) and len(loaded) == 2
    with pytest.raises(SystemExit, match="no such file"):
        pretrained.resolve_pretrained(str(offline / "missing.pt"), filename="tiny.pth", load_fn=print)


def test_planned_steps_match_what_the_loop_runs():
    def plan(epochs, max_steps, accumulate=1, world_size=1):
        return engine.planned_steps(argparse.Namespace(batch_size=16, epochs=epochs, max_steps=max_steps,
                                              accumulate=accumulate, world_size=world_size), 1000)

    assert plan(4, None) == 4 * 62          # 1000 // 16 full batches per epoch
    assert plan(6, 1000) == 372 and plan(6, 300) == 300   # whichever limit ends the run first
    assert plan(None, 50) == 50
    assert plan(2, None, accumulate=4) == 2 * 16          # ceil(62 / 4): the leftover micro-batches step too
    assert plan(1, None, world_size=2) == 31
    with pytest.raises(SystemExit, match="--epochs or --max-steps"):
        plan(None, None)


_PAGE_FAULTS_SCRIPT = """
import resource, sys
import numpy as np
from common.engine import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):   # a training step: 20 activations of 12 MiB alive at the peak, then all freed
    blocks = [np.ones(3 << 20, np.float32) for _ in range(20)]
    del blocks
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_keep_freed_memory_stops_page_faulting_big_blocks_back_in():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    root = str(Path(__file__).resolve().parents[1])

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS_SCRIPT, mode], cwd=root, env=env,
                             capture_output=True, text=True, check=True).stdout.split()
        return out[0], int(out[1])

    applied, kept = faults("keep")
    if applied != "True":
        pytest.skip("not glibc")
    _, default = faults("default")
    # By default glibc trims the heap after each step and faults it back in the next (in 4 KiB pages or
    # transparent huge pages); kept, only the first step faults.
    assert default > 4 * kept, (default, kept)


# ---------------------------------------------------------------------------------------------------------
# presets and the checkpoint contract

def test_preset_defaults_apply_before_parsing_and_flags_override(capsys):
    presets = {"cpu": {"lr": 0.5, "epochs": 3}, "big": {"lr": 0.01, "epochs": 90}}

    def parse(argv, **kwargs):
        return runs.parse_with_preset(runs.add_common_args(argparse.ArgumentParser()), presets, argv, **kwargs)

    assert (parse([]).preset, parse([]).lr, parse([]).epochs) == ("cpu", 0.5, 3)
    assert (parse(["--preset", "big"]).lr, parse(["--preset", "big", "--lr", "2"]).lr) == (0.01, 2.0)
    assert parse(["--data", "x"], default_with_data="big").preset == "big"
    with pytest.raises(SystemExit):
        parse(["--preset", "big", "--help"])
    assert "(default: 0.01)" in capsys.readouterr().out    # --help shows the active preset's values
    with pytest.raises(TypeError, match="no flag"):
        runs.parse_with_preset(argparse.ArgumentParser(), {"cpu": {"nope": 1}}, [])


def test_checkpoints_carry_arch_and_settings_and_rebuild_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path))
    trained, summary = run_tiny(tmp_path, "--max-steps", "2", "--run-name", "r")
    checkpoint = load_checkpoint(summary["last_checkpoint"])
    assert checkpoint["format"] == runs.CHECKPOINT_FORMAT and checkpoint["arch"] == tiny.ARCH
    assert checkpoint["settings"] == {"note": "tiny"}
    model, loaded = runs.model_from_checkpoint(summary["last_checkpoint"], tiny.tiny_model, "tiny")
    assert_same_weights(model.state_dict(), trained.state_dict()) and not model.training
    with pytest.raises(SystemExit, match="not a other checkpoint"):
        runs.model_from_checkpoint(summary["last_checkpoint"], tiny.tiny_model, "other")
    del checkpoint["arch"]
    save_checkpoint(tmp_path / "no_arch.pt", checkpoint)
    with pytest.raises(SystemExit, match=r"no_arch.pt: checkpoint has no 'arch'"):
        runs.model_from_checkpoint(tmp_path / "no_arch.pt", tiny.tiny_model, "tiny")
    checkpoint["format"] = 1
    save_checkpoint(tmp_path / "old.pt", checkpoint)
    with pytest.raises(SystemExit, match="format 1 is too old"):
        runs.model_from_checkpoint(tmp_path / "old.pt", tiny.tiny_model, "tiny")
    upgraded, _ = runs.model_from_checkpoint(tmp_path / "old.pt", tiny.tiny_model, "tiny",
                                             upgrade=lambda ckpt, path: {**ckpt, "arch": tiny.ARCH})
    assert_same_weights(upgraded.state_dict(), trained.state_dict())
