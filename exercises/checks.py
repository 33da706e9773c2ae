"""
The exercises: for each, what it is about, what to read, up to three hints, and its checks. A check runs the
learner's function and the project's own function (imported from the project module, never copied here) on the same
seeded random inputs (CS231n's assignments check the same way against a reference). The inputs are chosen so that the
usual mistakes change the answer: captions of different lengths for eot_pool, five captions per image in shuffled
order for recall_at_k, templates of different norms for zeroshot_classifier, a ratio other than 0.5 for clip_adapter.

Project modules are imported inside each check function, so `list` and `hint` start fast and one module that fails
to import only stops its own exercises. EXERCISES is in the suggested order.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from exercises.grading import Check, Failure

HERE = Path(__file__).resolve().parent


@dataclass
class Exercise:
    name: str  # the stub is exercises/NAME.py; its first function is named like the exercise
    topic: str
    minutes: int  # a learner's time for it, reading included
    reading: str  # the paper section / upstream file to read first
    solution: dict  # each function the learner writes -> "module:qualified name" of the project's function
    hints: tuple
    checks: callable  # learner module -> [Check]
    forbid: tuple = ()  # (module, attribute, advice): calls the learner's file may not make
    functions: tuple = field(init=False)

    def __post_init__(self):
        self.functions = tuple(self.solution)

    @property
    def stub(self):
        return HERE / f"{self.name}.py"


def resolve(target):
    """'model:Attention.forward' -> the function model.Attention.forward."""
    import importlib
    module, qualname = target.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# -----------------------------------------------------------------------------
# Seeded inputs


def randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def unit(*shape, seed):
    return F.normalize(randn(*shape, seed=seed), dim=-1)


def pairs(b, d, seed, noise=1.0):
    """(B, D) image and text features, L2-normalised, row i of each a noisy match of the other."""
    image = unit(b, d, seed=seed)
    return image, F.normalize(image + noise * randn(b, d, seed=seed + 1), dim=-1)


def seeded(seed, build):
    """build() with torch's global generator at `seed` (modules initialise from it), the caller's state kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_clip(seed=0):
    """A CLIP small enough to build in milliseconds, frozen, in eval mode; the real tokenizer's 49,408 ids. Widths
    of 64 (one head each), because build_model reads a checkpoint's heads as width // 64, as openai/CLIP does."""
    from model import CLIP, CLIPConfig
    cfg = CLIPConfig.from_dict({"embed_dim": 16,
                                "vision_cfg": {"image_size": 16, "layers": 1, "width": 64, "patch_size": 8},
                                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1,
                                             "layers": 1}})
    return seeded(seed, lambda: CLIP(cfg)).eval().requires_grad_(False)


def grad_of(fn, *inputs, wrt=0, seed=99):
    """d(sum(fn(*inputs) * R))/d(inputs[wrt]) for a fixed random R: the same for two functions only if their
    gradients are. inputs[wrt] is cloned, so the caller's tensor is untouched."""
    inputs = list(inputs)
    inputs[wrt] = inputs[wrt].detach().clone().requires_grad_(True)
    out = fn(*inputs)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise Failure("no gradient flows back through your result (a detach, numpy, or torch.no_grad?)")
    (out * randn(*out.shape, seed=seed)).sum().backward()
    return inputs[wrt].grad


# -----------------------------------------------------------------------------
# The checks, one function per exercise


def clip_loss_checks(learner):
    from losses import clip_loss
    fn = learner.clip_loss
    img, txt = pairs(8, 16, seed=1)
    img5, txt5 = pairs(5, 32, seed=2, noise=0.5)
    neg, valid = unit(6, 16, seed=3), torch.tensor([True, False, True, True, False, True])
    s14, s100 = torch.tensor(1 / 0.07), torch.tensor(100.0)
    return [
        Check("8 pairs in 16-d, logit scale 14.3", lambda: fn(img, txt, s14), lambda: clip_loss(img, txt, s14)),
        Check("5 pairs in 32-d, logit scale 100", lambda: fn(img5, txt5, s100), lambda: clip_loss(img5, txt5, s100)),
        Check("gradient w.r.t. the image features", lambda: grad_of(fn, img, txt, s14),
              lambda: grad_of(clip_loss, img, txt, s14)),
        Check("NegCLIP: 6 extra negative captions, 2 missing", lambda: fn(img, txt, s14, neg, valid),
              lambda: clip_loss(img, txt, s14, neg, valid), bonus=True),
    ]


def attention_module(width, heads, seed):
    """A model.Attention with random weights (its in_proj_weight is left uninitialised by the model)."""
    from model import Attention

    def build():
        m = Attention(width, heads)
        nn.init.normal_(m.in_proj_weight, std=width ** -0.5)
        nn.init.normal_(m.in_proj_bias, std=0.1)
        return m
    return seeded(seed, build)


