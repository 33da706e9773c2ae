"""aa_clip.py (AA-CLIP anomaly adapters): the residual adapter and positional resizing, the invariants (lambda 0 is
the frozen CLIP, the ordinary path is untouched by V-V attention, V-V attention is per image), each loss against its
formula, a short CPU run that lowers the stage losses, and the train.py / test.py anomaly command lines end to end."""
import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

import aa_clip
import train
from aa_clip import (AACLIP, AAConfig, adapt_residual, anomaly_map, dice_loss, focal_loss, orthogonal_loss, seg_loss,
                     resize_positional, stage1_loss, stage2_loss, text_anchors, vv_attention)
from anomaly_data import CategoryDataset, ensure_anomaly_shapes, read_mvtec, split_train_val
from checkpoints import save_checkpoint
from model import CLIP, CLIPConfig
from oracles import ROOT, perturb_
from tokenizer import tokenize

torch.set_num_threads(1)

# test.py by path: the standard library has a package named `test` too
_spec = importlib.util.spec_from_file_location("miniclip_test_aa_cli", ROOT / "test.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

XS = ROOT / "model_configs" / "MiniCLIP-XS-32px.json"
# 4 image blocks (4 levels), 2 heads of 16 in both towers, a 4 x 4 patch grid at 32 px
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 4, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
CATEGORIES = ("tiles", "tablet", "weave", "bolt")


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    return perturb_(CLIP(CLIPConfig.from_dict(TINY)), seed)  # LayerNorms and biases away from 1/0 too


def images(n, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def plain_tokens(visual, x):
    """The ordinary ViT forward written out here, returning every block's output tokens (B, 1 + N, width)."""
    t = visual.conv1(x).flatten(2).transpose(1, 2)
    t = torch.cat([visual.class_embedding.expand(len(t), 1, -1), t], dim=1) + visual.positional_embedding
    t, outs = visual.ln_pre(t), []
    for block in visual.transformer.resblocks:
        t = block(t)
        outs.append(t)
    return outs


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return ensure_anomaly_shapes(tmp_path_factory.mktemp("anomaly"), seed=0, image_size=32, n_train=4, n_test_good=4,
                                 n_test_defect=8, categories=CATEGORIES)


@pytest.fixture(scope="module")
def xs_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "clip.pt"
    torch.manual_seed(0)
    save_checkpoint(path, CLIP(CLIPConfig.from_json(XS)))
    return path

# ----------------------------------------------------------------------------- building blocks


def test_adapt_residual_weight_zero_is_identity_and_one_rescales_to_token_norm():
    """Weight 0 returns x exactly; weight 1 returns A(x) in A(x)'s direction with x's norm, per token."""
    torch.manual_seed(0)
    adapter = aa_clip.projection(16, 16, True)
    x = 3 * torch.randn(2, 5, 16)
    assert torch.equal(adapt_residual(x, adapter, 0.0), x)
    y = adapt_residual(x, adapter, 1.0)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(F.normalize(y, dim=-1), F.normalize(adapter(x), dim=-1), atol=1e-6)
    half = adapt_residual(x, adapter, 0.25)
    assert torch.allclose(half, 0.25 * y + 0.75 * x, atol=1e-6)


def test_lambda_zero_text_adapter_is_clip_text_tower():
    """Text weight 0 and proj = text_projection: AACLIP.encode_text is LeakyReLU(CLIP's text embedding)."""
    clip = tiny_clip()
    model = AACLIP(clip, AAConfig.for_model(clip.config, img_size=32, image_adapt_weight=0.0, text_adapt_weight=0.0))
    with torch.no_grad():
        model.text_adapter["proj"][0].weight.copy_(clip.text_projection.T)
        tokens = tokenize(["a photo of a bolt.", "a damaged weave with a long scratch", "x"], 16)
        assert torch.allclose(model.encode_text(tokens), F.leaky_relu(clip.encode_text(tokens)), atol=1e-5)
        model.cfg.text_adapt_weight = 0.5  # and the adapters do act when their weight is not 0
        assert not torch.allclose(model.encode_text(tokens), F.leaky_relu(clip.encode_text(tokens)), atol=1e-3)


def test_lambda_zero_image_adapter_gives_clip_patch_tokens():
    """Image weight 0, seg_proj = visual.proj: every level is normalize(ln_post(plain block output) @ proj)."""
    clip = tiny_clip(1)
    cfg = AAConfig.for_model(clip.config, img_size=32, image_adapt_weight=0.0, text_adapt_weight=0.0)
    assert cfg.levels == [1, 2, 3, 4] and not cfg.relu
    model = AACLIP(clip, cfg)
    v, x = clip.visual, images(2)
    with torch.no_grad():
        for proj in model.image_adapter["seg_proj"]:
            proj[0].weight.copy_(v.proj.T)
        model.image_adapter["det_proj"][0].weight.copy_(v.proj.T)
        patches, det = model.encode_image(x)
        plain = plain_tokens(v, x)
    assert len(patches) == 4
    for level, p in zip(cfg.levels, patches):
        want = F.normalize(v.ln_post(plain[level - 1][:, 1:]) @ v.proj, dim=-1)
        assert p.shape == (2, 16, 32)
        assert torch.allclose(p, want, atol=1e-5)
    assert torch.allclose(det, F.normalize(v.ln_post(plain[-1][:, 1:]) @ v.proj, dim=-1).mean(1), atol=1e-5)


def test_surgery_image_embedding_is_clip_encode_image():
    """At the model's own size the image embedding of surgery_features is CLIP's normalised image embedding."""
    clip = tiny_clip(2)
    for surgery in (1, 3, 5):  # no V-V blocks, the last two, all four
        model = AACLIP(clip, AAConfig.for_model(clip.config, img_size=32, surgery_until_layer=surgery))
        x = images(3, seed=surgery)
        patches, image = model.surgery_features(x)
        with torch.no_grad():
            want = F.normalize(clip.encode_image(x), dim=-1)
        assert torch.allclose(image, want, atol=1e-5)
    # surgery 1: no V-V path, so the levels are CLIP's own patch tokens (+ the image embedding, as AA-CLIP)
    model = AACLIP(clip, AAConfig.for_model(clip.config, img_size=32, surgery_until_layer=1))
    patches, image = model.surgery_features(x)
    with torch.no_grad():
        plain = plain_tokens(clip.visual, x)
    for level, p in zip(model.cfg.levels, patches):
        want = F.normalize(clip.visual.ln_post(plain[level - 1][:, 1:]) @ clip.visual.proj, dim=-1) + image[:, None]
        assert torch.allclose(p, want, atol=1e-5)


def test_orthogonal_loss_values_and_gradient():
    """Zero for orthogonal anchors, cos^2 for a known cosine (1 for identical), (batch-mean cosine)^2, has a gradient."""
    e0, e1 = torch.eye(3)[0], torch.eye(3)[1]
    assert orthogonal_loss(torch.stack([e0, e1])[None]).item() == 0.0
    assert orthogonal_loss(torch.stack([e0, e0])[None]).item() == pytest.approx(1.0)
    theta = 0.7
    a = torch.stack([e0, math.cos(theta) * e0 + math.sin(theta) * e1])[None]
    assert orthogonal_loss(a).item() == pytest.approx(math.cos(theta) ** 2, rel=1e-6)
    batch = torch.cat([a, torch.stack([e0, e0])[None]])  # cosines cos(theta) and 1: the MEAN is squared
    assert orthogonal_loss(batch).item() == pytest.approx(((math.cos(theta) + 1) / 2) ** 2, rel=1e-6)
    a = a.clone().requires_grad_(True)
    orthogonal_loss(a).backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def _vv_by_hand(attn, x):
    """softmax(v v^T / sqrt(hd)) v per image and head, out_proj: a loop, written independently."""
    D, h = x.shape[-1], attn.heads
    hd = D // h
    out = []
    for xi in x:
        v = xi @ attn.in_proj_weight[2 * D:].T + attn.in_proj_bias[2 * D:]  # (L, D)
        heads = []
        for k in range(h):
            vk = v[:, k * hd:(k + 1) * hd]
            heads.append(torch.softmax(vk @ vk.T / math.sqrt(hd), dim=-1) @ vk)
        out.append(attn.out_proj(torch.cat(heads, dim=-1)))
    return torch.stack(out)


def test_vv_attention_is_per_image():
    """vv_attention matches a per-image, per-head loop, and surgery_features of a batch equals each image alone."""
    clip = tiny_clip(3)
    block = clip.visual.transformer.resblocks[1]
    assert block.attn.heads == 2
    x = torch.randn(3, 17, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batched = vv_attention(block.attn, x)
        assert torch.allclose(batched, _vv_by_hand(block.attn, x), atol=1e-5)
        for i in range(3):
            assert torch.allclose(batched[i:i + 1], vv_attention(block.attn, x[i:i + 1]), atol=1e-5)
    model = AACLIP(clip, AAConfig.for_model(clip.config))  # 64 px, V-V in every block
    x = images(3, 64)
    patches, image = model.surgery_features(x)
    for i in range(3):
        alone, alone_image = model.surgery_features(x[i:i + 1])
        assert torch.allclose(image[i:i + 1], alone_image, atol=1e-5)
        for p, q in zip(patches, alone):
            assert torch.allclose(p[i:i + 1], q, atol=1e-5)


def test_resize_positional_and_double_size_inputs():
    """Same grid: input returned unchanged; other grid: (1 + g*g, width), class row kept; 2x inputs run."""
    pos = torch.randn(1 + 16, 8)
    assert torch.equal(resize_positional(pos, 4), pos)
    big = resize_positional(pos, 7)
    assert big.shape == (1 + 49, 8) and torch.equal(big[0], pos[0])
    const = torch.cat([pos[:1], torch.full((16, 8), 2.5)])  # a constant grid stays constant after bicubic resizing
    assert torch.allclose(resize_positional(const, 6)[1:], torch.full((36, 8), 2.5), atol=1e-5)
    clip = tiny_clip(4)
    model = AACLIP(clip, AAConfig.for_model(clip.config))
    assert model.cfg.img_size == 64
    x = images(2, 64)
    assert clip.visual.embed(x, model.positional).shape == (2, 1 + 64, 32)
    with torch.no_grad():
        patches, det = model.encode_image(x)
    assert [tuple(p.shape) for p in patches] == [(2, 64, 32)] * 4 and det.shape == (2, 32)
    patches, image = model.surgery_features(x)
    assert [tuple(p.shape) for p in patches] == [(2, 64, 32)] * 4 and image.shape == (2, 32)
    assert all(torch.isfinite(p).all() for p in patches)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        AAConfig.for_model(clip.config, img_size=60)

# ----------------------------------------------------------------------------- losses and maps


def test_focal_loss_matches_formula():
    """focal_loss equals mean(-(1 - pt)^2 log pt) with pt = <clamped one-hot target, p> + smooth."""
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(2, 2, 3, 4, generator=g).softmax(dim=1)
    mask = (torch.rand(2, 3, 4, generator=g) > 0.5).float()
    smooth = 1e-5
    total, count = 0.0, 0
    for b in range(2):
        for i in range(3):
            for j in range(4):
                m = mask[b, i, j].item()
                t0, t1 = min(max(1 - m, smooth), 1 - smooth), min(max(m, smooth), 1 - smooth)
                pt = t0 * probs[b, 0, i, j].item() + t1 * probs[b, 1, i, j].item() + smooth
                total += -(1 - pt) ** 2 * math.log(pt)
                count += 1
    assert focal_loss(probs, mask).item() == pytest.approx(total / count, rel=1e-5)


def test_losses_prefer_the_right_prediction():
    """A perfect prediction scores lower than a wrong one for focal, Dice and seg_loss; perfect Dice is ~0."""
    mask = torch.zeros(2, 8, 8)
    mask[0, 2:5, 3:7] = 1
    mask[1, 0:2, :] = 1
    perfect = torch.stack([1 - mask, mask], dim=1)
    wrong = torch.stack([mask, 1 - mask], dim=1)
    unsure = torch.full_like(perfect, 0.5)
    assert dice_loss(mask, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(1 - mask, mask) > 0.9
    for loss in (lambda p: focal_loss(p, mask), lambda p: dice_loss(p[:, 1], mask), lambda p: seg_loss(p, mask)):
        assert loss(perfect) < loss(unsure) < loss(wrong)
    assert focal_loss(perfect, mask).item() < 1e-6


def test_anomaly_map_shape_and_ordering():
    """anomaly_map is (B, size, size), (100 cos_ab + 1 - 100 cos_n) / 2 per patch, higher nearer the abnormal anchor."""
    g = 4
    angles = torch.linspace(0, math.pi / 2, g * g)  # patch k: from the normal anchor (0) to the abnormal (pi/2)
    patches = torch.stack([angles.cos(), angles.sin()], dim=-1)[None]  # (1, 16, 2)
    anchors = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 2, 2): normal, abnormal
    raw = anomaly_map(patches, anchors, g, sigma=0)
    assert raw.shape == (1, g, g)
    want = ((100 * angles.sin() + 1 - 100 * angles.cos()) / 2).reshape(g, g)
    assert torch.allclose(raw[0], want, atol=1e-4)
    flat = raw.flatten()
    assert (flat[1:] > flat[:-1]).all()  # row-major: patch k is pixel (k // g, k % g)
    # one abnormal patch in a normal image (interior or corner of an 8 x 8 grid): the smoothed map peaks there
    g = 8
    patches = anchors[:, :1].expand(2, g * g, 2).clone()
    patches[0, 4 * g + 3] = anchors[0, 1]
    patches[1, 0 * g + 7] = anchors[0, 1]
    at_grid = anomaly_map(patches, anchors.expand(2, 2, 2), g, sigma=1.0)
    assert [divmod(int(m.argmax()), g) for m in at_grid] == [(4, 3), (0, 7)]
    assert at_grid[0, 4, 3] < 0.5 * (100 + 1)  # smoothed: lower than the raw abnormal score
    maps = anomaly_map(patches, anchors.expand(2, 2, 2), 29, sigma=1.0)
    assert maps.shape == (2, 29, 29)
    assert [divmod(int(m.argmax()), 29) for m in maps] == [(16, 12), (0, 28)]  # align_corners: patch k -> pixel 4k


def _single_spike_peak(g, r, c):
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    patches = a[:, :1].expand(1, g * g, 2).clone()
    patches[0, r * g + c] = a[0, 1]
    return divmod(int(anomaly_map(patches, a, g, sigma=1.0)[0].argmax()), g)


@pytest.mark.parametrize("g, r, c", [(4, 1, 2), (8, 1, 4), (8, 6, 6)])
def test_anomaly_map_smoothing_keeps_a_single_peak_next_to_the_border(g, r, c):
    """A lone abnormal patch one step from the border stays the maximum of its smoothed map."""
    assert _single_spike_peak(g, r, c) == (r, c)

# ----------------------------------------------------------------------------- training on tiny data


def fixed_batch(root):
    """10 test images of tiles and tablet, 2 good and 3 defective of each, as one collated batch."""
    pairs = []
    for c in ("tiles", "tablet"):
        test = read_mvtec(root, c, "test")
        pairs += [(it, c) for it in [it for it in test if not it[1]][:2] + [it for it in test if it[1]][:3]]
    ds = CategoryDataset(pairs, ["tiles", "tablet"], 32)
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    assert 0 < int(batch[1].sum()) < len(pairs) and batch[2].sum() > 0  # both labels, defect pixels
    return batch


def test_stage2_steps_reduce_the_loss(data_root):
    """A few Adam steps on the image adapter lower stage 2's loss on a fixed batch; CLIP stays frozen."""
    clip = tiny_clip(5)
    model = AACLIP(clip, AAConfig.for_model(clip.config, img_size=32))
    batch, names = fixed_batch(data_root), ["tiles", "tablet"]
    with torch.no_grad():
        anchors = text_anchors(model.encode_text, names, 16, "cpu")
    frozen = {k: v.clone() for k, v in clip.state_dict().items()}
    opt = torch.optim.Adam(model.image_adapter.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = stage2_loss(model, batch, anchors, "cpu")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = stage2_loss(model, batch, anchors, "cpu").item()
    assert final < 0.6 * losses[0], losses
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in frozen.items())


def test_stage1_steps_reduce_the_loss(data_root):
    """A few Adam steps on the text adapter lower stage 1's loss (all levels + orthogonality) on a fixed batch."""
    clip = tiny_clip(6)
    model = AACLIP(clip, AAConfig.for_model(clip.config, img_size=32))
    batch, names = fixed_batch(data_root), ["tiles", "tablet"]
    opt = torch.optim.Adam(model.text_adapter.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = stage1_loss(model, batch, names, 0.1, "cpu")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = stage1_loss(model, batch, names, 0.1, "cpu").item()
    assert final < 0.6 * losses[0], losses
    assert all(p.grad is None for p in model.image_adapter.parameters())  # stage 1 never touches the image side


def test_split_train_val_is_disjoint_stratified_and_seeded(data_root):
    """Val is held out of train, holds both labels per category, and is the same for the same seed."""
    cats = ["tiles", "tablet"]
    train_pairs, val_pairs = split_train_val(data_root, cats, 0.3, 0, seed=0)
    paths = lambda pairs: {it[0] for it, _ in pairs}
    assert not paths(train_pairs) & paths(val_pairs)
    for c in cats:
        val_c = [it for it, cat in val_pairs if cat == c]
        assert sorted(it[1] for it in val_c) == [0, 1, 1]  # round(0.3 * 4) good, round(0.3 * 8) defective
        n_all = len(read_mvtec(data_root, c, "train")) + len(read_mvtec(data_root, c, "test"))
        assert len([1 for _, cat in train_pairs if cat == c]) == n_all - 3  # everything else trains
    assert split_train_val(data_root, cats, 0.3, 0, seed=0) == (train_pairs, val_pairs)
    others = [split_train_val(data_root, cats, 0.3, 0, seed=s)[1] for s in (1, 2, 3)]
    assert any(paths(o) != paths(val_pairs) for o in others)
    shots, _ = split_train_val(data_root, cats, 0.3, 5, seed=0)
    assert len(shots) == 10 and paths(shots) <= paths(train_pairs)

# ----------------------------------------------------------------------------- command lines


@pytest.fixture(scope="module")
def trained(data_root, xs_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("aa_out")
    results = train.main(["--method", "aa-clip", "--init", str(xs_checkpoint), "--data", str(data_root),
                          "--train-categories", "tiles", "tablet", "--test-categories", "weave", "bolt",
                          "--text-epoch", "1", "--image-epoch", "1", "--out", str(out), "--workers", "0",
                          "--batch-size", "8"])
    return out, results


def test_train_aa_clip_writes_checkpoint_results_and_overlays(trained, capsys):
    """train.py --method aa-clip saves aa_clip.pt, results.json (adapted and unadapted, metrics in [0, 1]) and PNGs;
    `python aa_clip.py summary` tabulates runs."""
    out, results = trained
    assert (out / "aa_clip.pt").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved["seed"] == 0 and saved["torch"] == torch.__version__ and saved["device"] == "cpu"
    capsys.readouterr()
    aa_clip.summary([out, out])  # the same run twice: every std is 0
    table = capsys.readouterr().out
    mean = 100 * saved["adapted"]["mean"]["pixel_auroc"]
    assert "| AA-CLIP | mean | " in table and f"{mean:.1f} ± 0.0" in table and "(seeds 0, 0)" in table
    assert saved["train_categories"] == ["tiles", "tablet"] and saved["test_categories"] == ["weave", "bolt"]
    assert [h["stage"] for h in saved["history"]] == ["text", "image"]
    for kind in ("adapted", "unadapted"):
        assert set(saved[kind]["test"]) == {"weave", "bolt"}
        for c, r in saved[kind]["test"].items():
            assert r["images"] == 12 and r["defective"] == 8
            for k in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap"):
                assert 0.0 <= r[k] <= 1.0, (kind, c, k, r[k])
        for k, m in saved[kind]["mean"].items():
            assert m == pytest.approx((saved[kind]["test"]["weave"][k] + saved[kind]["test"]["bolt"][k]) / 2)
    for tag in ("overlays", "overlays_unadapted"):
        assert sorted(p.name for p in (out / tag).glob("*.png")) == ["bolt.png", "weave.png"]
    assert (out / "table.md").is_file() and (out / "table_unadapted.md").is_file()
    state = torch.load(out / "aa_clip.pt", weights_only=False)
    assert state["format"] == aa_clip.FORMAT and state["args"]["test_categories"] == ["weave", "bolt"]


def test_test_py_anomaly_reproduces_training_results(trained, data_root, xs_checkpoint, tmp_path):
    """test.py anomaly on aa_clip.pt gives results.json's adapted numbers; on the plain CLIP, its unadapted ones."""
    out, _ = trained
    saved = json.loads((out / "results.json").read_text())
    cli.main(["anomaly", "--checkpoint", str(out / "aa_clip.pt"), "--out", str(tmp_path / "a"),
              "--json", str(tmp_path / "a.json"), "--batch-size", "8"])
    again = json.loads((tmp_path / "a.json").read_text())
    assert set(again["test"]) == {"weave", "bolt"}
    for c in ("weave", "bolt"):
        for k in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap"):
            assert again["test"][c][k] == pytest.approx(saved["adapted"]["test"][c][k], abs=1e-9)
    assert (tmp_path / "a" / "overlays" / "weave.png").is_file()
    cli.main(["anomaly", "--checkpoint", str(xs_checkpoint), "--data", str(data_root), "--categories", "weave",
              "--out", str(tmp_path / "u"), "--json", str(tmp_path / "u.json"), "--batch-size", "8"])
    base = json.loads((tmp_path / "u.json").read_text())
    assert list(base["test"]) == ["weave"]
    for k in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap"):
        assert base["test"]["weave"][k] == pytest.approx(saved["unadapted"]["test"]["weave"][k], abs=1e-9)
    assert (tmp_path / "u" / "overlays_unadapted" / "weave.png").is_file()


def test_bad_input_gives_one_line_errors(data_root, xs_checkpoint, tmp_path):
    """Overlapping train/test categories, --init scratch, and an unknown test category exit with a clear line."""
    common = ["--method", "aa-clip", "--data", str(data_root), "--out", str(tmp_path / "x"), "--workers", "0"]
    with pytest.raises(SystemExit) as e:
        train.main(common + ["--init", str(xs_checkpoint), "--train-categories", "tiles", "tablet",
                             "--test-categories", "weave", "tablet"])
    msg = str(e.value)
    assert msg.startswith("error:") and "tablet" in msg and "\n" not in msg and "weave" not in msg
    for init in (["--init", "scratch"], []):  # scratch, typed or by default
        with pytest.raises(SystemExit) as e:
            train.main(common + init + ["--train-categories", "tiles", "--test-categories", "weave"])
        assert str(e.value).startswith("error:") and "--init" in str(e.value) and "pretrained" in str(e.value)
    assert not (tmp_path / "x" / "aa_clip.pt").exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["anomaly", "--checkpoint", str(xs_checkpoint), "--data", str(data_root), "--categories", "weave",
                  "carpet", "--out", str(tmp_path / "y")])
    assert str(e.value).startswith("error:") and "carpet" in str(e.value) and "\n" not in str(e.value)


def test_split_needs_good_and_defective_val_images(data_root):
    """A --val-fraction that holds out no good or no defective image of a category is refused, naming it."""
    with pytest.raises(ValueError, match="'tiles'.*val-fraction"):
        split_train_val(data_root, ["tiles"], 0.01, 0, 0)


def test_interrupted_run_resumes_to_the_same_adapters(data_root, xs_checkpoint, tmp_path, monkeypatch):
    """A run stopped after image epoch 1 and resumed with --resume ends with the adapters and test numbers of an
    uninterrupted run; without --resume an existing run is never overwritten."""
    argv = lambda out: ["--method", "aa-clip", "--init", str(xs_checkpoint), "--data", str(data_root),
                        "--train-categories", "tiles", "tablet", "--test-categories", "weave", "--text-epoch", "1",
                        "--image-epoch", "2", "--out", str(out), "--workers", "0", "--batch-size", "8"]
    whole = train.main(argv(tmp_path / "whole"))
    n_batches = math.ceil(len(split_train_val(data_root, ["tiles", "tablet"], 0.3, 0, 0)[0]) / 8)
    calls, stage2 = [0], aa_clip.stage2_loss

    def stop_in_epoch_2(*args):
        calls[0] += 1
        if calls[0] == n_batches + 2:  # the second batch of image epoch 2
            raise KeyboardInterrupt
        return stage2(*args)
    monkeypatch.setattr(aa_clip, "stage2_loss", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv(tmp_path / "cut"))
    monkeypatch.setattr(aa_clip, "stage2_loss", stage2)
    assert not (tmp_path / "cut" / "aa_clip.pt").exists()
    with pytest.raises(SystemExit, match="--resume"):
        train.main(argv(tmp_path / "cut"))  # the interrupted run is kept, not overwritten
    resumed = train.main(argv(tmp_path / "cut") + ["--resume"])
    a, b = (torch.load(p / "aa_clip.pt", weights_only=True) for p in (tmp_path / "whole", tmp_path / "cut"))
    for part in ("text_adapter", "image_adapter"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert resumed["adapted"]["test"] == whole["adapted"]["test"]
    assert [h["val"] for h in resumed["history"]] == [h["val"] for h in whole["history"]]
    with pytest.raises(SystemExit, match="image_epoch was 2, now 3"):
        train.main(argv(tmp_path / "cut")[:-8] + ["--image-epoch", "3", "--out", str(tmp_path / "cut"), "--workers",
                                                   "0", "--batch-size", "8", "--resume"])


def test_training_batches_depend_only_on_seed_and_epoch(data_root):
    """Shuffled, augmented training batches are the same with 0 or 2 workers and change with the epoch."""
    from anomaly_data import augmentation, loader
    pairs, _ = split_train_val(data_root, ["tiles", "tablet"], 0.3, 0, 0)

    def epoch(workers, e):
        batches = loader(pairs, ["tiles", "tablet"], 32, 4, workers, augmentation(True), seed=5)
        batches.sampler.set_epoch(e)
        return list(batches)
    same, other = epoch(0, 3), epoch(2, 3)
    assert len(same) == len(other) and all(torch.equal(x, y) for a, b in zip(same, other) for x, y in zip(a, b))
    assert not torch.equal(same[0][0], epoch(0, 4)[0][0])


def test_test_py_anomaly_single_class_category_and_moved_base(trained, data_root, tmp_path):
    """A category with only defective images gets pixel metrics and no image metrics (not a crash); an AA-CLIP file
    refuses a base CLIP with the same config but other weights."""
    import shutil
    out, _ = trained
    root = tmp_path / "allbad"
    for item in read_mvtec(data_root, "bolt", "test"):
        if item[1]:
            for src, dst in ((item[0], root / "bolt" / "test" / item[3] / item[0].name),
                             (item[2], root / "bolt" / "ground_truth" / item[3] / item[2].name)):
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dst)
    cli.main(["anomaly", "--checkpoint", str(out / "aa_clip.pt"), "--data", str(root), "--out", str(tmp_path / "o"),
              "--json", str(tmp_path / "r.json")])
    r = json.loads((tmp_path / "r.json").read_text())["test"]["bolt"]
    assert r["image_auroc"] is None and r["image_ap"] is None and 0 <= r["pixel_auroc"] <= 1 and r["defective"] == 8
    other = tmp_path / "other.pt"
    torch.manual_seed(123)
    save_checkpoint(other, CLIP(CLIPConfig.from_json(XS)))
    with pytest.raises(SystemExit, match="weights differ"):
        cli.main(["anomaly", "--checkpoint", str(out / "aa_clip.pt"), "--init", str(other), "--out", str(tmp_path / "p")])
