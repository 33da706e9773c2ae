"""Parity of model.py against the reference implementations (open_clip, Hugging Face transformers) for every
TinyCLIP ViT config and OpenAI ViT-B/32, loaded from each checkpoint layout load_checkpoint reads."""
import math
import warnings

import pytest
import torch

from model import CLIP, CheckpointError, CLIPConfig, infer_config, load_checkpoint, save_checkpoint
from oracles import (ROOT, hf_features, hf_model, json_config, openclip_model, save_flat, save_tinyclip,
                     save_torchscript)

open_clip = pytest.importorskip("open_clip")

CONFIGS = ["TinyCLIP-ViT-8M-16-Text-3M", "TinyCLIP-ViT-39M-16-Text-19M", "TinyCLIP-ViT-40M-32-Text-19M",
           "TinyCLIP-ViT-61M-32-Text-29M", "ViT-B-32"]
SMALLEST = CONFIGS[0]


def layouts(name):
    """The layouts each config is saved in. TinyCLIP releases hold GELU models, OpenAI's TorchScript archives
    QuickGELU ones; the second spellings (module.-prefixed, pytorch_model.bin) only exercise key handling, which
    the size does not change, so they are tested on the smallest config."""
    quick = json_config(name).get("quick_gelu", False)
    out = ["flat", "hf-safetensors", "miniclip"] + (["torchscript"] if quick else ["tinyclip"])
    return out + (["tinyclip-module", "flat-module", "hf-bin"] if name == SMALLEST else [])


CASES = [(name, layout) for name in CONFIGS for layout in layouts(name)]
TOL = 1e-5
TEXTS = ["a photo of a dog", "a cat sitting on a red sofa", "a diagram", ""]


def build_reference(name, d):
    """One random-weight open_clip model per config, its outputs, and the same weights in every layout."""
    cfg = json_config(name)
    ref = openclip_model(cfg, seed=CONFIGS.index(name))
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = open_clip.tokenize(TEXTS)
    with torch.no_grad():
        want = ref.encode_image(images), ref.encode_text(tokens)
    files = {"tinyclip": d / "tinyclip.pt", "tinyclip-module": d / "tinyclip_module.pt", "flat": d / "flat.pt",
             "flat-module": d / "flat_module.pt", "torchscript": d / "openai_jit.pt",
             "hf-safetensors": d / "hf_st", "hf-bin": d / "hf_bin", "miniclip": d / "miniclip.pt"}
    wanted = layouts(name)
    save_flat(ref, files["flat"])
    if "tinyclip" in wanted:
        save_tinyclip(ref, files["tinyclip"], style="ddp")
    if "tinyclip-module" in wanted:
        save_tinyclip(ref, files["tinyclip-module"], style="without_ddp")
    if "flat-module" in wanted:
        save_flat(ref, files["flat-module"], prefix="module.")
    if "torchscript" in wanted:
        save_torchscript(ref, files["torchscript"], size, 77, 49408)
    hf = hf_model(cfg, ref.state_dict())
    hf.save_pretrained(files["hf-safetensors"], safe_serialization=True)
    if "hf-bin" in wanted:
        hf.save_pretrained(files["hf-bin"], safe_serialization=False)
    hf_want = hf_features(hf, images, tokens)
    ours = load_checkpoint(files["flat"], config=ROOT / "model_configs" / f"{name}.json")
    save_checkpoint(files["miniclip"], ours, step=0)
    del hf
    return dict(name=name, cfg=cfg, images=images, tokens=tokens, want=want, hf_want=hf_want, files=files)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    cache = {}  # built once per config: only the outputs and the files are kept, not the models

    def get(name):
        if name not in cache:
            cache[name] = build_reference(name, tmp_path_factory.mktemp(name))
        return cache[name]
    return get


@pytest.fixture(params=CONFIGS)
def reference(request, references):
    return references(request.param)


def zero_shot_probs(img, txt):
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    return (100 * img @ txt.T).softmax(dim=-1)


@pytest.mark.parametrize("name, layout", CASES)
def test_parity(references, name, layout):
    reference = references(name)
    path = reference["files"][layout]
    config = ROOT / "model_configs" / f"{reference['name']}.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every layout here says (or is told) its activation: no warning expected
        model = load_checkpoint(path, config=config if layout.startswith("flat") else None)
    assert not model.training and model.dtype == torch.float32
    with torch.no_grad():
        img = model.encode_image(reference["images"])
        txt = model.encode_text(reference["tokens"])
    want_img, want_txt = reference["hf_want"] if layout.startswith("hf") else reference["want"]
    d_img, d_txt = (img - want_img).abs().max().item(), (txt - want_txt).abs().max().item()
    print(f"{reference['name']} {layout}: max|diff| image {d_img:.2e} text {d_txt:.2e}")
    assert d_img <= TOL and d_txt <= TOL
    p, q = zero_shot_probs(img, txt), zero_shot_probs(*reference["want"])
    assert (p - q).abs().max() <= 1e-4
    # forward returns normalised features and the temperature
    i, t, s = model(reference["images"], reference["tokens"])
    assert torch.allclose(i.norm(dim=-1), torch.ones(2)) and math.isclose(s.item(), math.exp(3.9), rel_tol=1e-6)