def attention_checks(learner):
    from model import Attention
    fn, ref = learner.attention, Attention.forward
    m4, m3 = attention_module(32, 4, seed=4), attention_module(24, 3, seed=5)
    x7, x5 = randn(2, 7, 32, seed=6), randn(3, 5, 24, seed=7)
    return [
        Check("width 32, 4 heads, 7 tokens", lambda: fn(m4, x7), lambda: ref(m4, x7)),
        Check("the same, causal=True", lambda: fn(m4, x7, causal=True), lambda: ref(m4, x7, causal=True)),
        Check("width 24, 3 heads, 5 tokens, causal=True", lambda: fn(m3, x5, causal=True),
              lambda: ref(m3, x5, causal=True)),
        Check("gradient w.r.t. x, causal=True", lambda: grad_of(lambda x: fn(m4, x, causal=True), x7),
              lambda: grad_of(lambda x: ref(m4, x, causal=True), x7)),
    ]


def vision_tower(stem, seed):
    from model import VisionConfig, VisionTransformer
    cfg = VisionConfig(image_size=32, layers=1, width=32, patch_size=8, head_width=16, stem_channels=stem)
    return seeded(seed, lambda: VisionTransformer(cfg, embed_dim=16, quick_gelu=False)).eval()


def patch_embed_checks(learner):
    from model import VisionTransformer
    fn, ref = learner.patch_embed, VisionTransformer.embed
    plain, stem = vision_tower([], seed=8), vision_tower([8], seed=9)
    images = randn(2, 3, 32, 32, seed=10)
    table = randn(17, 32, seed=11)  # another (1 + 4 * 4, width) position table, as AA-CLIP passes one
    return [
        Check("2 images 32x32, 8-px patches (a 4x4 grid)", lambda: fn(plain, images), lambda: ref(plain, images)),
        Check("the same after a convolutional stem", lambda: fn(stem, images), lambda: ref(stem, images)),
        Check("a position table passed in", lambda: fn(plain, images, table), lambda: ref(plain, images, table)),
    ]


def caption_tokens():
    """(5, 12) token rows: SOT, words, EOT at different places, zero padding; row 2 holds id 0 ('!') inside the
    caption, row 0 fills all 12 places."""
    from tokenizer import EOT_ID, SOT_ID
    ends = [11, 3, 6, 8, 4]
    words = torch.randint(1, SOT_ID, (5, 12), generator=torch.Generator().manual_seed(12))
    tokens = torch.zeros(5, 12, dtype=torch.long)
    for row, end in enumerate(ends):
        tokens[row, 0], tokens[row, 1:end], tokens[row, end] = SOT_ID, words[row, 1:end], EOT_ID
    tokens[2, 2] = 0  # "!" is id 0, the same id as the padding
    return tokens


def eot_pool_checks(learner):
    from model import eot_pool
    from tokenizer import EOT_ID, SOT_ID
    fn = learner.eot_pool
    tokens, x = caption_tokens(), randn(5, 12, 8, seed=13)
    one, x1 = torch.tensor([[SOT_ID, 320, 1929, EOT_ID]]), randn(1, 4, 8, seed=14)
    return [
        Check("5 captions of different lengths, 12 places", lambda: fn(x, tokens), lambda: eot_pool(x, tokens)),
        Check("1 caption that fills its 4 places", lambda: fn(x1, one), lambda: eot_pool(x1, one)),
        Check("gradient w.r.t. x", lambda: grad_of(fn, x, tokens), lambda: grad_of(eot_pool, x, tokens)),
    ]


BPE_WORDS = ["a", "banana", "mississippi", "aaaaaaa", "lalalala", "abcabcabc", "hello", "lowering", "tokenization",
             "photograph", "zzzzyx", "internationalisation", "circle", "hexagon", "checkerboard", "qwxz"]
BPE_FOREIGN = ["naïve", "größe", "東京", "€5", "ça", "привет", "🙂"]


