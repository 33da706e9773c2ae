"""Parity of model.py against the reference implementations (open_clip, Hugging Face transformers) for every
TinyCLIP ViT config and OpenAI ViT-B/32, loaded from each checkpoint layout load_checkpoint reads."""
import copy
import math
import warnings

import pytest
import torch

from checkpoints import CheckpointError, infer_config, load_checkpoint, save_checkpoint
from model import CLIP, CLIPConfig
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


def build_reference(name):
    """One random-weight open_clip model for a config, the same weights in a transformers model, and both
    models' outputs."""
    cfg = json_config(name)
    ref = openclip_model(cfg, seed=CONFIGS.index(name))
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = open_clip.tokenize(TEXTS)
    with torch.no_grad():
        want = ref.encode_image(images), ref.encode_text(tokens)
    hf = hf_model(cfg, ref.state_dict())
    return dict(name=name, cfg=cfg, ref=ref, hf=hf, images=images, tokens=tokens, want=want,
                hf_want=hf_features(hf, images, tokens))


@pytest.fixture(scope="module")
def references():
    """Each config's reference, built once and kept in memory (about 3.5 GB for all five)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_reference(name)
        return cache[name]
    return get


@pytest.fixture
def reference(request, references):
    return references(request.param)


@pytest.fixture
def checkpoint_file(reference, tmp_path):
    """Writes the reference's weights in one layout and deletes the file after the test: every layout of
    every config kept on disk at once would take ~8 GB (ViT-B/32 alone is 600 MB per copy)."""
    def write(layout):
        ref, cfg, path = reference["ref"], reference["cfg"], tmp_path / layout
        if layout in ("tinyclip", "tinyclip-module"):
            save_tinyclip(ref, path, style="ddp" if layout == "tinyclip" else "without_ddp")
        elif layout in ("flat", "flat-module"):
            save_flat(ref, path, prefix="module." if layout == "flat-module" else "")
        elif layout == "torchscript":
            save_torchscript(ref, path, cfg["vision_cfg"]["image_size"], 77, 49408)
        elif layout in ("hf-safetensors", "hf-bin"):
            reference["hf"].save_pretrained(path, safe_serialization=layout == "hf-safetensors")
        elif layout == "miniclip":  # our own format, written by save_checkpoint from a model we loaded
            save_flat(ref, tmp_path / "source.pt")
            ours = load_checkpoint(tmp_path / "source.pt", config=ROOT / "model_configs" / f"{reference['name']}.json")
            (tmp_path / "source.pt").unlink()
            save_checkpoint(path, ours, step=0)
        return path
    yield write
    for path in tmp_path.rglob("*"):
        if path.is_file():
            path.unlink()


def native_layout(reference):
    """The layout that says its activation: OpenAI's TorchScript (QuickGELU) or TinyCLIP's release (GELU)."""
    return "torchscript" if reference["cfg"].get("quick_gelu") else "tinyclip"


def zero_shot_probs(img, txt):
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    return (100 * img @ txt.T).softmax(dim=-1)


@pytest.mark.parametrize("reference, layout", CASES, indirect=["reference"])
def test_parity(reference, layout, checkpoint_file):
    path = checkpoint_file(layout)
    config = ROOT / "model_configs" / f"{reference['name']}.json"
    with warnings.catch_warnings():
        # every layout here says (or is told) its activation: no warning expected
        warnings.simplefilter("error", UserWarning)
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


@pytest.mark.parametrize("reference", CONFIGS, indirect=True)
def test_hf_oracle_agrees_with_open_clip(reference):
    for got, want in zip(reference["hf_want"], reference["want"]):
        assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("reference", CONFIGS, indirect=True)
def test_inferred_config_equals_json(reference, checkpoint_file):
    raw = torch.load(checkpoint_file("flat"), weights_only=True)
    inferred = infer_config(raw, quick_gelu=reference["cfg"].get("quick_gelu", False))
    assert inferred == CLIPConfig.from_dict(reference["cfg"])
    # no config given: the architecture comes from the shapes, the activation from the layout
    model = load_checkpoint(checkpoint_file(native_layout(reference)))
    assert model.config == CLIPConfig.from_dict(reference["cfg"])


@pytest.mark.parametrize("reference", CONFIGS, indirect=True)
def test_wrong_activation_is_caught(reference, checkpoint_file):
    """A GELU checkpoint read as QuickGELU (or the reverse) loads without error but gives other numbers:
    the parity check is what catches it (open_clip issue #771)."""
    cfg = CLIPConfig.from_dict(reference["cfg"])
    cfg.quick_gelu = not cfg.quick_gelu
    # both files say which activation they were trained with, so loading them with the other one warns
    with pytest.warns(UserWarning, match="GELU"):
        model = load_checkpoint(checkpoint_file(native_layout(reference)), config=cfg)
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
    with pytest.raises(ValueError, match=r"c\.json: VisionConfig.* unexpected keyword argument 'foo'"
                                         r".*vision_cfg \{image_size"):
        CLIPConfig.from_json(p)


def test_scratch_model_shapes():
    model = CLIP(CLIPConfig.from_json(ROOT / "model_configs" / "MiniCLIP-XS-32px.json"))
    i, t, s = model(torch.randn(3, 3, 32, 32), torch.tensor([[49406, 320, 49407] + [0] * 13] * 3))
    assert i.shape == t.shape == (3, 64) and abs(s.item() - 1 / 0.07) < 1e-4
    with pytest.raises(ValueError, match="images must be"):
        model.encode_image(torch.randn(1, 3, 64, 64))


def stem_config(channels=(8, 16)):
    return CLIPConfig.from_dict({"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64,
                                 "patch_size": 8, "stem_channels": list(channels)},
                                 "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 64, "heads": 1,
                                              "layers": 1}})


