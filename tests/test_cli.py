"""The command lines: test.py zeroshot / retrieval and train.py, including their one-line errors on bad input."""
import importlib.util
import json

import pytest
import torch
from PIL import Image

import train
from checkpoints import save_checkpoint
from model import CLIP, CLIPConfig
from oracles import ROOT

# test.py by path: the standard library has a package named `test` too
_spec = importlib.util.spec_from_file_location("miniclip_test_cli", ROOT / "test.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.from_json(ROOT / "model_configs" / "MiniCLIP-XS-32px.json"))
    save_checkpoint(d / "model.pt", model, step=0)
    for name, colour in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255))):
        Image.new("RGB", (40, 30), colour).save(d / name)
    return d


def test_zeroshot_prints_cosine_and_probabilities(checkpoint, capsys):
    cli.main(["zeroshot", "--checkpoint", str(checkpoint / "model.pt"), "--image", str(checkpoint / "red.png"),
              str(checkpoint / "blue.png"), "--text", "a red square", "a blue square", "a dog"])
    out = capsys.readouterr().out
    assert out.count("cosine") == 6 and out.count("prob") == 6 and "red.png" in out and "blue.png" in out
    probs = [float(line.split("prob")[1].strip(" %")) for line in out.splitlines() if "prob" in line]
    assert sum(probs[:3]) == pytest.approx(100, abs=0.05)  # a softmax over the three texts, per image


def test_zero_shot_function_matches_manual_computation(checkpoint):
    from checkpoints import load_checkpoint
    from tokenizer import tokenize
    from transform import image_transform
    model = load_checkpoint(checkpoint / "model.pt")
    image = Image.open(checkpoint / "red.png")
    cosine, probs = cli.zero_shot(model, [image], ["a", "b"])
    with torch.no_grad():
        i = model.encode_image(image_transform(32)(image)[None], normalize=True)
        t = model.encode_text(tokenize(["a", "b"], 16), normalize=True)
    assert torch.allclose(cosine, i @ t.T, atol=1e-6)
    assert torch.allclose(probs, (100 / 7 * cosine).softmax(-1), atol=1e-4)  # logit_scale = ln(1/0.07)


def test_zeroshot_without_checkpoint_says_where_to_put_tinyclip(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "MODEL_HUB", tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(["zeroshot", "--image", "x.png", "--text", "a dog"])
    assert "TinyCLIP" in str(e.value) and str(tmp_path) in str(e.value) and "releases/download" in str(e.value)


@pytest.mark.parametrize("argv, needle", [
    (["zeroshot", "--checkpoint", "missing.pt", "--image", "x.png", "--text", "a"], "checkpoint not found: missing.pt"),
    (["zeroshot", "--checkpoint", "{ckpt}", "--image", "nope.png", "--text", "a"], "nope.png"),
    (["retrieval", "--checkpoint", "{ckpt}", "--data", "nope.json", "--images", "."], "nope.json"),
])
def test_bad_input_gives_one_line_error(checkpoint, argv, needle):
    argv = [a.replace("{ckpt}", str(checkpoint / "model.pt")) for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    msg = str(e.value)
    assert msg.startswith("error: ") and needle in msg and "Traceback" not in msg


def test_default_run_takes_another_checkpoint(checkpoint, tmp_path, monkeypatch, capsys):
    """python test.py --checkpoint OUT/last.pt: the default demo and test-split retrieval for a run trained with
    another --out (here on a 12-image stand-in for the built-in data)."""
    import synthetic
    data = synthetic.generate(tmp_path / "shapes", seed=3, n_train=0, n_val=0, n_test=12, image_size=32, workers=1)
    monkeypatch.setattr(synthetic, "ensure_shapes", lambda: data)
    cli.main(["--checkpoint", str(checkpoint / "model.pt")])
    out = capsys.readouterr().out
    assert f"checkpoint from {checkpoint / 'model.pt'}" in out  # this model, not out/shapes/last.pt
    assert "zero-shot" in out and "12 images, 60 captions" in out and "text->image" in out
    with pytest.raises(SystemExit, match="error: .*missing.pt not found"):
        cli.main(["--checkpoint", str(tmp_path / "missing.pt")])


def test_retrieval_writes_json(checkpoint, tmp_path):
    from synthetic import generate
    data = generate(tmp_path / "shapes", seed=3, n_train=0, n_val=0, n_test=12, image_size=32, workers=1)
    out = tmp_path / "r.json"
    cli.main(["retrieval", "--checkpoint", str(checkpoint / "model.pt"), "--data", str(data), "--images",
              str(data.parent / "images"), "--split", "test", "--json", str(out), "--workers", "0"])
    r = json.loads(out.read_text())
    assert r["images"] == 12 and r["captions"] == 60 and r["protocol"] == "5cap"
    assert set(r["text_to_image"]) == set(r["image_to_text"]) == {"R@1", "R@5", "R@10"}
    cli.main(["retrieval", "--checkpoint", str(checkpoint / "model.pt"), "--data", str(data), "--images",
              str(data.parent / "images"), "--protocol", "1cap", "--json", str(out), "--workers", "0"])
    assert json.loads(out.read_text())["captions"] == 12


def test_train_bad_input_errors(tmp_path):
    for argv, needle in ((["--data", str(tmp_path / "nope.json"), "--images", "."], "nope.json"),
                         (["--init", str(tmp_path / "nope.pt")], "nope.pt"),
                         (["--config", str(tmp_path / "nope.json")], "nope.json")):
        with pytest.raises(SystemExit) as e:
            train.main(argv + ["--out", str(tmp_path / "run")])
        assert str(e.value).startswith("error: ") and needle in str(e.value)
    (tmp_path / "run").mkdir(exist_ok=True)
    with pytest.raises(SystemExit, match="--resume"):
        train.main(["--out", str(tmp_path / "run"), "--resume"])


def test_train_on_a_caption_list_without_splits(tmp_path):
    """The tutorial's list format has no splits: --train-split '' trains on every entry."""
    images = tmp_path / "images"
    images.mkdir()
    entries = []
    for i in range(8):
        Image.new("RGB", (32, 32), (30 * i, 0, 255 - 30 * i)).save(images / f"{i}.png")
        entries.append({"image": f"{i}.png", "caption": [f"picture number {i}", f"image {i}"]})
    (tmp_path / "list.json").write_text(json.dumps(entries))
    train.main(["--config", str(ROOT / "model_configs" / "MiniCLIP-XS-32px.json"), "--data", str(tmp_path / "list.json"),
                "--images", str(images), "--train-split", "", "--val-split", "", "--test-split", "", "--batch-size", "4",
                "--max-steps", "2", "--workers", "0", "--out", str(tmp_path / "run")])
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 2
