"""
Bad input gets one clear line naming the file or flag and what to do: never a bare traceback, a hang, or lost work,
and what a run will read is checked before its first step. Caption files (read_captions), image paths
(check_images), test.py's evaluations, DataLoader workers, and plot.py.
"""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import plot
from checkpoints import save_checkpoint
from data import Record, check_images, read_captions
from evaluate import evaluate_retrieval
from model import CLIP, CLIPConfig
from oracles import ROOT
from transform import ImageLoadError

# test.py by path: the standard library has a package named `test` too
_spec = importlib.util.spec_from_file_location("miniclip_test_bad_data", ROOT / "test.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def one_line(message):
    return "\n" not in message.strip() and "Traceback" not in message


def karpathy(*images):
    return json.dumps({"images": [dict(split="test", **im) for im in images]})


GOOD = {"filename": "good.jpg", "sentences": [{"raw": "a dog."}]}

# ----------------------------------------------------------------------------- caption files


@pytest.mark.parametrize("content, needles", [
    (karpathy(GOOD, {"filename": "a.jpg", "sentences": []}), ["a.jpg", "no captions", "remove the entry"]),
    (karpathy({"filename": "a.jpg", "sentences": [{"raw": 5}]}), ["a.jpg", "5", "not text"]),
    (karpathy({"filename": "a.jpg", "sentences": [{"raw": "ok"}, {"raw": None}]}), ["a.jpg", "None", "not text"]),
    (karpathy({"filename": None, "sentences": [{"raw": "x"}]}), ["entry 1", "image name"]),
    (json.dumps([{"image": "a.jpg", "caption": 3}]), ["a.jpg", "3", "not text"]),
    (json.dumps([{"image": "a.jpg", "caption": None}]), ["a.jpg", "None", "not text"]),
    (json.dumps([{"image": "a.jpg", "caption": ["fine", ["nested"]]}]), ["a.jpg", "['nested']", "not text"]),
    (json.dumps([{"image": "b.jpg", "caption": "x"}, {"image": "a.jpg", "caption": []}]), ["a.jpg", "no captions"]),
], ids=["karpathy-no-sentences", "karpathy-number", "karpathy-null", "karpathy-no-filename", "list-number",
        "list-null", "list-nested-list", "list-empty"])
def test_entry_without_usable_captions_is_named(tmp_path, content, needles):
    path = tmp_path / "captions.json"
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        read_captions(path)
    message = str(e.value)
    assert str(path) in message and one_line(message) and all(n in message for n in needles), message


def test_directory_missing_file_and_binary_file_are_named(tmp_path):
    (tmp_path / "dataset_flickr30k.json").write_text(karpathy(GOOD))
    with pytest.raises(ValueError, match="is a directory: pass the caption file") as e:
        read_captions(tmp_path)
    assert str(tmp_path) in str(e.value) and "dataset_flickr30k.json" in str(e.value)
    with pytest.raises(FileNotFoundError, match=f"caption file {tmp_path / 'nope.json'} not found"):
        read_captions(tmp_path / "nope.json")
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 binary \xff\xfe")
    with pytest.raises(ValueError, match="photo.jpg is not UTF-8 text") as e:
        read_captions(tmp_path / "photo.jpg")
    assert one_line(str(e.value))


def test_duplicate_images_are_merged_with_one_warning(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text(karpathy({"filename": "a.jpg", "sentences": [{"raw": "a1"}]}, GOOD,
                             {"filename": "a.jpg", "sentences": [{"raw": "a2"}, {"raw": "a3"}]},
                             {"filename": "good.jpg", "sentences": [{"raw": "a cat."}]}))
    with pytest.warns(UserWarning) as caught:
        records = read_captions(path, "test")
    assert records == [Record("a.jpg", ["a1", "a2", "a3"]), Record("good.jpg", ["a dog.", "a cat."])]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert one_line(message) and str(path) in message and "2 images" in message and "a.jpg, good.jpg" in message
    listed = tmp_path / "list.json"  # the tutorial's list format, and Windows separators that name the same file
    listed.write_text(json.dumps([{"image": "sub\\x.png", "caption": "one"}, {"image": "sub/x.png", "caption": "two"}]))
    with pytest.warns(UserWarning, match="1 image is listed more than once"):
        assert read_captions(listed) == [Record("sub/x.png", ["one", "two"])]


def test_image_in_two_splits_is_refused(tmp_path):
    path = tmp_path / "leak.json"
    path.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "x"}]},
                                           {"filename": "a.jpg", "split": "test", "sentences": [{"raw": "y"}]}]}))
    with pytest.raises(ValueError, match=r"a.jpg.*'train'.*'test'"):
        read_captions(path, "test")
    csv = tmp_path / "leak.csv"
    csv.write_text("image,caption,split\na.jpg,x,train\na.jpg,y,test\n")
    with pytest.raises(ValueError, match=r"a.jpg.*'train'.*'test'"):
        read_captions(csv, "test")