def test_hf_oracle_agrees_with_open_clip(reference):
    for got, want in zip(reference["hf_want"], reference["want"]):
        assert (got - want).abs().max() <= TOL


def test_inferred_config_equals_json(reference):
    raw = torch.load(reference["files"]["flat"], weights_only=True)
    inferred = infer_config(raw, quick_gelu=reference["cfg"].get("quick_gelu", False))
    assert inferred == CLIPConfig.from_dict(reference["cfg"])
    # no config given: the architecture comes from the shapes, the activation from the layout
    model = load_checkpoint(reference["files"]["torchscript" if reference["cfg"].get("quick_gelu") else "tinyclip"])
    assert model.config == CLIPConfig.from_dict(reference["cfg"])


def test_wrong_activation_is_caught(reference):
    """A GELU checkpoint read as QuickGELU (or the reverse) loads without error but gives other numbers:
    the parity check is what catches it (open_clip issue #771)."""
    cfg = CLIPConfig.from_dict(reference["cfg"])
    cfg.quick_gelu = not cfg.quick_gelu
    # both files say which activation they were trained with, so loading them with the other one warns
    path = reference["files"]["torchscript" if reference["cfg"].get("quick_gelu") else "tinyclip"]
    with pytest.warns(UserWarning, match="GELU"):
        model = load_checkpoint(path, config=cfg)
    with torch.no_grad():
        diff = (model.encode_image(reference["images"]) - reference["want"][0]).abs().max()
    assert diff > 1e-3


# ----------------------------------------------------------------------------- readable errors


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cfg = json_config("MiniCLIP-XS-32px")
    cfg["text_cfg"]["heads"] = 1  # shapes imply heads = width // 64 = 1
    ref = openclip_model(cfg)
    return cfg, ref.state_dict(), tmp_path_factory.mktemp("small")


def expect_error(path, *needles, config=None):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, config=config)
    msg = str(e.value)
    for n in needles:
        assert n in msg, msg
    assert "Traceback" not in msg
    return msg


def test_strict_errors_list_keys(small):
    cfg, sd, d = small
    bad = dict(sd)
    bad.pop("ln_final.bias")
    bad["extra.weight"] = torch.zeros(3)
    bad["visual.ln_post.weight"] = torch.zeros(7)
    torch.save(bad, d / "bad.pt")
    msg = expect_error(d / "bad.pt", "missing keys (1)", "ln_final.bias", "unexpected keys (1)", "extra.weight",
                       "shape mismatches (1)", "visual.ln_post.weight", config=CLIPConfig.from_dict(cfg))
    assert str(d / "bad.pt") in msg


def test_config_mismatch_is_reported(small):
    cfg, sd, d = small
    torch.save(sd, d / "ok.pt")
    other = CLIPConfig.from_dict(cfg)
    other.vision.layers = 3
    expect_error(d / "ok.pt", "vision_cfg.layers: config 3, checkpoint 2", config=other)


def test_pruned_tinyclip_auto_is_refused(small):
    cfg, sd, d = small
    pruned = dict(sd)
    w = pruned["visual.transformer.resblocks.1.mlp.c_fc.weight"]
    pruned["visual.transformer.resblocks.1.mlp.c_fc.weight"] = w[:100]  # a narrower MLP in one layer
    torch.save({"state_dict": {"module." + k: v for k, v in pruned.items()}}, d / "auto.pt")
    expect_error(d / "auto.pt", "'auto' (pruned)")
    torch.save({"state_dict": {**sd, "l0_module.intermediate_loga": torch.zeros(3)}}, d / "auto2.pt")
    expect_error(d / "auto2.pt", "'auto' (pruned)")


def test_unsafe_pickle_is_refused(tmp_path):
    import argparse
    torch.save({"args": argparse.Namespace(lr=1), "state_dict": {}}, tmp_path / "unsafe.pt")
    expect_error(tmp_path / "unsafe.pt", "weights-only")


def test_logit_scale_shape_1_and_flat_warning(small):
    cfg, sd, d = small
    torch.save({**sd, "logit_scale": sd["logit_scale"].reshape(1)}, d / "ls.pt")
    with pytest.warns(UserWarning, match="assuming exact GELU"):
        model = load_checkpoint(d / "ls.pt")
    assert model.logit_scale.shape == ()


def test_unknown_config_key(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"embed_dim": 8, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, '
                 '"foo": 1}, "text_cfg": {}}')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['foo'\] in 'vision_cfg'"):
        CLIPConfig.from_json(p)


def test_scratch_model_shapes():
    model = CLIP(CLIPConfig.from_json(ROOT / "model_configs" / "MiniCLIP-XS-32px.json"))
    i, t, s = model(torch.randn(3, 3, 32, 32), torch.tensor([[49406, 320, 49407] + [0] * 13] * 3))
    assert i.shape == t.shape == (3, 64) and abs(s.item() - 1 / 0.07) < 1e-4
    with pytest.raises(ValueError, match="images must be"):
        model.encode_image(torch.randn(1, 3, 64, 64))
