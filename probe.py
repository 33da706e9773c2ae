"""
A zero-shot probe suite: which parts of a caption does a CLIP trained on the built-in Shapes data understand?

Each task is a multiple choice among captions that are identical except for the probed words; the model's answer
is the caption whose text feature has the highest cosine similarity with the image feature (CLIP's zero-shot
classifier, CLIP paper section 3.1.2). The scenes are new: drawn by synthetic.sample_scene and synthetic.render
("default" style, 64x64) from PROBE_SEED, which no dataset uses (the training data uses seed 0, the few-shot set
seed 1), with generators seeded per (seed, task, index) as synthetic.make_entry seeds them per (seed, index).
Every caption uses the first synonym of each word, states every other attribute truly, and follows the training
captions' wording ("{as_} on {bg}.", "there is {as_} {pa} on {bg}.", "{a} {rel} {b} on {bg}." in synthetic.py):

    shape, colour, size, position   "A small red star on the left on a striped background."  (one object)
    count                           "A red star on a gray background." / "A red star and a blue circle on ..."
    binding                         "A red star and a blue circle on ..." / "A blue star and a red circle on ..."
    relation_lr, relation_ab        "A red star to the left of a blue circle on ..." / "A red star above a ..."

Why each task:
  - shape, colour, size, position: does the image feature encode each attribute at all, and the text feature
    tell its words apart? 8, 8, 2 and 5 candidates: every value of that one attribute.
  - count: one object or two. A model that reads only "which words occur" can still pass it (the two-object
    caption names a colour and a shape the one-object image lacks), so it is the control for binding.
  - binding: two objects, colours swapped between them ("a blue star and a red circle"). Both captions hold the
    same words, so a bag of words cannot tell them apart: it measures whether each colour is tied to its shape.
  - relation_lr, relation_ab (and relation, their mean): the two objects swapped around "to the left of" or
    "above". Again the same words, so it measures whether word order (who is where) is encoded.
Binding and relation are the Shapes version of the ARO benchmark (Yuksekgonul et al., "When and why vision-language
models behave like bags-of-words, and what to do about it?", ICLR 2023, https://arxiv.org/abs/2210.01936):
VG-Attribution (swapped attributes) and VG-Relation (swapped relation arguments), on which CLIP scores about 60%
with chance at 50%. Their explanation: retrieval benchmarks, and the contrastive loss on ordinary batches, can be
solved without word order, so CLIP learns a bag of words; their fix, NegCLIP, trains with such swapped captions as
hard negatives.

For shape, colour, size and position the table adds an image readout (image_readout): a linear classifier
fitted on the image features of other scenes (READOUT_SEED) predicts the attribute without any caption, so a
failure can be placed in the image tower (readout low too) or on the text side (readout high).

Pair scenes always hold two objects of different colours and different shapes, so a swap changes the caption and
makes it false. Accuracy is the share of scenes whose true caption scores strictly highest (a tie is wrong, so a
model that cannot tell the candidates apart scores 0, not chance); chance is 100 / number of candidates.

    from probe import run_probe, format_probe
    print(format_probe(run_probe(model)))      # or: python test.py probe --checkpoint out/shapes/last.pt
"""
import copy
from collections import Counter
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from runtime import PRECISIONS, autocast_context, resolve_precision
from synthetic import (BACKGROUND_WORDS, COLOUR_WORDS, COLOURS, POSITION_WORDS, SHAPE_WORDS, SHAPES,
                       SINGLE_POSITIONS, SIZE_WORDS, SIZES, STYLES, _article, render, sample_scene)
from tokenizer import count_tokens, tokenize
from transform import image_transform

PROBE_SEED = 1234  # the reported probe; no dataset is drawn from it (Shapes: 0, the few-shot set: 1)
PROBE_VAL_SEED = 4321  # the probe's validation scenes: settings are chosen on these, never on PROBE_SEED's
READOUT_SEED = 5678  # the scenes the image readout is fitted on (image_readout), for either of the two above
STYLE, IMAGE_SIZE = "default", 64  # the training domain
# the drawn tasks; add new ones at the end: a task's index is part of its scenes' seeds
TASKS = ["shape", "colour", "size", "position", "count", "binding", "relation_lr", "relation_ab"]
ROWS = TASKS + ["relation"]  # relation: the mean of relation_lr and relation_ab
ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "size": list(SIZES), "position": list(SINGLE_POSITIONS)}