# ----------------------------------------------------------------------------- image paths


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for path in (root / "a.png", root / "sub" / "b.png", tmp_path / "outside.png"):
        Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return root


@pytest.mark.parametrize("bad", ["../outside.png", "../../etc/passwd", "/etc/passwd", "sub/../../outside.png",
                                 "{tmp}/outside.png"])
def test_paths_leaving_the_image_root_are_refused(image_root, bad):
    bad = bad.replace("{tmp}", str(image_root.parent))
    records = [Record("a.png", ["x"]), Record(bad, ["y"])]
    with pytest.raises(ValueError) as e:
        check_images(records, image_root)
    message = str(e.value)
    assert "outside the image root" in message and bad in message and str(image_root.resolve()) in message


def test_paths_inside_the_root_pass_and_the_first_few_outside_are_named(image_root):
    (image_root / "link.png").symlink_to(image_root.parent / "outside.png")  # a symlinked dataset is fine
    inside = [Record(p, ["x"]) for p in ("a.png", "sub/b.png", "sub/../a.png", str(image_root / "a.png"), "link.png")]
    check_images(inside, image_root)
    outside = [Record(f"../{i}.png", ["x"]) for i in range(8)]
    with pytest.raises(ValueError, match="8 of 13 image paths lead outside") as e:
        check_images(inside + outside, image_root)
    assert "../4.png" in str(e.value) and "../5.png" not in str(e.value)


def test_unreadable_images_are_found_before_the_work_when_asked(image_root):
    (image_root / "page.png").write_text("<html>404 not found</html>")
    records = [Record("a.png", ["x"]), Record("page.png", ["y"])]
    check_images(records, image_root)  # existence only (cheap; the training loop skips unreadable images)
    with pytest.raises(ImageLoadError, match="(?s)1 of 2 images cannot be read.*page.png"):
        check_images(records, image_root, open_files=True)


# ----------------------------------------------------------------------------- test.py and evaluation


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny random CLIP, four images (one of them a truncated PNG: its header reads, its pixels do not), and their
    Karpathy file."""
    d = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.from_json(ROOT / "model_configs" / "MiniCLIP-XS-32px.json"))
    save_checkpoint(d / "model.pt", model, step=0)
    (d / "images").mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 0, 0)).save(d / "images" / f"{i}.png")
    good = (d / "images" / "0.png").read_bytes()
    (d / "images" / "torn.png").write_bytes(good[:len(good) // 2])
    entries = [{"filename": f"{i}.png", "sentences": [{"raw": f"picture {i}"}]} for i in range(4)]
    (d / "data.json").write_text(karpathy(*entries))
    (d / "torn.json").write_text(karpathy(*entries, {"filename": "torn.png", "sentences": [{"raw": "torn"}]}))
    return d


@pytest.fixture
def no_model(monkeypatch):
    """Bad input must be found before the model is loaded: loading it here fails the test."""
    def load_checkpoint(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(cli, "load_checkpoint", load_checkpoint)


def retrieval(run, *extra, data="data.json"):
    return ["retrieval", "--checkpoint", str(run / "model.pt"), "--data", str(run / data), "--images",
            str(run / "images"), "--workers", "0", *extra]


@pytest.mark.parametrize("argv, needle", [
    (["--data", "{run}"], "is a directory: pass the caption file"),
    (["--split", "tset"], "no split 'tset'; its splits are: test"),
    (["--json", "{run}/no/such/folder/r.json"], "--json"),
    (["--json", "{run}"], "--json"),
    (["--save-features", "{run}/data.json"], "--save-features"),
    (["--data", "{run}/outside.json"], "outside the image root"),
    (["--data", "{run}/junk.json"], "junk.png"),
])
def test_retrieval_checks_its_input_before_loading_the_model(run, no_model, argv, needle):
    (run / "outside.json").write_text(karpathy({"filename": "../data.json", "sentences": [{"raw": "x"}]}))
    (run / "junk.json").write_text(karpathy({"filename": "junk.png", "sentences": [{"raw": "x"}]}))
    (run / "images" / "junk.png").write_text("not an image")
    argv = [a.replace("{run}", str(run)) for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main(retrieval(run) + argv)  # the later --data wins
    message = str(e.value)
    assert message.startswith("error: ") and needle in message and one_line(message), message


def test_unreadable_image_in_a_dataloader_worker_is_one_line(run, tmp_path):
    """The worker's exception arrives wrapped in its traceback; the user sees the image and the cause, once."""
    with pytest.raises(SystemExit) as e:
        cli.main(retrieval(run, "--workers", "2", "--json", str(tmp_path / "r.json"), data="torn.json"))
    message = str(e.value)
    assert message.startswith("error: cannot load image ") and "torn.png" in message and one_line(message), message
    assert not (tmp_path / "r.json").exists()
    model = CLIP(CLIPConfig.from_json(ROOT / "model_configs" / "MiniCLIP-XS-32px.json"))
    with pytest.raises(ImageLoadError) as e:  # evaluate_retrieval itself (train.py's evaluations)
        evaluate_retrieval(model, read_captions(run / "torn.json"), run / "images", workers=2, progress=False)
    assert "torn.png" in str(e.value) and one_line(str(e.value)), str(e.value)


