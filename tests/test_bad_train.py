"""train.py under careless and hostile input: no hang, no lost work, no raw traceback. Each case gets one clear
line naming the file or flag, found before the first training step where it can be."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import train
from oracles import ROOT

XS = str(ROOT / "model_configs" / "MiniCLIP-XS-32px.json")


def make_data(root, splits=("train",) * 12 + ("val",) * 4 + ("test",) * 4, unreadable=()):
    """A Karpathy-layout caption file over 32-px PNGs (the i-th image has split splits[i]); `unreadable`: indices
    whose file holds junk bytes instead of an image."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, split in enumerate(splits):
        path = images / f"{i}.png"
        if i in unreadable:
            path.write_bytes(b"not an image")
        else:
            Image.new("RGB", (32, 32), (20 * i % 256, 0, 255 - 20 * i % 256)).save(path)
        entries.append({"filename": f"{i}.png", "split": split,
                        "sentences": [{"raw": f"picture number {i}"}, {"raw": f"image {i}"}]})
    (root / "captions.json").write_text(json.dumps({"images": entries}))
    return root / "captions.json", images


def argv(data, out, *extra, steps=3):
    caption_file, images = data
    return ["--config", XS, "--data", str(caption_file), "--images", str(images), "--out", str(out),
            "--max-steps", str(steps), "--batch-size", "4", "--workers", "0", "--warmup", "1", *extra]


def error_of(args):
    """The SystemExit message of train.main(args): asserts it is one line starting with "error: "."""
    with pytest.raises(SystemExit) as e:
        train.main(args)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def run(args, timeout=120, wait=True):
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def data(tmp_path):
    return make_data(tmp_path / "data")


# ----------------------------------------------------------------------------- the bad cases: hangs and lost work


@pytest.mark.parametrize("flag, value", [("--batch-size", "1"), ("--batch-size", "0"), ("--batch-size", "-4"),
                                         ("--epochs", "0"), ("--max-steps", "-1"), ("--save-every", "0")])