def bpe_checks(learner):
    import copy
    import types
    from tokenizer import SimpleTokenizer, bytes_to_unicode, default_tokenizer
    fn, tok, enc = learner.bpe, default_tokenizer(), bytes_to_unicode()
    g = torch.Generator().manual_seed(15)
    letters = "abcdeilnorst"  # a small alphabet makes repeated pairs
    random_words = ["".join(letters[i] for i in torch.randint(0, len(letters), (int(n),), generator=g))
                    for n in torch.randint(3, 13, (40,), generator=g)]

    def symbols(words):  # a word's UTF-8 bytes as bytes_to_unicode's characters: what bpe() receives
        return ["".join(enc[b] for b in w.encode("utf-8")) for w in words]

    def run(bpe, words):
        out = {}
        for w in symbols(words):
            merged = bpe(tok, w)
            if not isinstance(merged, (tuple, list)):
                raise Failure(f"bpe({w!r}) returned {type(merged).__name__}, expected a tuple of strings")
            out[w] = tuple(merged)
        return out

    def encode(bpe):  # the whole tokenizer with this bpe inside (a copy, with an empty cache)
        t = copy.copy(tok)
        t.cache, t.bpe = {}, types.MethodType(bpe, t)
        return {c: tuple(t.encode(c)) for c in CAPTIONS}
    ref = SimpleTokenizer.bpe
    return [
        Check(f"{len(BPE_WORDS)} English words", lambda: run(fn, BPE_WORDS), lambda: run(ref, BPE_WORDS)),
        Check(f"{len(random_words)} random words over 12 letters", lambda: run(fn, random_words),
              lambda: run(ref, random_words)),
        Check(f"{len(BPE_FOREIGN)} words beyond ASCII", lambda: run(fn, BPE_FOREIGN), lambda: run(ref, BPE_FOREIGN)),
        Check("ids of 3 captions through SimpleTokenizer.encode", lambda: encode(fn), lambda: encode(ref)),
    ]


CAPTIONS = ["A big violet circle above a big purple heart.", "There is a tiny pink disc on the right!",
            "Tokenization isn't magic: 2024 naïve cafés."]


class ScaleOnly(nn.Module):
    """Stands in for CLIP in train.train_step: fixed features, the learnable logit_scale, no logit bias (clip_loss)."""

    def __init__(self, value):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(value)))
        self.logit_bias = None

    def forward(self, images, tokens):
        return unit(len(images), 8, seed=16), unit(len(images), 8, seed=17), self.logit_scale.exp()


def train_step_clamp(logit_scale):
    """The project's clamp, read from the real training step: train.train_step with an optimiser that does not move
    anything (lr 0), started at this logit_scale; the value it leaves is copied into logit_scale, in place."""
    from contextlib import nullcontext
    from train import train_step
    model = ScaleOnly(logit_scale.item())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(model, torch.zeros(4, 1), torch.zeros(4, 2, dtype=torch.long), optimizer, scaler, nullcontext(), 0.0)
    with torch.no_grad():
        logit_scale.copy_(model.logit_scale)


def clamped(clamp, values):
    """What clamp does to a logit_scale parameter at each value (it must change the parameter in place, as
    train.py does: the optimiser holds that very tensor)."""
    out = []
    for v in values:
        p = nn.Parameter(torch.tensor(float(v)))
        returned = clamp(p)
        if isinstance(returned, torch.Tensor) and returned is not p and p.item() == v != returned.item():
            raise Failure(f"at {v:g} a new tensor came back and the parameter stayed {v:g}: change it in place")
        out.append(p.item())
    return out


def cosine_schedule_checks(learner):
    from trainer import get_lr
    fn, clamp = learner.cosine_schedule, learner.clamp_logit_scale

    def curve(lr, peak, warmup, total, steps):
        return [lr(s, peak, warmup, total) for s in range(steps)]
    values = [-1.0, 0.0, 2.0, math.log(1 / 0.07), math.log(100), 4.7, 9.0]
    return [
        Check("warmup 10, total 100, peak 1e-3: steps 0-119", lambda: curve(fn, 1e-3, 10, 100, 120),
              lambda: curve(get_lr, 1e-3, 10, 100, 120), atol=1e-9, rtol=1e-6),
        Check("no warmup, total 50, peak 0.5: steps 0-59", lambda: curve(fn, 0.5, 0, 50, 60),
              lambda: curve(get_lr, 0.5, 0, 50, 60), atol=1e-9, rtol=1e-6),
        Check("warmup 3, total 7, peak 2: steps 0-9", lambda: curve(fn, 2.0, 3, 7, 10),
              lambda: curve(get_lr, 2.0, 3, 7, 10), atol=1e-9, rtol=1e-6),
        Check("clamp_logit_scale at -1, 0, 2, ln 14.3, ln 100, 4.7, 9", lambda: clamped(clamp, values),
              lambda: clamped(train_step_clamp, values), atol=1e-6, rtol=0),
    ]


