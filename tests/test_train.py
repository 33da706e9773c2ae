"""train.py: the loss against the reference, a short CPU run, exact resume after SIGKILL, and DDP (2 gloo
processes) against one process on the same global batch."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoints import load_checkpoint
from model import CLIP, CLIPConfig
from oracles import ROOT
from losses import clip_loss, siglip_loss
from train import configure_optimizer, get_args, get_lr, train_step

XS = str(ROOT / "model_configs" / "MiniCLIP-XS-32px.json")


def random_features(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=-1, keepdim=True)


def test_clip_loss_equals_open_clip():
    open_clip = pytest.importorskip("open_clip")
    img, txt = random_features(16, 32, 0), random_features(16, 32, 1)
    for scale in (1.0, 14.3, 100.0):
        want = open_clip.ClipLoss()(img, txt, torch.tensor(scale))
        assert torch.allclose(clip_loss(img, txt, torch.tensor(scale)), want, atol=1e-6)


def test_clip_loss_sanity():
    img = random_features(64, 32, 0)
    assert clip_loss(img, img, torch.tensor(100.0)) < 1e-3  # perfectly aligned pairs
    assert abs(clip_loss(img, img, torch.tensor(0.0)) - math.log(64)) < 1e-5  # no signal: uniform over 64
    txt = random_features(64, 32, 1)
    assert torch.allclose(clip_loss(img, txt, torch.tensor(5.0)), clip_loss(txt, img, torch.tensor(5.0)))  # symmetric


def test_siglip_loss_equals_open_clip():
    """siglip_loss against open_clip's SigLipLoss on the same features; hard negatives are the columns open_clip adds
    with negative_only=True (its other ranks' captions), and a masked-out one counts for nothing."""
    open_clip = pytest.importorskip("open_clip")
    img, txt, neg = random_features(16, 32, 0), random_features(16, 32, 1), random_features(16, 32, 2)
    reference, valid = open_clip.loss.SigLipLoss(), torch.arange(16) < 12
    for scale, bias in ((10.0, -10.0), (1.0, 0.0), (30.0, -3.0)):
        s, b = torch.tensor(scale), torch.tensor(bias)
        torch.testing.assert_close(siglip_loss(img, txt, s, b), reference(img, txt, s, b), rtol=1e-6, atol=1e-6)
        want = reference(img, txt, s, b) + reference._loss(img, neg, s, b, negative_only=True)
        torch.testing.assert_close(siglip_loss(img, txt, s, b, neg), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(siglip_loss(img, txt, s, b, neg, valid), siglip_loss(img, txt, s, b, neg[:12]))


def test_siglip_run_learns_a_bias_and_resumes_with_it(tiny_data, tmp_path):
    out = tmp_path / "siglip"
    run_train(out, tiny_data, "--loss", "siglip", steps=8)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["config"]["init_logit_bias"] == -10.0 and ckpt["args"]["loss"] == "siglip"
    assert ckpt["model"]["logit_bias"] != -10.0  # it trained
    assert load_checkpoint(out / "last.pt").logit_bias is not None
    run_train(out, tiny_data, "--resume", steps=8)  # the run's loss and its model's bias come from the checkpoint
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--init", str(out / "last.pt"), "--data",
                             str(tiny_data), "--images", str(tiny_data.parent / "images"), "--out",
                             str(tmp_path / "other"), "--max-steps", "1"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "pass that --loss" in result.stderr.strip().splitlines()[-1]


def test_lr_schedule():
    lrs = [get_lr(s, 1.0, 10, 100) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and abs(lrs[55] - 0.5) < 1e-9 and lrs[-1] < 1e-3


def test_weight_decay_groups():
    model = CLIP(CLIPConfig.from_json(XS))
    opt = configure_optimizer(model, 1e-3, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert {"logit_scale", "positional_embedding", "visual.class_embedding", "visual.positional_embedding",
            "ln_final.weight", "visual.transformer.resblocks.0.attn.in_proj_bias"} <= no_decay
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" not in no_decay
    assert "token_embedding.weight" not in no_decay


def test_text_tower_learning_rate_scale():
    """text_lr_scale splits each weight-decay group by tower; the image tower and the temperature keep scale 1,
    every parameter is in exactly one group, and train.py's default is 0.3 only from scratch."""
    model = CLIP(CLIPConfig.from_json(XS))
    names = {id(p): n for n, p in model.named_parameters()}
    opt = configure_optimizer(model, 1e-3, 0.1, text_lr_scale=0.1)
    assert [(g["lr_scale"], g["weight_decay"]) for g in opt.param_groups] == [(1.0, 0.1), (1.0, 0.0), (0.1, 0.1),
                                                                             (0.1, 0.0)]
    scale = {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert len(scale) == sum(len(g["params"]) for g in opt.param_groups) == len(names)
    assert scale["logit_scale"] == scale["visual.conv1.weight"] == 1.0
    assert scale["token_embedding.weight"] == scale["transformer.resblocks.0.attn.in_proj_weight"] == 0.1
    assert len(configure_optimizer(model, 1e-3, 0.1).param_groups) == 2  # scale 1: the groups runs saved before
    assert get_args([]).text_lr_scale == 0.3 and get_args(["--init", "x.pt"]).text_lr_scale == 1.0
    assert get_args(["--init", "x.pt", "--text-lr-scale", "0.5"]).text_lr_scale == 0.5


def test_non_finite_loss_skips_the_step():
    model = CLIP(CLIPConfig.from_json(XS))
    opt = configure_optimizer(model, 1e-3, 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.full((4, 3, 32, 32), float("nan"))
    tokens = torch.tensor([[49406, 320, 49407] + [0] * 13] * 4)
    loss, grad_norm = train_step(model, images, tokens, opt, torch.amp.GradScaler("cpu", enabled=False),
                                 torch.autocast("cpu", enabled=False), 1.0)
    assert grad_norm is None and not math.isfinite(loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- end-to-end runs


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from synthetic import generate
    root = tmp_path_factory.mktemp("shapes")
    return generate(root, seed=1, n_train=96, n_val=16, n_test=16, image_size=32, workers=1)


def run_train(out, data, *extra, steps=12, batch=8, nproc=None, wait=True):
    cmd = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29517"] if nproc else []) + [
        str(ROOT / "train.py"), "--config", XS, "--data", str(data), "--images", str(data.parent / "images"),
        "--out", str(out), "--max-steps", str(steps), "--batch-size", str(batch), "--workers", "0",
        "--warmup", "3", "--lr", "1e-3", "--val-split", "", "--test-split", "", "--save-every", "2", "--precision", "fp32",
        *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def weights(out):
    return torch.load(out / "last.pt", weights_only=True)["model"]


def test_short_run_learns_and_checkpoint_loads(tiny_data, tmp_path):
    out = tmp_path / "run"
    run_train(out, tiny_data, "--val-split", "val", "--test-split", "test", steps=24)
    ls = losses(out)
    assert len(ls) == 24 and sum(ls[-4:]) / 4 < sum(ls[:4]) / 4  # the loss goes down
    ckpt = torch.load(out / "last.pt", weights_only=True)  # tensors and plain containers only
    assert ckpt["step"] == 24 and {"model", "config", "optimizer", "scheduler", "scaler", "rng", "args"} <= set(ckpt)
    model = load_checkpoint(out / "last.pt")
    assert model.config == CLIPConfig.from_json(XS)
    results = json.loads((out / "results_test.json").read_text())
    assert results["images"] == 16 and results["captions"] == 80 and 0 <= results["text_to_image"]["R@10"] <= 1
    assert (out / "metrics.png").exists()


def killed_and_resumed(out, data, *extra, steps):
    """Starts a run with the flags `extra`, SIGKILLs it once it has saved a checkpoint, and resumes it to the end
    with --resume alone (what defines the run comes from the checkpoint); returns the step it was killed at (the
    caller compares the final weights with an uninterrupted run's)."""
    proc = run_train(out, data, *extra, steps=steps, wait=False)
    deadline = time.time() + 300
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(out / "last.pt", weights_only=True)["step"]
    assert 0 < killed_at < steps, "the run finished before it could be killed; make it longer"
    run_train(out, data, "--resume", steps=steps)
    return killed_at


def test_resume_after_sigkill_gives_the_same_weights(tiny_data, tmp_path):
    steps, mine = 60, ("--mine-every", "3")  # odds mined every 3 steps: a resume must restore the ones in use
    run_train(tmp_path / "straight", tiny_data, *mine, steps=steps)
    killed_and_resumed(tmp_path / "killed", tiny_data, *mine, steps=steps)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_ddp_two_processes_equal_one_process(tiny_data, tmp_path):
    """2 gloo processes with batch 4 each see the same global batches as 1 process with batch 8."""
    run_train(tmp_path / "one", tiny_data, steps=5, batch=8)
    run_train(tmp_path / "two", tiny_data, steps=5, batch=4, nproc=2)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-5)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_non_finite_gradient_skips_the_step():
    """A finite loss with an inf/NaN gradient must not reach AdamW either (it would turn every weight into NaN)."""
    model = CLIP(CLIPConfig.from_json(XS))
    opt = configure_optimizer(model, 1e-3, 0.1)
    model.ln_final.weight.register_hook(lambda g: g * float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.tensor([[49406, 320, 49407] + [0] * 13, [49406, 321, 49407] + [0] * 13])
    loss, grad_norm = train_step(model, torch.randn(2, 3, 32, 32), tokens, opt, torch.amp.GradScaler("cpu", enabled=False),
                                 torch.autocast("cpu", enabled=False), 1.0)
    assert math.isfinite(loss) and grad_norm is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