def test_pointless_settings_are_refused_at_parse_time(flag, value, capsys):
    """--batch-size 1 used to hang forever (every one-image batch was skipped); the others ran for nothing."""
    with pytest.raises(SystemExit) as e:
        train.get_args([flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_all_images_unreadable_stops_instead_of_looping(tmp_path):
    """Used to loop forever, printing a warning per batch."""
    data = make_data(tmp_path / "data", splits=("train",) * 8, unreadable=range(8))
    result = run(argv(data, tmp_path / "run", "--val-split", "", "--test-split", ""), timeout=90)
    assert result.returncode == 1 and "error: " in result.stderr and "unreadable" in result.stderr
    assert "Traceback" not in result.stderr


def test_mostly_unreadable_images_stop_the_run_naming_them(tmp_path):
    splits = ("train",) * 16
    data = make_data(tmp_path / "data", splits=splits, unreadable=range(0, 16, 2))  # half of them
    message = error_of(argv(data, tmp_path / "run", "--val-split", "", "--test-split", "", steps=20))
    assert "unreadable" in message and ".png" in message


def test_a_second_run_into_the_same_folder_is_refused_naming_the_first(data, tmp_path):
    out = tmp_path / "run"
    first = run(argv(data, out, steps=100000), wait=False)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()
        second = run(argv(data, out, "--resume"))  # even --resume must wait for the first run to end
        assert second.returncode == 1 and f"PID {first.pid}" in second.stderr, second.stderr
    finally:
        first.kill()
        first.wait()


def test_absent_default_split_is_skipped_and_a_typed_one_is_an_error(tmp_path):
    """A file with train and test splits only: the default --val-split is skipped with a note; a typed one stops
    the run before the first step (it used to fail after training, before the first checkpoint)."""
    data = make_data(tmp_path / "data", splits=("train",) * 12 + ("test",) * 4)
    message = error_of(argv(data, tmp_path / "typed", "--val-split", "val"))
    assert "'val'" in message and not (tmp_path / "typed" / "metrics.jsonl").exists()
    train.main(argv(data, tmp_path / "default"))
    assert (tmp_path / "default" / "results_test.json").exists() and not (tmp_path / "default" / "results_val.json").exists()


def test_missing_val_image_is_found_before_the_first_step(data, tmp_path):
    (data[1] / "13.png").unlink()  # a val image
    message = error_of(argv(data, tmp_path / "run"))
    assert "13.png" in message and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unreadable_test_image_is_one_line_and_training_is_saved(tmp_path):
    """With DataLoader workers, a bad image used to be a 25-line worker traceback, after an unsaved run."""
    data = make_data(tmp_path / "data", unreadable=(17,))  # a test image
    result = run(argv(data, tmp_path / "run", "--workers", "2"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "17.png" in result.stderr
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 3


def test_a_folder_holding_an_earlier_run_is_not_overwritten(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / "results_test.json").write_text("{}")
    message = error_of(argv(data, out))
    assert "--resume" in message and (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


@pytest.mark.parametrize("damage", ["truncated", "empty", "state dict"])
def test_resume_falls_back_to_the_previous_checkpoint(data, tmp_path, damage, capsys):
    out = tmp_path / "run"
    train.main(argv(data, out, "--save-every", "2", "--val-split", "", "--test-split", "", steps=4))
    assert torch.load(out / "last.prev.pt", weights_only=True)["step"] == 2  # the save before the last one
    last = out / "last.pt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    elif damage == "empty":
        last.write_bytes(b"")
    else:
        torch.save(torch.load(last, weights_only=True)["model"], last)  # weights only, no training state
    capsys.readouterr()
    train.main(argv(data, out, "--resume", steps=4))
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "last.prev.pt (step 2)" in printed
    assert torch.load(last, weights_only=True)["step"] == 4  # continued from step 2 and finished
    last.write_bytes(b"")
    (out / "last.prev.pt").write_bytes(b"")
    message = error_of(argv(data, out, "--resume", steps=4))
    assert "last.pt" in message and "last.prev.pt" in message


# ----------------------------------------------------------------------------- the poor cases


def test_ctrl_c_saves_and_says_how_to_continue(data, tmp_path):
    straight = tmp_path / "straight"
    run(argv(data, straight, "--val-split", "", "--test-split", "", steps=40))
    out = tmp_path / "run"
    proc = run(argv(data, out, "--val-split", "", "--test-split", "", "--save-every", "1000", steps=40), wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (
            not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    step = torch.load(out / "last.pt", weights_only=True)["step"]
    assert proc.returncode != 0 and f"interrupted at step {step}" in err and "--resume" in err and 5 <= step < 40
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    resumed = run(argv(data, out, "--resume", "--val-split", "", "--test-split", "", steps=40))
    assert resumed.returncode == 0, resumed.stderr
    a, b = (torch.load(p / "last.pt", weights_only=True)["model"] for p in (straight, out))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the interrupted run ends exactly where the straight one does


def test_disk_full_while_saving_names_the_last_good_step(data, tmp_path, monkeypatch):
    save, calls = torch.save, [0]

    def fail_second(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            (f if hasattr(f, "write") else open(f, "wb")).write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", fail_second)
    out = tmp_path / "run"
    message = error_of(argv(data, out, "--save-every", "2", "--val-split", "", "--test-split", "", steps=4))
    assert "No space left" in message and "step 4" in message
    assert not list(out.glob("*.tmp")) and torch.load(out / "last.pt", weights_only=True)["step"] == 2


def test_torn_metrics_line_does_not_block_resume(data, tmp_path):
    out = tmp_path / "run"
    train.main(argv(data, out, "--val-split", "", "--test-split", "", "--save-every", "2", steps=4))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a run killed in the middle of a write
    train.main(argv(data, out, "--resume", "--val-split", "", "--test-split", "", steps=4))
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_resume_keeps_save_every_and_notices_an_edited_caption_file(data, tmp_path):
    import run_state
    out = tmp_path / "run"
    train.main(argv(data, out, "--val-split", "", "--test-split", "", "--save-every", "3", steps=4))
    saved = torch.load(out / "last.pt", weights_only=True)["args"]
    resumed = run_state.resumed_args(train.get_args(["--resume"]), ["--resume"], saved, 1)
    assert resumed.save_every == 3 and resumed.val_split == ""
    assert run_state.resumed_args(train.get_args(["--save-every", "7"]), ["--save-every", "7"], saved, 1).save_every == 7
    caption_file = data[0]
    caption_file.write_text(caption_file.read_text().replace("picture number 1", "picture number one"))
    message = error_of(argv(data, out, "--resume", steps=4))
    assert str(caption_file) in message and "changed" in message


def test_resume_with_an_optimizer_state_that_does_not_fit_is_one_line(data, tmp_path):
    """A checkpoint whose optimizer has other parameter groups than this run builds (here: a text-lr-scale run saved
    without the key, as an edited train.py would write it) is refused with what to do, not torch's bare error."""
    out = tmp_path / "run"
    train.main(argv(data, out, "--val-split", "", "--test-split", "", "--text-lr-scale", "0.1", steps=2))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    del ckpt["args"]["text_lr_scale"]  # resumes with 1.0: two parameter groups where the state has four
    torch.save(ckpt, out / "last.pt")
    message = error_of(argv(data, out, "--resume", steps=4))
    assert "optimizer state does not fit" in message and "--init" in message


def test_config_with_a_checkpoint_is_checked_against_it(data, tmp_path):
    train.main(argv(data, tmp_path / "a", "--val-split", "", "--test-split", "", steps=2))
    other = ROOT / "model_configs" / "MiniCLIP-S-64px.json"
    message = error_of(argv(data, tmp_path / "b", "--init", str(tmp_path / "a" / "last.pt"), "--config", str(other)))
    assert "config does not match" in message


@pytest.mark.parametrize("device", ["gpu0", "cuda:7" if not torch.cuda.is_available() else "gpu1"])
def test_unusable_device_is_one_line(data, tmp_path, device):
    assert f"--device {device}" in error_of(argv(data, tmp_path / "run", "--device", device))


def test_out_that_is_a_file_or_unwritable_is_one_line(data, tmp_path):
    (tmp_path / "file").write_text("x")
    assert "--out" in error_of(argv(data, tmp_path / "file"))
    assert "--out" in error_of(argv(data, tmp_path / "file" / "sub"))


def test_adapters_data_that_is_a_file_is_one_line(data, tmp_path):
    import adapters
    (tmp_path / "ckpt.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        adapters.main(["--method", "linear-probe", "--init", str(tmp_path / "ckpt.pt"), "--data", str(data[0])])
    assert str(e.value.code).startswith("error: --data") and "ImageFolder" in str(e.value.code)
