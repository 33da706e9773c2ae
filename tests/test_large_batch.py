"""Training beyond one small batch: the chunked step (GradCache, grad_cache.chunked_backward) against the unchunked one,
alone and under DDP, and locked towers (LiT, CLIP.lock). Gradient checkpointing is tested in test_model.py."""
import copy
import json
from dataclasses import replace

import pytest
import torch

from label_prompts import LabelPrompts
from model import CLIP, CLIPConfig
from test_train import losses, run_train, tiny_data, weights, XS  # noqa: F401 (tiny_data is a fixture)
from tokenizer import tokenize
from train import configure_optimizer, train_step

FP32 = torch.autocast("cpu", enabled=False)


def small(**changes):
    config = CLIPConfig.from_json(XS)
    return replace(config, **changes)


def with_stem(config):
    """The XS model with a one-convolution stem (BatchNorm), as the default MiniCLIP-S has."""
    return replace(config, vision=replace(config.vision, stem_channels=[16]))


def batches(n=3, B=10, K=2, seed=1):
    """n batches of B random images with a caption and K hard negatives each (one of them missing: zeros)."""
    g, out = torch.Generator().manual_seed(seed), []
    for step in range(n):
        captions = [[f"a {size} {colour} shape number {i} at step {step}" for size, colour in
                     (("big", "red"), ("small", "red"), ("big", "blue"))[:1 + K]] for i in range(B)]
        tokens = torch.stack([tokenize(c, 16, truncate=True) for c in captions])  # (B, 1 + K, L)
        tokens[0, K] = 0
        out.append((torch.randn(B, 3, 32, 32, generator=g), tokens))
    return out


def train(model, data, chunks, ctx=FP32, prompts=None, **optimizer):
    model = copy.deepcopy(model)
    opt = configure_optimizer(model, 1e-3, 0.1, **optimizer)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    steps = [train_step(model, images, tokens, opt, scaler, ctx, 1.0, 2.0, chunks=chunks, prompts=prompts)
             for images, tokens in data]
    return model, opt, [value for step in steps for value in step]  # loss and gradient norm of each step


def max_difference(a, b):
    a, b = a.state_dict(), b.state_dict()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_chunked_steps_equal_the_full_batch(loss):
    """After 3 steps of batch 10 with hard negatives, 3 (uneven: 4+4+2) and 5 chunks give the losses, the gradient
    norms (before clipping: a gradient scaled by a wrong factor shows there, where AdamW's normalised step would hide
    it) and the weights of the unchunked steps within 1e-5 (fp32), for the softmax loss and for SigLIP's (whose bias
    is a cached gradient too)."""
    torch.manual_seed(0)
    model = CLIP(small() if loss == "clip" else small(init_logit_scale=2.3, init_logit_bias=-10.0))
    data = batches()
    full, _, full_losses = train(model, data, chunks=1, text_lr_scale=0.3)
    for chunks in (3, 5):
        chunked, _, chunked_losses = train(model, data, chunks=chunks, text_lr_scale=0.3)
        assert chunked_losses == pytest.approx(full_losses, rel=1e-5, abs=1e-5)
        assert max_difference(full, chunked) <= 1e-5
    assert max_difference(full, model) > 1e-4  # the steps did change the weights
    if loss == "siglip":
        assert abs(full.logit_bias.item() + 10.0) > 1e-4 and abs(full.logit_bias - chunked.logit_bias) <= 1e-6


def test_chunked_steps_with_label_prompts_equal_the_full_batch():
    """The label prompts go through the text tower with the last chunk's captions: 3 chunks give the unchunked
    steps' losses, gradient norms and weights; and the prompts' loss is part of the step."""
    torch.manual_seed(0)
    model, data, prompts = CLIP(small()), batches(), LabelPrompts("colour", 16)
    colours = ["red", "blue", "green", "plain"]  # three colours and none: labels and images must stay paired
    for images, tokens in data:
        tokens[:, 0] = tokenize([f"a {colours[i % 4]} shape number {i}" for i in range(10)], 16)
    assert prompts.labels(data[0][1][:, 0]).tolist() == [0, 4, 3, -1] * 2 + [0, 4]
    full, _, full_losses = train(model, data, chunks=1, prompts=prompts)
    chunked, _, chunked_losses = train(model, data, chunks=3, prompts=prompts)
    assert chunked_losses == pytest.approx(full_losses, rel=1e-5, abs=1e-5)
    assert max_difference(full, chunked) <= 1e-5
    _, _, without = train(model, data, chunks=1)
    assert without[0] < full_losses[0] - 1e-3  # the prompts' cross-entropy is added to the loss