class Question(NamedTuple):
    scene: dict  # synthetic.sample_scene's record
    candidates: list  # captions, identical except for the probed words
    answer: int  # index of the true caption in candidates

# -----------------------------------------------------------------------------
# Captions: the first synonym of every word, in the training captions' wording


def phrase(obj, size=False):
    """An object's words: "red star", or "small red star" with size=True (obj: a scene object or a dict with its
    shape, colour and size)."""
    words = [SIZE_WORDS[obj["size"]][0]] if size else []
    return " ".join(words + [COLOUR_WORDS[obj["colour"]][0], SHAPE_WORDS[obj["shape"]][0]])


def on_background(scene):
    return "on " + _article(f"{BACKGROUND_WORDS.get(scene['background'], [scene['background']])[0]} background")


def sentence(text):
    return text[0].upper() + text[1:] + "."


def single_caption(obj, scene):
    """One object, every attribute: "A small red star on the left on a striped background." """
    return sentence(f"{_article(phrase(obj, size=True))} {POSITION_WORDS[obj['position']][0]} {on_background(scene)}")


def objects_caption(objs, scene):
    """One or two objects, colour and shape: "A red star and a blue circle on a gray background." """
    return sentence(" and ".join(_article(phrase(o)) for o in objs) + f" {on_background(scene)}")


def relation_caption(first, second, scene):
    """Two objects in order: "A red star to the left of a blue circle on ..." (horizontal scenes) or
    "A red star above a blue circle on ..." (vertical ones)."""
    rel = "to the left of" if scene["layout"] == "horizontal" else "above"
    return sentence(f"{_article(phrase(first))} {rel} {_article(phrase(second))} {on_background(scene)}")

# -----------------------------------------------------------------------------
# Questions: a scene of the right layout, then the candidates


def draw_scene(rng, layouts):
    """synthetic.sample_scene until the layout is one of layouts (the training statistics, conditioned on it);
    two objects must differ in colour and in shape, so that swapping them changes the caption."""
    while True:
        scene = sample_scene(rng, list(STYLES[STYLE].backgrounds))
        objs = scene["objects"]
        if scene["layout"] in layouts and (len(objs) == 1 or (objs[0]["colour"] != objs[1]["colour"]
                                                             and objs[0]["shape"] != objs[1]["shape"])):
            return scene


def other_object(obj, rng):
    """A second object for a one-object scene's false count caption: another colour and another shape."""
    return {"shape": str(rng.choice([s for s in SHAPES if s != obj["shape"]])),
            "colour": str(rng.choice([c for c in COLOURS if c != obj["colour"]]))}


def ask(task, scene, rng):
    """The Question of a task about a scene."""
    objs = scene["objects"]
    if task in ATTRIBUTES:  # every value of one attribute of the single object
        values = ATTRIBUTES[task]
        candidates = [single_caption(dict(objs[0], **{task: v}), scene) for v in values]
        return Question(scene, candidates, values.index(objs[0][task]))
    if task == "count":  # [one object, two objects]
        pair = objs if len(objs) == 2 else [objs[0], other_object(objs[0], rng)]
        return Question(scene, [objects_caption(pair[:1], scene), objects_caption(pair, scene)], len(objs) - 1)
    if task == "binding":  # [true, colours swapped]
        swapped = [dict(objs[0], colour=objs[1]["colour"]), dict(objs[1], colour=objs[0]["colour"])]
        return Question(scene, [objects_caption(objs, scene), objects_caption(swapped, scene)], 0)
    # relation_lr / relation_ab: [true order, swapped]; objects[0] is the left (top) one
    return Question(scene, [relation_caption(objs[0], objs[1], scene), relation_caption(objs[1], objs[0], scene)], 0)


def layouts(task, index):
    """The layouts scene `index` of a task may have."""
    if task == "count":  # half one-object, half two-object scenes
        return ["single"] if index % 2 == 0 else ["horizontal", "vertical"]
    return {"binding": ["horizontal", "vertical"], "relation_lr": ["horizontal"],
            "relation_ab": ["vertical"]}.get(task, ["single"])


@lru_cache(maxsize=32)
def probe_questions(task, n=200, seed=PROBE_SEED):
    """The n Questions of a task, the same for the same (task, n, seed); scene i comes from generators seeded with
    (seed, task index, i), so it does not depend on n."""
    if task not in TASKS:
        raise ValueError(f"unknown probe task {task!r}; choose one of {TASKS}")
    t = TASKS.index(task)
    return tuple(ask(task, draw_scene(np.random.default_rng([seed, t, i, 0]), layouts(task, i)),
                     np.random.default_rng([seed, t, i, 1])) for i in range(n))


