"""export.py: every shipped config without a conv stem, exported to Hugging Face and open_clip, gives our embeddings
in transformers' CLIPModel and in open_clip within 1e-5; CLIPTokenizer reads our token ids; the exported files load
back with load_checkpoint; a trained MiniCLIP exports from the command line; what cannot be exported says why."""
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from checkpoints import load_checkpoint
from export import export_hf, export_open_clip, export_safetensors, hf_state_dict
from model import CLIP, CLIPConfig
from oracles import hf_features, perturb_, ROOT
from tokenizer import tokenize

CAPTIONS = ["a small red circle to the left of a big blue star", "Hello, World! 2024 café naïve — ok?",
            "a photo of a dog", "  spaces   and\nnewlines  ", "ÆØÅ 東京 🙂 don't & <b>"]
# Two known differences of transformers' CLIPTokenizer from openai/CLIP's (and ours) are left out: "<|endoftext|>"
# typed in a caption is its special token (text for us, as for open_clip), and HTML entities ("&amp;") are not
# unescaped (openai's basic_clean unescapes them).
STEMLESS = [p.stem for p in sorted((ROOT / "model_configs").glob("*.json"))
            if not json.loads(p.read_text())["vision_cfg"].get("stem_channels")]
BIG = ("ViT-B-16", "ViT-L-14")  # their conversion is the same per block: tested with 2 blocks per tower, to save time


def config_of(name):
    config = CLIPConfig.from_json(ROOT / "model_configs" / f"{name}.json")
    if name in BIG:
        config = replace(config, vision=replace(config.vision, layers=2), text=replace(config.text, layers=2))
    return config