def test_chunked_step_under_bf16_autocast_is_close():
    torch.manual_seed(0)
    model, data = CLIP(small()), batches(n=2)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    _, _, full_losses = train(model, data, chunks=1, ctx=bf16)
    _, _, chunked_losses = train(model, data, chunks=2, ctx=bf16)
    assert chunked_losses[::2] == pytest.approx(full_losses[::2], abs=2e-2)  # the losses (then each grad norm)


def test_chunked_step_moves_batchnorm_statistics_once_per_chunk():
    """The no-graph pass must not update BatchNorm's running statistics: only the pass with a graph does, once per
    chunk (each chunk normalised by its own statistics, like each process's share under DDP)."""
    torch.manual_seed(0)
    model, data = CLIP(with_stem(small())), batches(n=1)
    chunked, _, _ = train(model, data, chunks=2)
    bn = chunked.visual.stem[1]
    assert bn.num_batches_tracked.item() == 2
    expected = copy.deepcopy(model).train()
    with torch.no_grad():
        for images in data[0][0].chunk(2):
            expected.visual.stem(images)
    torch.testing.assert_close(bn.running_mean, expected.visual.stem[1].running_mean)


def test_ddp_with_chunks_equals_one_process(tiny_data, tmp_path):
    """2 gloo processes of batch 4, each in 2 chunks, give the single process's unchunked run on the global batch 8:
    the same losses, gradient norms and weights."""
    run_train(tmp_path / "one", tiny_data, steps=4, batch=8)
    run_train(tmp_path / "two", tiny_data, "--accum-chunks", "2", steps=4, batch=4, nproc=2)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-5)
    assert grad_norms(tmp_path / "one") == pytest.approx(grad_norms(tmp_path / "two"), rel=1e-5)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def grad_norms(out):
    return [r["grad_norm"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "grad_norm" in r]


def frozen_and_trainable(model):
    return ({n for n, p in model.named_parameters() if not p.requires_grad},
            {n for n, p in model.named_parameters() if p.requires_grad})


def test_locked_image_tower_stays_bit_identical_without_optimizer_state_or_graph():
    torch.manual_seed(0)
    model = CLIP(with_stem(small()))
    model.lock("image")
    frozen, trainable = frozen_and_trainable(model)
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith("visual.")}
    assert "logit_scale" in trainable and "token_embedding.weight" in trainable
    trained, opt, _ = train(model, batches(), chunks=1)
    before, after = model.state_dict(), trained.state_dict()
    for name in before:  # weights and BatchNorm's running statistics
        if name.startswith("visual."):
            assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["token_embedding.weight"], after["token_embedding.weight"])
    held = {id(p) for p in opt.state}
    assert held and not held & {id(p) for p in trained.visual.parameters()}  # no AdamW state for frozen weights
    trained.train()
    assert trained.visual.stem[1].training is False  # the frozen BatchNorm keeps its statistics
    assert trained.encode_image(torch.randn(2, 3, 32, 32)).grad_fn is None  # no graph was built


def test_lock_leaves_the_last_blocks_and_the_head_trainable():
    torch.manual_seed(0)
    model = CLIP(small())
    model.lock("image", unlocked_layers=1).lock("text", unlocked_layers=1)
    _, trainable = frozen_and_trainable(model)
    last_image, last_text = "visual.transformer.resblocks.1.", "transformer.resblocks.1."
    assert trainable == ({n for n, _ in model.named_parameters() if n.startswith((last_image, last_text))}
                         | {"visual.ln_post.weight", "visual.ln_post.bias", "visual.proj", "ln_final.weight",
                            "ln_final.bias", "text_projection", "logit_scale"})
    seen = {}
    model.visual.transformer.resblocks[0].register_forward_hook(lambda m, i, o: seen.update(first=o))
    features = model.encode_image(torch.randn(2, 3, 32, 32))
    assert seen["first"].grad_fn is None and features.grad_fn is not None  # the frozen prefix builds no graph
    trained, _, _ = train(model, batches(), chunks=2)  # a chunked step with frozen parameters works too
    before, after = model.state_dict(), trained.state_dict()
    assert torch.equal(before["visual.conv1.weight"], after["visual.conv1.weight"])
    assert not torch.equal(before[last_image + "mlp.c_fc.weight"], after[last_image + "mlp.c_fc.weight"])
    with pytest.raises(ValueError, match="has 2 blocks"):
        CLIP(small()).lock("text", unlocked_layers=3)


def test_lock_image_from_the_command_line(tiny_data, tmp_path):
    """train.py --init CKPT --lock-image: the image tower of the result is the checkpoint's, bit for bit."""
    run_train(tmp_path / "a", tiny_data, steps=2)
    result = run_train(tmp_path / "b", tiny_data, "--init", str(tmp_path / "a" / "last.pt"), "--lock-image", steps=3)
    assert "locked the image tower" in result.stdout
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("visual."))
    assert not torch.equal(a["token_embedding.weight"], b["token_embedding.weight"])
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["args"]["lock_image"] == 0
