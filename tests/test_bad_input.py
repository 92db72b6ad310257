"""Bad input and faults end in one clear line and the right exit status, never a traceback; a stop signal or a
full disk loses no finished work (issue 19). Scripts run as `python <script>` would (runpy, in this process,
which is much cheaper than a subprocess); the Ctrl-C test sends a real SIGINT to a real training process."""
import errno
import io
import json
import os
import pickle
import runpy
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from common import runs
from common.data import exit_on_bad_input
from common.runs import load_checkpoint, save_checkpoint
from higher_hrnet.checkpoints import CheckpointError, read_state_dict

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_worker as tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_script(script, *argv, monkeypatch, capsys):
    """(exit status, what the user reads on stderr) of `python script argv` run in this process."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / script), run_name="__main__")
    code, err = done.value.code, capsys.readouterr().err
    return (1, err + code) if isinstance(code, str) else (code, err)


def fake_checkpoint(path, model_name):
    torch.save({"format": 2, "model_name": model_name, "arch": {}, "settings": {}, "model": {}}, path)
    return path


def pickled_file(path):
    torch.save({"state_dict": {"w": torch.zeros(2)}, "args": __import__("argparse").Namespace(lr=1)}, path)
    return path


@pytest.fixture
def out_root(tmp_path, monkeypatch):
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path))
    return tmp_path


def bad_cases(tmp):
    """(script, argv, what the one line must say) for each bad input of the issue."""
    (tmp / "broken.json").write_text("{bad")
    wrong_count = {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
                   "categories": [{"id": 1, "keypoints": ["a", "b"]}],
                   "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "keypoints": [1, 1, 2]}]}
    (tmp / "wrong_count.json").write_text(json.dumps(wrong_count))
    (tmp / "a_file").write_text("")
    simple = fake_checkpoint(tmp / "simple.pt", "simple_baseline")
    cpm = fake_checkpoint(tmp / "cpm.pt", "cpm_animal")
    hrnet = fake_checkpoint(tmp / "hrnet.pt", "higher_hrnet")
    coco = ["--format", "coco", "--data", tmp, "--ann"]
    return [
        ("simple_baseline/train.py", [*coco, tmp / "broken.json"], "broken.json: malformed JSON"),
        ("simple_baseline/train.py", [*coco, tmp / "wrong_count.json"],
         "wrong_count.json: annotation 7: 3 keypoint values, expected 51"),
        ("pose_spi/eval.py", ["--checkpoint", simple], "not a pose_spi or pose_spi_keypointrcnn checkpoint"),
        ("pose_spi/infer.py", ["--checkpoint", cpm], "not a pose_spi or pose_spi_keypointrcnn checkpoint"),
        ("rtpe/infer.py", ["--checkpoint", hrnet], "hrnet.pt: not a rtpe checkpoint (it belongs to higher_hrnet)"),
        ("pose_spi/train_keypointrcnn.py", ["--pretrained", pickled_file(tmp / "pickled.pt"), "--max-steps", 1],
         "pickled.pt: cannot load checkpoint: not a torch.save file, or it holds objects other than tensors"),
        ("higher_hrnet/train.py", ["--pretrained", simple, "--width", 4, "--max-steps", 1],
         f"--pretrained {simple}: no weights found"),
        ("pose_spi/train.py", ["--out", tmp / "a_file" / "sub", "--max-steps", 1], "a_file/sub"),
        ("cpm_animal/train.py", ["model.drop_rat=0.1"], "unknown key 'drop_rat' (did you mean: model.drop_rate?)"),
        ("cpm_animal/train.py", ["trainer.max_epochs=abc"], "trainer.max_epochs=abc: expected int like"),
    ]


def test_bad_inputs_end_in_one_line_naming_file_or_key(tmp_path, out_root, monkeypatch, capsys):
    for script, argv, expected in bad_cases(tmp_path):
        code, err = run_script(script, *argv, monkeypatch=monkeypatch, capsys=capsys)
        assert code == 1 and expected in err, (script, argv, err[-2000:])
        assert "Traceback" not in err and "weights_only` set to `False" not in err


@pytest.mark.parametrize("script, argv, flag", [
    ("pose_spi/train.py", ["--batch-size", "-4"], "--batch-size: -4 is not at least 1"),
    ("simple_baseline/train.py", ["--max-steps", "-1"], "--max-steps: -1 is not at least 0"),
    ("rtpe/train.py", ["--lr", "0"], "--lr: 0 is not above 0.0"),
    ("higher_hrnet/train.py", ["--input-size", "100"], "--input-size: 100 is not a positive multiple of 32"),
    ("higher_hrnet/eval.py", ["--input-size", "100"], "--input-size: 100 is not a positive multiple of 32"),
    ("simple_baseline/infer.py", ["--limit", "0"], "--limit: 0 is not at least 1"),
    ("pose_spi/train.py", ["--repeat", "0"], "--repeat: 0 is not at least 1"),
    ("simple_baseline/train.py", ["--sigma", "0"], "--sigma: 0 is not above 0.0"),
    ("rtpe/train.py", ["--crop-size", "-256"], "--crop-size: -256 is not at least 1"),
])
def test_numeric_flags_are_checked_at_parse_time(script, argv, flag, out_root, monkeypatch, capsys):
    code, err = run_script(script, *argv, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and flag in err.strip().splitlines()[-1]
    assert not (out_root / "data").exists()     # refused before any data was rendered or read


def test_refused_checkpoint_says_why_once_without_the_unsafe_hint(tmp_path):
    pickled = pickled_file(tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError) as error:
        read_state_dict(pickled)
    message = str(error.value)
    assert "objects other than tensors" in message and "False" not in message
    assert message.count(str(pickled)) == 1 and "\n" not in message
    with pytest.raises(SystemExit) as error:
        load_checkpoint(pickled)
    assert "objects other than tensors" in str(error.value) and str(error.value).count(str(pickled)) == 1
    plain = tmp_path / "plain.pkl"     # a plain pickle (protocol 4): refused without torch's protocol warning
    plain.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for load, refusal in ((load_checkpoint, SystemExit), (read_state_dict, CheckpointError)):
            with pytest.raises(refusal, match="objects other than tensors"):
                load(plain)


class FillsUp(io.FileIO):
    """A file on a disk that fills up after `room` bytes: the write fails partway, as on a real full disk."""
    room = 1000

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_full_disk_while_saving_says_so_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    last = tmp_path / "run" / "last.pt"
    save_checkpoint(last, {"step": 1, "w": torch.ones(3)})
    monkeypatch.setattr(runs, "open", lambda path, mode: FillsUp(path, mode), raising=False)
    with pytest.raises(SystemExit) as done:
        exit_on_bad_input(save_checkpoint, last, {"step": 2, "w": torch.zeros(10_000)})
    assert done.value.code == (f"error: {last}: disk full: cannot save checkpoint (No space left on device); "
                               "the previous last.pt is kept")
    monkeypatch.undo()
    assert [p.name for p in last.parent.iterdir()] == ["last.pt"] and load_checkpoint(last)["step"] == 1


def test_stale_temp_files_of_a_killed_write_are_removed_at_the_next_start(tmp_path):
    folder = tmp_path / "checkpoints" / "tiny" / "r"
    folder.mkdir(parents=True)
    (folder / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    args = tiny.make_parser().parse_args(["--out", str(tmp_path), "--device", "cpu", "--max-steps", "1",
                                          "--run-name", "r"])
    model, optimizer, _ = tiny.build(args)
    tiny.fit(args, model, tiny.NoisyRegression(), tiny.mse_loss, optimizer, model_name="tiny", arch=tiny.ARCH,
             settings={})
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]


def test_ctrl_c_saves_last_pt_prints_the_resume_command_and_resumes_exactly(tmp_path):
    """A real SIGINT to the whole process group of a real training process (DataLoader workers included), as
    Ctrl-C sends; the printed command continues to the weights of an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    flags = ["--out", str(tmp_path), "--device", "cpu", "--workers", "1", "--epochs", "1000"]
    process = subprocess.Popen([sys.executable, str(REPO / "tests" / "_ddp_worker.py"), *flags, "--run-name", "r"],
                               env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    events = tmp_path / "tensorboard_logs" / "tiny" / "r"
    deadline = time.time() + 120
    while not any(events.glob("events.*")) and time.time() < deadline:     # the handlers are in place
        time.sleep(0.2)
    time.sleep(1.0)     # some steps in
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    last = tmp_path / "checkpoints" / "tiny" / "r" / "last.pt"
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and f"saved {last}" in err
    command = err.strip().splitlines()[-1]
    assert command.startswith("continue with: python ") and command.endswith(f"--resume {last}")
    step = load_checkpoint(last)["step"]
    assert step > 0

    def train(*extra):
        args = tiny.make_parser().parse_args([*flags, "--max-steps", str(step + 3), *extra])
        model, optimizer, scheduler = tiny.build(args)
        return tiny.fit(args, model, tiny.NoisyRegression(), tiny.mse_loss, optimizer, scheduler=scheduler,
                        scheduler_interval="step", model_name="tiny", arch=tiny.ARCH, settings={})[0]
    resumed = train("--run-name", "r", "--resume", str(last))
    straight = train("--run-name", "straight")
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_checkpoints_know_their_training_file_by_content(tmp_path, capsys):
    """Every eval.py asks is_training_file: a copy of --ann, or its path spelled another way, is the training file."""
    ann = tmp_path / "train.json"
    ann.write_text('{"images": []}')
    args = tiny.make_parser().parse_args(["--out", str(tmp_path), "--device", "cpu", "--max-steps", "1",
                                          "--run-name", "r", "--ann", str(ann)])
    model, optimizer, _ = tiny.build(args)
    tiny.fit(args, model, tiny.NoisyRegression(), tiny.mse_loss, optimizer, model_name="tiny", arch=tiny.ARCH,
             settings={})
    settings = load_checkpoint(tmp_path / "checkpoints" / "tiny" / "r" / "last.pt")["settings"]
    copy = tmp_path / "copy.json"
    copy.write_bytes(ann.read_bytes())
    capsys.readouterr()
    assert runs.is_training_file(tmp_path / ".." / tmp_path.name / "train.json", settings)
    assert runs.is_training_file(copy, settings, warn=True)
    assert f"warning: {copy} is the annotation file this checkpoint was trained on" in capsys.readouterr().out
    copy.write_text('{"images": [], "annotations": []}')
    assert not runs.is_training_file(copy, settings, warn=True) and not capsys.readouterr().out