def test_conv_stem_shapes_and_round_trip(tmp_path):
    """Two stride-2 convolutions then a 2x2 patch projection: the same 4x4 token grid as 8x8 patches; the stem's
    channels and the patch size are read back from the tensor shapes, and a saved model loads with equal outputs."""
    torch.manual_seed(0)
    model = CLIP(stem_config()).eval()
    assert model.visual.conv1.weight.shape == (64, 16, 2, 2)
    assert model.visual.embed(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 4 * 4, 64)
    inferred = infer_config(model.state_dict())
    assert inferred.vision.stem_channels == [8, 16] and inferred.vision.patch_size == 8
    model.visual.stem[1].running_mean.add_(0.5)  # BatchNorm statistics are part of the checkpoint
    save_checkpoint(tmp_path / "stem.pt", model)
    loaded = load_checkpoint(tmp_path / "stem.pt")
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), rtol=0, atol=0)


def test_no_stem_is_plain_clip():
    plain = CLIPConfig.from_json(ROOT / "model_configs" / "MiniCLIP-XS-32px.json")
    assert plain.vision.stem_channels == [] and len(CLIP(plain).visual.stem) == 0
    with pytest.raises(ValueError, match="stem_channels.*patch_size divisible by 16, got 8"):
        stem_config((4, 4, 4, 4))


def test_grad_checkpointing_gives_the_same_gradients():
    """set_grad_checkpointing recomputes each block in the backward pass: the loss and every gradient are unchanged,
    and each tower's blocks then leave no activations behind but their inputs."""
    torch.manual_seed(0)
    images, tokens = torch.randn(4, 3, 32, 32), torch.tensor([[98, 20 + i, 21, 99] + [0] * 4 for i in range(4)])
    base, grads, calls = CLIP(stem_config()), [], []
    for checkpointing in (False, True):
        model, count = copy.deepcopy(base), []
        model.set_grad_checkpointing(checkpointing)
        block = model.transformer.resblocks[0]
        block.forward = lambda *a, run=block.forward, **kw: count.append(1) or run(*a, **kw)  # counts its runs
        i, t, s = model(images, tokens)
        (s * i @ t.T).logsumexp(dim=1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        calls.append(len(count))
    assert calls == [1, 2]  # with checkpointing the block ran again in the backward pass
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
    assert model.transformer.grad_checkpointing and model.visual.transformer.grad_checkpointing


def test_length_groups_give_each_caption_its_own_features():
    """encode_text sorts a large batch by caption length and runs it in groups, each cut to its longest caption: every
    caption's features (and the gradients) equal those of the caption encoded alone in a padded batch of its own,
    in the input order, whatever the groups (a shuffled batch of 520 lengths from 1 to 8, empty rows included)."""
    torch.manual_seed(0)
    model = CLIP(stem_config())
    lengths = torch.randint(1, 9, (520,))
    lengths[:5] = 1  # all-zero rows (a missing hard negative): EOT at 0
    tokens = torch.zeros(520, 8, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        if n > 1:
            tokens[i, :n] = torch.randint(1, 98, (n,))
            tokens[i, n - 1] = 99  # EOT, the largest id of this vocabulary
    weights = torch.randn(520, 16)
    grouped = model.encode_text(tokens)
    (grouped * weights).sum().backward()
    grad_grouped = model.token_embedding.weight.grad.clone()
    model.zero_grad()
    alone = torch.cat([model.encode_text(tokens[i:i + 1]) for i in range(520)])
    (alone * weights).sum().backward()
    torch.testing.assert_close(grouped, alone, rtol=1e-5, atol=1e-6)
    grad_alone = model.token_embedding.weight.grad  # sums of the same terms, added in another order
    torch.testing.assert_close(grad_grouped, grad_alone, rtol=1e-4, atol=1e-5 * grad_alone.abs().max().item())