@lru_cache(maxsize=32)
def probe_images(task, n=200, seed=PROBE_SEED):
    """The task's scenes drawn as 64x64 PIL images (kept in memory: a second run_probe does not redraw them)."""
    t = TASKS.index(task)
    return tuple(render(copy.deepcopy(q.scene), STYLES[STYLE], np.random.default_rng([seed, t, i, 2]), IMAGE_SIZE)
                 for i, q in enumerate(probe_questions(task, n, seed)))

# -----------------------------------------------------------------------------
# Scoring


def chosen(scores):
    """The candidate that scores strictly highest, or None on a tie for the top."""
    top = int(scores.argmax())
    return top if int((scores == scores[top]).sum()) == 1 else None


def is_correct(scores, answer):
    """The true caption scores strictly highest: a tie with any other candidate is wrong."""
    return chosen(scores) == answer


def mistakes(task, questions, scores):
    """The wrong answers of an attribute task, most frequent first: {"circle->hexagon": 12, ...} (true -> chosen);
    a tie chooses nothing, so it is wrong but not listed."""
    values = ATTRIBUTES[task]
    picks = [(q.answer, chosen(s)) for q, s in zip(questions, scores)]
    return dict(Counter(f"{values[a]}->{values[c]}" for a, c in picks if c not in (None, a)).most_common())


def probe_results(questions, scores):
    """questions, scores: {task: list of Questions}, {task: list of 1-D tensors, one score per candidate} ->
    {row: {"accuracy": %, "chance": %, "n": scenes}}, with the "relation" row when both relation tasks are there,
    and "mistakes" (mistakes()) for the attribute tasks."""
    results = {}
    for task, qs in questions.items():
        correct = [is_correct(s, q.answer) for q, s in zip(qs, scores[task], strict=True)]
        results[task] = {"accuracy": 100 * float(np.mean(correct)),
                         "chance": 100 * float(np.mean([1 / len(q.candidates) for q in qs])), "n": len(qs)}
        if task in ATTRIBUTES:
            results[task]["mistakes"] = mistakes(task, qs, scores[task])
    parts = [results[t] for t in ("relation_lr", "relation_ab") if t in results]
    if len(parts) == 2:
        results["relation"] = {"accuracy": float(np.mean([p["accuracy"] for p in parts])),
                               "chance": float(np.mean([p["chance"] for p in parts])), "n": sum(p["n"] for p in parts)}
    return results


def check_context(model, captions):
    """Refuse a model whose context would cut the captions: the candidates could lose the words they differ in."""
    longest = max(count_tokens(c) for c in captions) + 2  # with SOT and EOT
    if longest > model.config.text.context_length:
        raise ValueError(f"the probe's captions are up to {longest} tokens long, more than this model's "
                         f"context_length {model.config.text.context_length}: they would be cut")


@torch.inference_mode()
def encode_images(model, images, device, ctx, batch_size):
    """PIL images -> (N, embed_dim) float32 L2-normalised features, on the CPU."""
    preprocess = image_transform(model.config.vision.image_size)
    features = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([preprocess(im) for im in images[start:start + batch_size]])  # (B, 3, H, W)
        with ctx:
            x = model.encode_image(pixels.to(device))  # (B, embed_dim)
        features.append(F.normalize(x.float(), dim=-1).cpu())  # normalise in float32, not bf16
    return torch.cat(features)


@torch.inference_mode()
def encode_texts(model, captions, device, ctx, batch_size):
    """Captions -> (N, embed_dim) float32 L2-normalised features, on the CPU."""
    tokens = tokenize(captions, model.config.text.context_length)  # (N, L)
    features = []
    for chunk in tokens.split(batch_size):
        with ctx:
            x = model.encode_text(chunk.to(device))  # (B, embed_dim)
        features.append(F.normalize(x.float(), dim=-1).cpu())
    return torch.cat(features)