def retrieval_features(n_images, per_image, seed, shuffle):
    """Image features, caption features (each a noisy copy of its image's) and caption_image, as numpy arrays."""
    caption_image = torch.arange(n_images).repeat_interleave(per_image)
    if shuffle:
        caption_image = caption_image[torch.randperm(len(caption_image), generator=torch.Generator().manual_seed(seed))]
    images = unit(n_images, 16, seed=seed)
    captions = F.normalize(images[caption_image] + 0.9 * randn(len(caption_image), 16, seed=seed + 1), dim=-1)
    return images.numpy(), captions.numpy(), caption_image.numpy()


def recall_at_k_checks(learner):
    from evaluate import recall_at_k
    fn = learner.recall_at_k
    ordered, shuffled = retrieval_features(30, 5, 18, False), retrieval_features(30, 5, 20, True)
    return [
        Check("30 images x 5 captions, R@1/5/10", lambda: fn(*ordered), lambda: recall_at_k(*ordered)),
        Check("the captions in shuffled order", lambda: fn(*shuffled), lambda: recall_at_k(*shuffled)),
        Check("ks=(1, 3)", lambda: fn(*shuffled, ks=(1, 3)), lambda: recall_at_k(*shuffled, ks=(1, 3))),
    ]


TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", "itap of a {}.", "a {} in a video game."]
CLASSES = ["circle", "star", "purple heart"]


def zeroshot_classifier_checks(learner):
    from adapters import class_prototypes
    from fewshot import template_features
    prototypes, features = learner.class_prototypes, learner.template_features
    model = tiny_clip(seed=21)
    raw = randn(3, 5, 16, seed=22) * (0.5 + 3 * torch.rand(3, 5, 1, generator=torch.Generator().manual_seed(23)))
    return [
        Check("class_prototypes: 3 classes x 5 templates of different norms", lambda: prototypes(raw),
              lambda: class_prototypes(raw)),
        Check("template_features: 3 classes x 4 templates", lambda: features(model, CLASSES, TEMPLATES, "cpu"),
              lambda: template_features(model, CLASSES, TEMPLATES, "cpu")),
        Check("the classifier: class_prototypes(template_features(...))",
              lambda: prototypes(features(model, CLASSES, TEMPLATES, "cpu")),
              lambda: class_prototypes(template_features(model, CLASSES, TEMPLATES, "cpu"))),
    ]


WRAPPERS = {  # style -> (image tower prefix, text tower prefix, logit_scale's key)
    "tinyclip": ("_image_encoder.module.", "_text_encoder.module.", "_logit_scale.module.logit_scale"),
    "tinyclip-flat": ("module.image_encoder_without_ddp.", "module.text_encoder_without_ddp.",
                      "module._logit_scale.logit_scale"),  # TinyCLIP's second spelling, under one DDP "module."
    "open_clip": ("", "", "logit_scale"),
    "ddp": ("module.", "module.", "module.logit_scale"),  # saved from a DistributedDataParallel model
}


def wrapped_keys(keys, style):
    """A state dict's keys as a checkpoint release spells them (the layouts checkpoints.py reads)."""
    image, text, scale = WRAPPERS[style]
    return [scale if k == "logit_scale" else (image if k.startswith("visual.") else text) + k for k in keys]


def key_remap_checks(learner):
    import checkpoints
    from checkpoints import build_model
    fn, ref = learner.key_remap, checkpoints.strip_wrappers
    model = tiny_clip(seed=24)
    sd, images = model.state_dict(), randn(2, 3, 16, 16, seed=25)
    keys = list(sd)

    def remap(strip, style):
        return {k: strip(k) for k in wrapped_keys(keys, style)}

    def load(strip):  # a TinyCLIP release through checkpoints.convert_state_dict with this key_remap inside
        release = dict(zip(wrapped_keys(keys, "tinyclip"), sd.values()))
        saved, checkpoints.strip_wrappers = checkpoints.strip_wrappers, strip
        try:
            converted = checkpoints.convert_state_dict(release, "openai")
        finally:
            checkpoints.strip_wrappers = saved
        try:
            loaded = build_model(converted, config=model.config, source="the converted TinyCLIP release")
        except checkpoints.CheckpointError as e:
            raise Failure(" ".join(str(e).split())[:300]) from None
        with torch.no_grad():
            return loaded.encode_image(images)
    return [
        Check(f"{len(keys)} keys of a TinyCLIP release (_image_encoder.module. ...)",
              lambda: remap(fn, "tinyclip"), lambda: remap(ref, "tinyclip")),
        Check("the same, spelled module.image_encoder_without_ddp. ...", lambda: remap(fn, "tinyclip-flat"),
              lambda: remap(ref, "tinyclip-flat")),
        Check("open_clip keys, plain and under DDP's module.", lambda: {**remap(fn, "open_clip"), **remap(fn, "ddp")},
              lambda: {**remap(ref, "open_clip"), **remap(ref, "ddp")}),
        Check("the release loads: image features of the loaded model", lambda: load(fn), lambda: load(ref)),
    ]