@pytest.mark.parametrize("image, text, needle", [
    ("{run}/images/missing.png", ["a dog"], "missing.png"),
    ("{run}/data.json", ["a dog"], "data.json"),
    ("{run}/images", ["a dog"], "images"),
    ("{run}/images/0.png", [" "], "--text"),
])
def test_zeroshot_checks_images_and_texts_before_loading_the_model(run, no_model, image, text, needle):
    with pytest.raises(SystemExit) as e:
        cli.main(["zeroshot", "--checkpoint", str(run / "model.pt"), "--image", image.replace("{run}", str(run)),
                  "--text", *text])
    message = str(e.value)
    assert message.startswith("error: ") and needle in message and one_line(message), message


def test_zero_shot_without_texts_or_images_says_so(run):
    model = CLIP(CLIPConfig.from_json(ROOT / "model_configs" / "MiniCLIP-XS-32px.json"))
    image = Image.open(run / "images" / "0.png")
    with pytest.raises(ValueError, match="no texts"):
        cli.zero_shot(model, [image], [])
    with pytest.raises(ValueError, match="no images"):
        cli.zero_shot(model, [], ["a dog"])


def test_train_data_directory_is_one_line(tmp_path):
    import train
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(tmp_path), "--images", str(tmp_path), "--out", str(tmp_path / "run")])
    message = str(e.value)
    assert message.startswith("error: ") and "is a directory: pass the caption file" in message and one_line(message)


# ----------------------------------------------------------------------------- plot.py

STEP = {"step": 1, "epoch": 0, "loss": 2.0, "lr": 1e-4, "logit_scale": 14.3}


@pytest.mark.filterwarnings("ignore:.*torn last line")
@pytest.mark.parametrize("content, needle", [
    (None, "not found"),
    ("step,loss\n1,2.0\n2,1.5\n", "line 1 is not JSON"),
    (json.dumps(STEP) + "\n{oops\n" + json.dumps(STEP) + "\n", "line 2 is not JSON"),
    ('[1, 2]\n', "line 1 is not a JSON object"),
    ("", "no training steps"),
    ('{"step": "final", "val": {}}\n', "no training steps"),
    ('{"method": "linear-probe", "epoch": 0, "loss": 1.0}\n', "no training steps"),
    ('{"step": 1, "lo', "no training steps"),
])
def test_plot_bad_metrics_file_is_one_line(tmp_path, content, needle):
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as e:
        plot.main([str(path), str(tmp_path / "plot.png")])
    message = str(e.value)
    assert message.startswith("error: ") and str(path) in message and needle in message and one_line(message), message
    assert not (tmp_path / "plot.png").exists()


def test_plot_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(dict(STEP, step=s, loss=2.0 / s)) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    with pytest.warns(UserWarning, match="line 4"):
        assert plot.plot_metrics(path, tmp_path / "plot.png") == tmp_path / "plot.png"
    assert Image.open(tmp_path / "plot.png").width > 0


def test_plot_command_exit_code(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "plot.py"), str(tmp_path / "missing.jsonl"),
                           str(tmp_path / "plot.png")], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