def ridge_readout(x, y, num_classes, test_x, l2=1.0):
    """A least-squares linear classifier (scikit-learn's RidgeClassifier): the weights W (D + 1, K) that map the
    features, with a constant 1 appended, closest to the one-hot labels, with l2 * ||W||^2 added; closed form, so it
    needs no iterations and no tuning loop. x (N, D), y (N,), test_x (M, D) -> predicted classes (M,)."""
    ones = lambda t: torch.cat([t.double(), torch.ones(len(t), 1, dtype=torch.float64)], dim=1)  # (N, D + 1)
    a, targets = ones(x), F.one_hot(y, num_classes).double()  # (N, D + 1), (N, K)
    w = torch.linalg.solve(a.T @ a + l2 * torch.eye(a.shape[1], dtype=torch.float64), a.T @ targets)  # (D + 1, K)
    return (ones(test_x) @ w).argmax(dim=-1)


def image_readout(model, features, device, ctx, n, batch_size):
    """Does the image feature hold an attribute at all, whatever the text tower makes of its words? For shape,
    colour, size and position: a linear classifier (ridge_readout) fitted on the image features of n scenes drawn
    from READOUT_SEED, scored on the task's probe scenes, whose features (n, D) are given -> {task: accuracy %}.
    No caption is involved. A low zero-shot score with a high readout: the image tower sees the attribute and the
    text side loses it; both low: the image tower never learned it."""
    readout = {}
    for task, values in ATTRIBUTES.items():
        x = encode_images(model, probe_images(task, n, READOUT_SEED), device, ctx, batch_size)  # (n, D)
        y = torch.tensor([q.answer for q in probe_questions(task, n, READOUT_SEED)])  # each scene's value
        test_x, test_q = features[task]
        guess = ridge_readout(x, y, len(values), test_x)  # (n,)
        readout[task] = 100 * float((guess == torch.tensor([q.answer for q in test_q])).float().mean())
    return readout


def run_probe(model, device=None, precision="auto", n=200, seed=PROBE_SEED, batch_size=256):
    """Every task on n new scenes -> {row: {"accuracy": %, "chance": %, "n": scenes}} (rows: ROWS; the relation
    row is the mean of relation_lr and relation_ab over their 2n scenes). device: where the model is (default:
    where its parameters are); precision: "auto" (runtime.resolve_precision), "fp32", "bf16" or "fp16"."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"the probe needs n >= 1 scenes per task and batch_size >= 1, got n={n}, "
                         f"batch_size={batch_size}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {PRECISIONS}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ctx = autocast_context(device, resolve_precision(device, precision)[0])  # fp16 on a CPU is refused here
    questions = {task: probe_questions(task, n, seed) for task in TASKS}
    captions = sorted({c for qs in questions.values() for q in qs for c in q.candidates})  # each encoded once
    check_context(model, captions)
    images = [im for task in TASKS for im in probe_images(task, n, seed)]
    was_training = model.training
    model.eval()
    try:
        image_features = encode_images(model, images, device, ctx, batch_size)  # (8n, D), tasks in TASKS order
        text_features = encode_texts(model, captions, device, ctx, batch_size)  # (C, D)
        per_task = dict(zip(TASKS, zip(image_features.split(n), questions.values())))  # task -> ((n, D), Questions)
        readout = image_readout(model, per_task, device, ctx, n, batch_size)
    finally:
        model.train(was_training)
    row = {c: i for i, c in enumerate(captions)}
    scores = {task: [text_features[[row[c] for c in q.candidates]] @ x  # (candidates,)
                     for x, q in zip(*per_task[task])] for task in TASKS}
    results = probe_results(questions, scores)
    for task, acc in readout.items():
        results[task]["image_readout"] = acc
    return results


def format_probe(results):
    """The results as a table: task, scenes, chance %, accuracy %, and the image readout % where there is one."""
    lines = [f"{'probe task':<12} {'n':>5} {'chance %':>9} {'accuracy %':>11} {'image readout %':>16}"]
    for task, r in results.items():
        readout = f"{r['image_readout']:>16.2f}" if "image_readout" in r else f"{'-':>16}"
        lines.append(f"{task:<12} {r['n']:>5} {r['chance']:>9.2f} {r['accuracy']:>11.2f} {readout}")
    for task, r in results.items():  # which wrong answers, where there are some: "shape: circle->hexagon 12, ..."
        if r.get("mistakes"):
            top = ", ".join(f"{pair} {count}" for pair, count in list(r["mistakes"].items())[:4])
            lines.append(f"most frequent {task} mistakes (true->chosen): {top}")
    return "\n".join(lines)


def probe_summary(results):
    """The results on one line: "shape 15.0% (chance 12.5%), colour 99.0% (chance 12.5%), ..." """
    return ", ".join(f"{task} {r['accuracy']:.1f}% (chance {r['chance']:.1f}%)" for task, r in results.items())