def hard_negative_inputs(seed):
    img, txt = pairs(6, 16, seed=seed)
    neg = F.normalize(txt[:, None] + 0.7 * randn(6, 3, 16, seed=seed + 2), dim=-1)  # (6, 3, 16): near the caption
    valid = torch.ones(6, 3, dtype=torch.bool)
    valid[1, 2], valid[3, 0], valid[4] = False, False, False  # row 4: no hard negative at all
    return img, txt, neg, valid


def hard_negative_loss_checks(learner):
    from losses import hard_negative_loss
    fn = learner.hard_negative_loss
    img, txt, neg, valid = hard_negative_inputs(26)
    every = torch.ones_like(valid)
    s14, s100 = torch.tensor(1 / 0.07), torch.tensor(100.0)
    return [
        Check("6 images x 3 hard negatives, logit scale 14.3", lambda: fn(img, txt, neg, every, s14),
              lambda: hard_negative_loss(img, txt, neg, every, s14)),
        Check("4 negatives missing, logit scale 100", lambda: fn(img, txt, neg, valid, s100),
              lambda: hard_negative_loss(img, txt, neg, valid, s100)),
        Check("gradient w.r.t. the negatives", lambda: grad_of(fn, img, txt, neg, valid, s14, wrt=2),
              lambda: grad_of(hard_negative_loss, img, txt, neg, valid, s14, wrt=2)),
    ]


def clip_adapter_module(ratio, seed):
    from adapters import CLIPAdapter
    return seeded(seed, lambda: CLIPAdapter(16, reduction=4, ratio=ratio))


def clip_adapter_checks(learner):
    from adapters import CLIPAdapter
    fn, ref = learner.clip_adapter, CLIPAdapter.forward
    a2, a7 = clip_adapter_module(0.2, seed=27), clip_adapter_module(0.7, seed=28)
    x = randn(5, 16, seed=29)
    return [
        Check("16-d features, bottleneck 4, ratio 0.2", lambda: fn(a2, x), lambda: ref(a2, x)),
        Check("ratio 0.7", lambda: fn(a7, x), lambda: ref(a7, x)),
        Check("gradient w.r.t. x", lambda: grad_of(lambda t: fn(a7, t), x), lambda: grad_of(lambda t: ref(a7, t), x)),
    ]


def tip_inputs(seed):
    """Tip-Adapter's inputs for 3 classes x 4 shots in 16-d: normalised features, one-hot cache values."""
    centres = unit(3, 16, seed=seed)
    labels = torch.arange(3).repeat_interleave(4)
    keys = F.normalize(centres[labels] + 0.8 * randn(12, 16, seed=seed + 1), dim=-1)  # (12, 16)
    values = F.one_hot(labels, 3).float()  # (12, 3)
    text = F.normalize(centres + 0.8 * randn(3, 16, seed=seed + 2), dim=-1)  # (3, 16)
    images = F.normalize(centres[torch.tensor([0, 1, 2, 1, 0])] + randn(5, 16, seed=seed + 3), dim=-1)  # (5, 16)
    return images, keys, values, text


def tip_adapter_logits_checks(learner):
    from adapters import tip_adapter_logits
    fn = learner.tip_adapter_logits
    f, keys, values, text = tip_inputs(30)
    return [
        Check("5 images, 3 classes x 4 shots, alpha 1, beta 5.5", lambda: fn(f, keys, values, text, 1.0, 5.5),
              lambda: tip_adapter_logits(f, keys, values, text, 1.0, 5.5)),
        Check("alpha 3, beta 1", lambda: fn(f, keys, values, text, 3.0, 1.0),
              lambda: tip_adapter_logits(f, keys, values, text, 3.0, 1.0)),
        Check("alpha 0: zero-shot CLIP", lambda: fn(f, keys, values, text, 0.0, 5.5),
              lambda: tip_adapter_logits(f, keys, values, text, 0.0, 5.5)),
    ]


def coop_prompts_checks(learner):
    from adapters import CoOpPrompts
    fn, ref = learner.coop_prompts, CoOpPrompts.forward
    model = tiny_clip(seed=31)
    p4 = seeded(32, lambda: CoOpPrompts(model, CLASSES, n_ctx=4))
    p2 = seeded(33, lambda: CoOpPrompts(model, ["red circle", "blue star"], n_ctx=2))

    def ctx_grad(forward, prompts):
        prompts.ctx.grad = None
        out = forward(prompts)
        if out.requires_grad:
            (out * randn(*out.shape, seed=34)).sum().backward()
        if prompts.ctx.grad is None:
            raise Failure("no gradient reached self.ctx: the context must stay in the graph (no detach or no_grad)")
        return prompts.ctx.grad.clone()
    return [
        Check("3 classes, 4 context vectors: class weights", lambda: fn(p4), lambda: ref(p4)),
        Check("2 classes, 2 context vectors", lambda: fn(p2), lambda: ref(p2)),
        Check("gradient reaching the context vectors", lambda: ctx_grad(fn, p4), lambda: ctx_grad(ref, p4)),
    ]