def features(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    return torch.randn(2, 3, size, size, generator=g), tokenize(CAPTIONS[:2], config.text.context_length,
                                                                truncate=True)


@pytest.mark.parametrize("name", STEMLESS)
def test_every_stemless_config_exports_to_transformers_and_open_clip(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    config = config_of(name)
    model = perturb_(CLIP(config), 0)
    images, tokens = inputs(config)
    want = features(model, images, tokens)
    hf = transformers.CLIPModel.from_pretrained(export_hf(model, tmp_path / "hf")).eval()
    for got, expected in zip(hf_features(hf, images, tokens), want):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    export_open_clip(model, tmp_path / f"oc-{name}.pt")
    open_clip.add_model_config(tmp_path / f"oc-{name}.json")
    reference = open_clip.create_model(f"oc-{name}", pretrained=str(tmp_path / f"oc-{name}.pt")).eval()
    for got, expected in zip(features(reference, images, tokens), want):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for path in (tmp_path / "hf", tmp_path / f"oc-{name}.pt", export_safetensors(model, tmp_path / "m.safetensors")):
        back = load_checkpoint(path, config=config if path.suffix == ".pt" else None)  # a flat state dict: no config
        assert back.config == config, path
        for got, expected in zip(features(back, images, tokens), want):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_clip_tokenizer_reads_our_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = CLIP(CLIPConfig.from_json(ROOT / "model_configs" / "MiniCLIP-XS-32px.json"))
    export_hf(model, tmp_path)
    slow = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    fast = transformers.CLIPTokenizerFast.from_pretrained(tmp_path)
    for caption, row in zip(CAPTIONS, tokenize(CAPTIONS, 77)):
        ours = row[:int(row.argmax()) + 1].tolist()  # SOT ... EOT, without our zero padding
        assert slow(caption)["input_ids"] == ours, caption
        assert fast(caption)["input_ids"] == ours, caption
    assert slow.model_max_length == 16


def test_hf_keys_are_transformers_own(tmp_path):
    """The exported state dict has exactly the keys and shapes of a CLIPModel built from the exported config."""
    transformers = pytest.importorskip("transformers")
    model = CLIP(config_of("TinyCLIP-ViT-8M-16-Text-3M"))
    export_hf(model, tmp_path)
    reference = transformers.CLIPModel(transformers.CLIPConfig.from_pretrained(tmp_path))
    want = {k: v.shape for k, v in reference.state_dict().items() if not k.endswith("position_ids")}
    assert {k: v.shape for k, v in hf_state_dict(model.state_dict()).items()} == want


def run_export(*args):
    return subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_a_trained_miniclip_from_the_command_line(tmp_path):
    """A few training steps (train.py, the XS config), then export.py CKPT --to hf / open_clip / safetensors."""
    transformers = pytest.importorskip("transformers")
    from test_train import run_train
    from synthetic import generate
    data = generate(tmp_path / "shapes", seed=1, n_train=32, n_val=8, n_test=8, image_size=32, workers=1)
    run_train(tmp_path / "run", data, steps=3)
    ckpt = tmp_path / "run" / "last.pt"
    trained = load_checkpoint(ckpt)
    images, tokens = inputs(trained.config, seed=1)
    want = features(trained, images, tokens)
    result = run_export(ckpt, "--to", "hf", tmp_path / "hf")
    assert result.returncode == 0 and "wrote" in result.stdout, result.stderr
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    for got, expected in zip(hf_features(hf, images, tokens), want):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for to, out in (("open_clip", tmp_path / "trained.pt"), ("safetensors", tmp_path / "m.safetensors")):
        assert run_export(ckpt, "--to", to, out).returncode == 0
        back = load_checkpoint(out, config=ROOT / "model_configs" / "MiniCLIP-XS-32px.json" if to == "open_clip"
                               else None)
        torch.testing.assert_close(features(back, images, tokens), want, rtol=0, atol=1e-6)
    open_clip = pytest.importorskip("open_clip")
    open_clip.add_model_config(tmp_path / "trained.json")
    reference = open_clip.create_model("trained", pretrained=str(tmp_path / "trained.pt")).eval()
    for got, expected in zip(features(reference, images, tokens), want):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_width_that_is_not_a_whole_multiple(tmp_path):
    """mlp_ratio 2.7: the MLPs are int(64 * 2.7) = 172 wide in model.py, open_clip and the exported config.json, and
    the folder loads back (56 / 61 * 61 < 56 in floating point: checkpoints' ratio must survive that)."""
    transformers = pytest.importorskip("transformers")
    config = CLIPConfig.from_json(ROOT / "model_configs" / "MiniCLIP-XS-32px.json")
    config = replace(config, vision=replace(config.vision, mlp_ratio=2.7), text=replace(config.text, mlp_ratio=2.7))
    model = perturb_(CLIP(config), 0)
    images, tokens = inputs(config)
    hf = transformers.CLIPModel.from_pretrained(export_hf(model, tmp_path)).eval()
    for got, expected in zip(hf_features(hf, images, tokens), features(model, images, tokens)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert load_checkpoint(tmp_path).state_dict()["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] == 172


@pytest.mark.parametrize("name", ["MiniCLIP-S-64px", "MiniCLIP-S-64px-patch8"])
def test_a_conv_stem_model_exports_to_transformers_with_its_code(name, tmp_path):
    """The default model's conv stem: transformers runs the exported folder's modeling_miniclip.py
    (AutoModel, trust_remote_code) to our embeddings within 1e-5, BatchNorm statistics included; safetensors and the
    folder load back exactly; open_clip, which has no place for a stem, is refused in one line."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = perturb_(CLIP(config_of(name)), 0)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0)
    images, tokens = inputs(model.config)
    want = features(model, images, tokens)
    hf = transformers.AutoModel.from_pretrained(export_hf(model, tmp_path / "hf"), trust_remote_code=True).eval()
    assert type(hf).__name__ == "MiniCLIPModel"
    for got, expected in zip(hf_features(hf, images, tokens), want):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for path in (tmp_path / "hf", export_safetensors(model, tmp_path / "stem.safetensors")):
        back = load_checkpoint(path)
        assert back.config == model.config
        assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    result = run_export(tmp_path / "stem.safetensors", "--to", "open_clip", tmp_path / "out" / "oc.pt")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "convolutional stem" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_what_cannot_be_exported_says_why(tmp_path):
    siglip = CLIP(replace(CLIPConfig.from_json(ROOT / "model_configs" / "MiniCLIP-XS-32px.json"),
                          init_logit_bias=-10.0))
    with pytest.raises(ValueError, match="SigLIP"):
        export_hf(siglip, tmp_path / "siglip")
    export_open_clip(siglip, tmp_path / "siglip.pt")  # open_clip's CLIP has a logit bias
    assert json.loads((tmp_path / "siglip.json").read_text())["init_logit_bias"] == -10.0
    missing = run_export(tmp_path / "nothing.pt", "--to", "hf", tmp_path / "x")
    assert missing.returncode == 1 and missing.stderr.startswith("error: checkpoint not found")


def test_transformers_zero_shot_pipeline_on_an_exported_model(tmp_path):
    """A peer tool evaluates the exported default model: transformers' zero-shot-image-classification pipeline (its
    own CLIPImageProcessor and CLIPTokenizer, from the folder) gives our zero-shot probabilities."""
    transformers = pytest.importorskip("transformers")
    from PIL import Image, ImageDraw
    from transform import image_transform
    torch.manual_seed(0)
    model = perturb_(CLIP(config_of("MiniCLIP-S-64px")), 0)
    image = Image.new("RGB", (64, 64), "gray")
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill="red")
    labels = ["circle", "star", "heart", "hexagon"]
    classify = transformers.pipeline("zero-shot-image-classification", model=str(export_hf(model, tmp_path)),
                                     trust_remote_code=True)
    got = {r["label"]: r["score"] for r in classify(image, candidate_labels=labels)}
    with torch.no_grad():
        image_features = model.encode_image(image_transform(64)(image)[None], normalize=True)  # (1, D)
        text_features = model.encode_text(tokenize([f"This is a photo of {c}." for c in labels], 32), normalize=True)
        want = (model.logit_scale.exp() * image_features @ text_features.T).softmax(dim=-1)[0]  # the pipeline's prompt
    assert [got[c] for c in labels] == pytest.approx(want.tolist(), abs=1e-4)