# -----------------------------------------------------------------------------
# The registry, in the suggested order

CLIP = "CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020)"

EXERCISES = {e.name: e for e in [
    Exercise(
        "clip_loss", "symmetric InfoNCE loss over a batch of pairs", 30,
        f"{CLIP}, Figure 3 and section 2.3; open_clip src/open_clip/loss.py (ClipLoss); bonus: NegCLIP, "
        "Yuksekgonul et al. 2023, https://arxiv.org/abs/2210.01936, section 5",
        {"clip_loss": "losses:clip_loss"},
        ("The logits are logit_scale * image_features @ text_features.T, a (B, B) matrix whose diagonal holds the "
         "matching pairs. Which class is right for row i?",
         "labels = torch.arange(B). F.cross_entropy(logits, labels) is the image -> text half; the text -> image half "
         "is the same on the transposed matrix. Average the two.",
         "Bonus: hard = logit_scale * image_features @ negative_features.T is (B, N); set the missing columns to "
         "-inf with masked_fill(~negative_valid, float('-inf')), then torch.cat([logits, hard], dim=1) for the "
         "image -> text half only."),
        clip_loss_checks),
    Exercise(
        "attention", "multi-head self-attention, with the causal mask of the text tower", 45,
        "Vaswani et al. 2017, https://arxiv.org/abs/1706.03762, sections 3.2.1-3.2.2; "
        f"{CLIP}, section 2.4 (masked self-attention); nanoGPT model.py (CausalSelfAttention)",
        {"attention": "model:Attention.forward"},
        ("q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1), each (B, L, D). Split D "
         "into self.heads heads of hd = D // heads: .view(B, L, heads, hd).transpose(1, 2) -> (B, heads, L, hd).",
         "att = q @ k.transpose(-2, -1) / math.sqrt(hd) is (B, heads, L, L). Causal: before the softmax, set the "
         "entries above the diagonal to -inf: torch.ones(L, L, dtype=torch.bool).triu(1) marks them.",
         "y = att.softmax(dim=-1) @ v, then .transpose(1, 2).reshape(B, L, D) puts the heads side by side again; "
         "finish with self.out_proj(y)."),
        attention_checks,
        forbid=((F, "scaled_dot_product_attention",
                 "write softmax(q k^T / sqrt(hd)) v yourself: F.scaled_dot_product_attention is the answer"),)),
    Exercise(
        "patch_embed", "image -> patch tokens + class token + positions", 30,
        "ViT, Dosovitskiy et al. 2020, https://arxiv.org/abs/2010.11929, section 3.1 (equation 1); "
        f"{CLIP}, section 2.4; openai/CLIP clip/model.py (VisionTransformer.forward)",
        {"patch_embed": "model:VisionTransformer.embed"},
        ("self.conv1 (a convolution with stride = kernel = the patch size) applied to self.stem(x) gives "
         "(B, width, g, g): one width-long vector per patch.",
         "x.flatten(2) is (B, width, g*g): transpose to (B, g*g, width) so each row is a patch. Do not reshape "
         "straight to (B, g*g, width): that mixes up patches and channels.",
         "The class token goes FIRST: self.class_embedding.expand(B, 1, -1), then torch.cat along dim 1. Add the "
         "positions (B, 1 + g*g, width) and finish with self.ln_pre."),
        patch_embed_checks),
    Exercise(
        "eot_pool", "pooling the text tower's output at the EOT token", 15,
        f"{CLIP}, section 2.4 (the [EOS] token's activations are the text feature); openai/CLIP clip/model.py "
        "(encode_text)",
        {"eot_pool": "model:eot_pool"},
        ("Under the causal mask, which position has seen every word of the caption?",
         "EOT (49407) is the largest id in the vocabulary, so tokens.argmax(dim=-1) is its position in each row. "
         "Counting non-zero tokens does not work: id 0 is the real token '!'.",
         "x[torch.arange(B), eot] picks one row per caption (x[:, eot] would give (B, B, width))."),
        eot_pool_checks),
    Exercise(
        "bpe", "the merge loop of CLIP's byte-level BPE tokenizer", 45,
        "Sennrich et al. 2016, https://arxiv.org/abs/1508.07909, section 3.2; GPT-2 (Radford et al. 2019, "
        "'Language Models are Unsupervised Multitask Learners'), section 2.2; openai/CLIP clip/simple_tokenizer.py "
        "(bpe); Karpathy's minbpe (https://github.com/karpathy/minbpe)",
        {"bpe": "tokenizer:SimpleTokenizer.bpe"},
        ("Start from the word's characters, the last one with '</w>' appended: tuple(word[:-1]) + (word[-1] + "
         "'</w>',). Then repeat: find the adjacent pair with the lowest rank in self.bpe_ranks, merge it.",
         "min(get_pairs(symbols), key=lambda p: self.bpe_ranks.get(p, float('inf'))) is the pair learned first; "
         "stop when it is not in self.bpe_ranks at all (no known merge left), or when one symbol is left.",
         "Merge EVERY occurrence of that pair in one left-to-right pass: walk i over the symbols, and where "
         "(symbols[i], symbols[i + 1]) == pair append the two joined and skip 2, else append symbols[i] and skip 1."),
        bpe_checks),
    Exercise(
        "cosine_schedule", "learning rate: linear warmup + cosine decay; the logit-scale clamp", 25,
        "SGDR, Loshchilov & Hutter 2017, https://arxiv.org/abs/1608.03983, equation 5; warmup: Goyal et al. 2017, "
        f"https://arxiv.org/abs/1706.02677, section 2.2; {CLIP}, section 2.5 (cosine schedule; the temperature "
        "clipped so logits are scaled by at most 100); open_clip src/open_clip_train/scheduler.py (cosine_lr)",
        {"cosine_schedule": "trainer:get_lr", "clamp_logit_scale": "exercises.checks:train_step_clamp"},
        ("Warmup: steps 0 .. warmup-1 rise linearly and reach the peak at the last warmup step: "
         "peak * (step + 1) / warmup.",
         "After warmup: progress = (step - warmup) / (total - warmup) goes from 0 to 1, and "
         "lr = 0.5 * (1 + cos(pi * progress)) * peak. Past the total, progress stays at 1 (lr 0); guard against "
         "total == warmup with max(1, ...).",
         "clamp_logit_scale: logit_scale is log(1/temperature), so the bounds are 0 and math.log(100). Change the "
         "parameter in place under torch.no_grad(): logit_scale.clamp_(0, math.log(100))."),
        cosine_schedule_checks),
    Exercise(
        "recall_at_k", "image <-> text Recall@K with 5 captions per image", 40,
        f"{CLIP}, the appendix, Table 13 (zero-shot retrieval); Karpathy & Fei-Fei 2015, "
        "https://arxiv.org/abs/1412.2306, section 4 (the R@K protocol); LAION CLIP_benchmark "
        "clip_benchmark/metrics/zeroshot_retrieval.py",
        {"recall_at_k": "evaluate:recall_at_k"},
        ("Features are L2-normalised, so the cosine similarity is a dot product: scores = text @ image.T is "
         "(n_captions, n_images). text -> image: a caption's query is a hit at k if ITS image (caption_image) is "
         "among its k best.",
         "image -> text: a hit at k if ANY of the image's 5 captions is among its k best captions. Average the hits "
         "over the queries of each direction: 150 captions one way, 30 images the other.",
         "One way: for each query, the rank of its best positive = the number of items that score higher than its "
         "best positive; hit at k when that rank < k. torch.tensor(...) turns the numpy inputs into tensors."),
        recall_at_k_checks),
    Exercise(
        "zeroshot_classifier", "class names x prompt templates -> zero-shot class weights", 30,
        f"{CLIP}, section 3.1.4 (prompt engineering and ensembling); openai/CLIP "
        "notebooks/Prompt_Engineering_for_ImageNet.ipynb (zeroshot_classifier)",
        {"template_features": "fewshot:template_features", "class_prototypes": "adapters:class_prototypes"},
        ("template_features: the prompts are template.format(classname); order them class by class, so that "
         ".view(C, M, D) puts class c's M templates in row c. tokenize(prompts, model.config.text.context_length).",
         "class_prototypes: normalise each template embedding FIRST (dim=-1), then average over the templates "
         "(dim=1), then normalise again.",
         "Why normalise before averaging? A template whose embedding happens to be long would otherwise outvote "
         "the others."),
        zeroshot_classifier_checks),
    Exercise(
        "key_remap", "a TinyCLIP / open_clip checkpoint's keys -> this model's", 20,
        "TinyCLIP, Wu et al. 2023, https://arxiv.org/abs/2309.12314, and its releases (https://github.com/wkcn/"
        "TinyCLIP); open_clip src/open_clip/factory.py (load_checkpoint strips 'module.'); nanoGPT model.py "
        "(from_pretrained)",
        {"key_remap": "checkpoints:strip_wrappers"},
        ("Look at the keys: '_image_encoder.module.visual.conv1.weight' must become 'visual.conv1.weight'. Which "
         "prefixes are there, and in which orders can they come?",
         "Strip known prefixes ('module.' and each of TINYCLIP_WRAPPERS) from the front, again and again, until "
         "none matches: one pass in a fixed order misses '_image_encoder.module.'.",
         "The temperature is spelled '_logit_scale.module.logit_scale' or 'module._logit_scale.logit_scale': any "
         "key ending in 'logit_scale' is our 'logit_scale'."),
        key_remap_checks),
    Exercise(
        "hard_negative_loss", "each image against its own hard-negative captions (SVLC / NegCLIP)", 25,
        "SVLC, Doveh et al. 2023, https://arxiv.org/abs/2211.11733, section 3.3; NegCLIP, Yuksekgonul et al. 2023, "
        "https://arxiv.org/abs/2210.01936, section 5",
        {"hard_negative_loss": "losses:hard_negative_loss"},
        ("For image i there are 1 + K candidates: its caption and its K negatives. positive = (image * text)"
         ".sum(-1, keepdim=True) is (B, 1); torch.einsum('bd,bkd->bk', image, negatives) is (B, K).",
         "Concatenate to (B, 1 + K) logits, times logit_scale. The right answer is index 0 for every row: labels "
         "are zeros, not arange(B).",
         "Missing negatives: F.pad(negative_valid, (1, 0), value=True) is (B, 1 + K); masked_fill the others with "
         "-inf before the cross-entropy."),
        hard_negative_loss_checks),
    Exercise(
        "clip_adapter", "CLIP-Adapter: bottleneck MLP + residual blend", 20,
        "CLIP-Adapter, Gao et al. 2021, https://arxiv.org/abs/2110.04544, section 3.2; "
        "gaopengcuhk/CLIP-Adapter clip_adapter.py",
        {"clip_adapter": "adapters:CLIPAdapter.forward"},
        ("A(x) = ReLU(W2 ReLU(W1 x)): F.linear(x, self.fc[0].weight) is the dim -> dim/4 layer, "
         "self.fc[2].weight the dim/4 -> dim one; there is no bias, and a ReLU after each.",
         "The blend: ratio * A(x) + (1 - ratio) * x, with ratio = self.ratio (alpha in the paper). Which of the "
         "two keeps CLIP's knowledge when the ratio is small?",
         "The released code has a ReLU after the second layer too, so A(x) >= 0."),
        clip_adapter_checks),
    Exercise(
        "tip_adapter_logits", "Tip-Adapter: the training-free cache model", 25,
        "Tip-Adapter, Zhang et al. 2022, https://arxiv.org/abs/2207.09519, section 3.2; "
        "gaopengcuhk/Tip-Adapter main.py",
        {"tip_adapter_logits": "adapters:tip_adapter_logits"},
        ("The affinity A = image_features @ cache_keys.T is (B, N): the cosine of each image to each cached "
         "training image.",
         "exp(-beta * (1 - A)) turns cosines into positive weights, sharper for larger beta; @ cache_values (N, C) "
         "sums them per class -> (B, C).",
         "Add it, times alpha, to zero-shot CLIP's logits 100 * image_features @ text_weights.T (adapters.CLIP_SCALE "
         "= 100, as in the paper's code)."),
        tip_adapter_logits_checks),
    Exercise(
        "coop_prompts", "CoOp: learned context vectors in the text tower's input", 40,
        "CoOp, Zhou et al. 2022, https://arxiv.org/abs/2109.01134, section 3.2; KaiyangZhou/CoOp trainers/coop.py "
        "(PromptLearner, TextEncoder)",
        {"coop_prompts": "adapters:CoOpPrompts.forward"},
        ("self.tokens are the prompts 'X X X X circle.' tokenized: SOS, n_ctx placeholders, the class, '.', EOS. "
         "model = self.model[0]; embed them with model.token_embedding under torch.no_grad() -> (C, L, width).",
         "Replace the n_ctx placeholder embeddings (places 1 .. n_ctx) with self.ctx (n_ctx, width), the same for "
         "every class: expand it to (C, n_ctx, width) and torch.cat [SOS, ctx, the rest] along dim 1. Keep the "
         "length L.",
         "model.encode_text_embeddings(x, self.tokens) runs the frozen text tower from embeddings on and pools at "
         "EOT. Do not detach self.ctx: the gradient must reach it."),
        coop_prompts_checks),
]}
