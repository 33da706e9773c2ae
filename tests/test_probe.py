"""
Tests for probe.py: the candidates of every task differ only in the probed words and an independent caption
checker finds exactly one of them true (the answer); the scenes keep the layouts and constraints; determinism;
chance levels; scoring (an oracle gets 100%, ties are wrong); run_probe end to end on a tiny random CLIP; and
`python test.py probe` on a tiny saved checkpoint, with its one-line errors.
"""
import importlib.util
import json
import re

import numpy as np
import pytest
import torch

import probe
import synthetic
from checkpoints import save_checkpoint
from model import CLIP, CLIPConfig
from oracles import ROOT
from probe import TASKS, probe_images, probe_questions, probe_results, run_probe

_spec = importlib.util.spec_from_file_location("miniclip_test_probe", ROOT / "test.py")  # not the stdlib `test`
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

N = 40  # questions per task in the caption tests (no drawing: fast)
TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
CHANCE = {"shape": 12.5, "colour": 12.5, "size": 50, "position": 20, "count": 50, "binding": 50,
          "relation_lr": 50, "relation_ab": 50, "relation": 50}

# ----------------------------------------------------------------------------- an independent caption checker

FIRST = lambda words: {v[0]: k for k, v in words.items()}  # first synonym -> value
SIZE, COLOUR, SHAPE, POSITION = (FIRST(w) for w in (synthetic.SIZE_WORDS, synthetic.COLOUR_WORDS,
                                                     synthetic.SHAPE_WORDS, synthetic.POSITION_WORDS))
BACKGROUND = FIRST(synthetic.BACKGROUND_WORDS)
OBJ = r"an? (?:(\w+) )?(\w+) (\w+)"
POS = "|".join(POSITION)
SINGLE = re.compile(rf"{OBJ}(?: ({POS}))? on an? (\w+) background\.")
PAIR = re.compile(rf"{OBJ} (and|to the left of|above) {OBJ} on an? (\w+) background\.")


def parse(caption):
    """A probe caption -> {"objects": [{colour, shape, (size), (position)}], "link": None|"and"|relation, "bg"}."""
    text = caption[0].lower() + caption[1:]
    if m := SINGLE.fullmatch(text):
        size, colour, shape, position, bg = m.groups()
        objs, link = [{"size": size, "colour": colour, "shape": shape, "position": position}], None
    elif m := PAIR.fullmatch(text):
        g = m.groups()
        objs, link, bg = [{"size": g[0], "colour": g[1], "shape": g[2]}, {"size": g[4], "colour": g[5],
                                                                          "shape": g[6]}], g[3], g[7]
    else:
        raise AssertionError(f"not a probe caption: {caption!r}")
    article_ok = all(re.search(rf"\b{'an' if w[0] in 'aeiou' else 'a'} {w}\b", text)
                     for o in objs for w in [o["size"] or o["colour"]])
    assert article_ok, caption
    to_value = lambda o: {k: table[o[k]] for k, table in (("size", SIZE), ("colour", COLOUR), ("shape", SHAPE),
                                                           ("position", POSITION)) if o.get(k)}
    return {"objects": [to_value(o) for o in objs], "link": link, "bg": BACKGROUND[bg]}


def is_true(caption, scene):
    """Every claim of the caption holds in the scene, and it names exactly the scene's objects."""
    c, objs = parse(caption), scene["objects"]
    if c["bg"] != scene["background"] or len(c["objects"]) != len(objs):
        return False
    matches = [[o for o in objs if o["colour"] == co["colour"] and o["shape"] == co["shape"]] for co in c["objects"]]
    if any(len(m) != 1 or any(m[0][k] != v for k, v in co.items()) for m, co in zip(matches, c["objects"])):
        return False
    if c["link"] in ("to the left of", "above"):
        first, second = matches[0][0], matches[1][0]
        axis = 0 if c["link"] == "to the left of" else 1  # image x, y (y points down)
        return first["center"][axis] < second["center"][axis]
    return True

# ----------------------------------------------------------------------------- captions and scenes


@pytest.mark.parametrize("task", TASKS)
def test_exactly_one_candidate_is_true_and_it_is_the_answer(task):
    for q in probe_questions(task, N):
        truth = [is_true(c, q.scene) for c in q.candidates]
        assert truth.count(True) == 1 and truth[q.answer], (q.candidates, q.scene)
        assert len(set(q.candidates)) == len(q.candidates)


@pytest.mark.parametrize("task", ["shape", "colour", "size", "position"])
def test_attribute_candidates_differ_only_in_that_attribute_and_cover_all_its_values(task):
    values = probe.ATTRIBUTES[task]
    for q in probe_questions(task, N):
        parsed = [parse(c)["objects"][0] for c in q.candidates]
        assert [p[task] for p in parsed] == values
        rest = [{k: v for k, v in p.items() if k != task} for p in parsed]
        assert all(r == rest[0] for r in rest) and len(rest[0]) == 3  # the other three attributes, all stated
        assert all(parse(c)["bg"] == q.scene["background"] for c in q.candidates)


def test_binding_distractor_swaps_the_colours():
    for q in probe_questions("binding", N):
        true, false = (parse(c) for c in q.candidates)
        a, b = true["objects"]
        assert false["objects"] == [dict(a, colour=b["colour"]), dict(b, colour=a["colour"])]
        assert true["link"] == false["link"] == "and" and true["bg"] == false["bg"]


@pytest.mark.parametrize("task, link", [("relation_lr", "to the left of"), ("relation_ab", "above")])
def test_relation_distractor_swaps_the_order(task, link):
    for q in probe_questions(task, N):
        true, false = (parse(c) for c in q.candidates)
        assert false["objects"] == true["objects"][::-1] and true["link"] == false["link"] == link
        assert true["bg"] == false["bg"]


def test_count_candidates_are_one_object_and_the_same_plus_another():
    for q in probe_questions("count", N):
        one, two = (parse(c) for c in q.candidates)
        assert one["objects"] == two["objects"][:1] and len(two["objects"]) == 2 and one["bg"] == two["bg"]
        a, b = two["objects"]
        assert a["colour"] != b["colour"] and a["shape"] != b["shape"]
        assert q.answer == len(q.scene["objects"]) - 1


def test_captions_use_only_the_training_captions_words():
    templates = " ".join(synthetic.SINGLE_TEMPLATES + synthetic.PAIR_TEMPLATES)
    words = [templates, "background backdrop a an"] + [w for table in (
        synthetic.COLOUR_WORDS, synthetic.SHAPE_WORDS, synthetic.SIZE_WORDS, synthetic.BACKGROUND_WORDS,
        synthetic.POSITION_WORDS) for v in table.values() for w in v]
    words += [w for rel in synthetic.RELATION_WORDS.values() for ws in rel for w in ws]
    vocabulary = set(re.findall(r"[a-z]+", " ".join(words).lower()))
    for task in TASKS:
        for q in probe_questions(task, N):
            for c in q.candidates:
                assert set(re.findall(r"[a-z]+", c.lower())) <= vocabulary, c


def test_scenes_have_the_task_layouts_and_pairs_differ_in_colour_and_shape():
    layouts = {"shape": {"single"}, "colour": {"single"}, "size": {"single"}, "position": {"single"},
               "binding": {"horizontal", "vertical"}, "relation_lr": {"horizontal"}, "relation_ab": {"vertical"}}
    for task in TASKS:
        scenes = [q.scene for q in probe_questions(task, N)]
        for i, s in enumerate(scenes):
            want = layouts.get(task) or ({"single"} if i % 2 == 0 else {"horizontal", "vertical"})  # count: half, half
            assert s["layout"] in want and len(s["objects"]) == (1 if s["layout"] == "single" else 2)
            if len(s["objects"]) == 2:
                a, b = s["objects"]
                assert a["colour"] != b["colour"] and a["shape"] != b["shape"]
    binding = {q.scene["layout"] for q in probe_questions("binding", N)}
    assert binding == {"horizontal", "vertical"}  # both pair layouts occur


def test_every_value_occurs_as_the_answer():
    for task, values in probe.ATTRIBUTES.items():
        answers = {q.answer for q in probe_questions(task, 200)}
        assert answers == set(range(len(values))), task


def test_questions_and_images_are_deterministic_and_new():
    a = probe_questions("binding", 6)
    probe_questions.cache_clear()
    probe_images.cache_clear()
    b = probe_questions("binding", 6)
    assert a is not b and a == b
    assert probe_questions("binding", 3) == b[:3]  # scene i does not depend on n
    assert probe_questions("binding", 6, seed=99) != a
    pixels = lambda images: np.stack([np.asarray(im) for im in images])
    first = pixels(probe_images("binding", 6))
    probe_images.cache_clear()
    assert np.array_equal(first, pixels(probe_images("binding", 6)))
    assert first.shape == (6, 64, 64, 3)
    assert not np.array_equal(first, pixels(probe_images("binding", 6, seed=99)))
    assert probe_images("binding", 6) is probe_images("binding", 6)  # drawn once, kept in memory
    assert "fill" not in b[0].scene["objects"][0]  # drawing does not change the cached questions

# ----------------------------------------------------------------------------- scoring


def questions(n):
    return {task: probe_questions(task, n) for task in TASKS}


def test_oracle_scores_100_and_ties_score_0_and_chance_levels():
    qs = questions(N)
    oracle = {t: [torch.tensor([float(is_true(c, q.scene)) for c in q.candidates]) for q in v] for t, v in qs.items()}
    results = probe_results(qs, oracle)
    assert list(results) == probe.ROWS
    assert all(r["accuracy"] == 100 for r in results.values())
    assert {t: r["chance"] for t, r in results.items()} == CHANCE
    tied = {t: [torch.ones(len(q.candidates)) for q in v] for t, v in qs.items()}
    assert all(r["accuracy"] == 0 for r in probe_results(qs, tied).values())
    first = {t: [torch.arange(len(q.candidates), 0, -1.0) for q in v] for t, v in qs.items()}  # always candidate 0
    results = probe_results(qs, first)
    for task in TASKS:
        assert results[task]["accuracy"] == pytest.approx(100 * np.mean([q.answer == 0 for q in qs[task]]))
    # the attribute tasks name their wrong answers: always candidate 0, so every mistake chose the first value
    shape = results["shape"]["mistakes"]
    assert set(shape) == {f"{q.scene['objects'][0]['shape']}->circle" for q in qs["shape"] if q.answer != 0}
    assert sum(shape.values()) == sum(q.answer != 0 for q in qs["shape"])
    assert list(shape.values()) == sorted(shape.values(), reverse=True)
    assert "most frequent shape mistakes (true->chosen): " in probe.format_probe(results)
    assert probe_results(qs, oracle)["shape"]["mistakes"] == {} and "mistakes" not in results["binding"]
    assert all(r.get("mistakes", {}) == {} for r in probe_results(qs, tied).values())  # a tie chooses nothing
    assert results["relation"]["accuracy"] == 100 and results["relation"]["n"] == 2 * N


def test_is_correct_counts_ties_as_wrong():
    assert probe.is_correct(torch.tensor([0.2, 0.5, 0.1]), 1)
    assert not probe.is_correct(torch.tensor([0.5, 0.5, 0.1]), 1)
    assert not probe.is_correct(torch.tensor([0.6, 0.5, 0.1]), 1)

# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return CLIP(CLIPConfig.from_dict(TINY)).eval()


def test_run_probe_on_a_tiny_random_model(tiny):
    tiny.train()
    results = run_probe(tiny, n=6, batch_size=16)
    assert tiny.training  # its mode is given back
    assert list(results) == probe.ROWS
    for task, r in results.items():
        assert 0 <= r["accuracy"] <= 100 and r["chance"] == CHANCE[task]
        assert r["n"] == (12 if task == "relation" else 6)
    assert results == run_probe(tiny.eval(), n=6, batch_size=1000)  # batching changes nothing
    assert {task for task, r in results.items() if "image_readout" in r} == set(probe.ATTRIBUTES)
    assert all(0 <= r.get("image_readout", 0) <= 100 for r in results.values())
    table = probe.format_probe(results)
    mistaken = sum(bool(r.get("mistakes")) for r in results.values())
    assert len(table.splitlines()) == 1 + len(probe.ROWS) + mistaken
    assert "relation_ab" in table and "image readout" in table
    assert "shape" in probe.probe_summary(results)


def test_run_probe_scores_are_the_cosines_computed_by_hand(tiny, monkeypatch):
    """Each scene's candidate scores are the cosines of its own image with its candidates (checks that images,
    questions and captions stay aligned across tasks)."""
    from tokenizer import tokenize
    from transform import image_transform
    seen, original = {}, probe.probe_results
    monkeypatch.setattr(probe, "probe_results", lambda qs, scores: seen.update(scores) or original(qs, scores))
    run_probe(tiny, n=3, precision="fp32")
    for task in ("shape", "count", "relation_ab"):
        for q, image, scores in zip(probe_questions(task, 3), probe_images(task, 3), seen[task], strict=True):
            with torch.no_grad():
                i = tiny.encode_image(image_transform(32)(image)[None], normalize=True)  # (1, D)
                t = tiny.encode_text(tokenize(q.candidates, 32), normalize=True)  # (C, D)
            assert torch.allclose(scores, (i @ t.T)[0], atol=1e-5)


def test_ridge_readout_separates_what_is_linearly_separable_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(5, 16, generator=g)
    y = torch.arange(200) % 5
    x = centres[y] + torch.randn(200, 16, generator=g)  # five well separated clusters
    test_y = torch.arange(100) % 5
    test_x = centres[test_y] + torch.randn(100, 16, generator=g)
    assert torch.equal(probe.ridge_readout(x, y, 5, test_x), test_y)
    noise = torch.randn(200, 16, generator=g)  # labels unrelated to the features: about chance (20%)
    guess = probe.ridge_readout(noise, y, 5, torch.randn(1000, 16, generator=g))
    assert 0.1 < (guess == torch.arange(1000) % 5).float().mean() < 0.3


def test_image_readout_sees_what_the_image_features_hold(tiny, monkeypatch):
    """With image features that are the one-hot of the scene's shape (a perfect image tower for shape, blind to the
    rest), the readout is 100% on shape and about chance on colour, whatever the text tower does."""
    scenes = {}
    for seed in (probe.PROBE_SEED, probe.READOUT_SEED):
        for task in probe.ATTRIBUTES:
            for q, image in zip(probe_questions(task, 40, seed), probe_images(task, 40, seed)):
                scenes[id(image)] = q.scene
    shape_of = lambda image: synthetic.SHAPES.index(scenes[id(image)]["objects"][0]["shape"])
    monkeypatch.setattr(probe, "encode_images", lambda model, images, *a: torch.nn.functional.one_hot(
        torch.tensor([shape_of(im) for im in images]), 32).float())  # (N, embed_dim 32)
    monkeypatch.setattr(probe, "TASKS", list(probe.ATTRIBUTES))  # single-object scenes only
    results = run_probe(tiny, n=40)
    assert results["shape"]["image_readout"] == 100
    assert results["colour"]["image_readout"] < 50


def test_a_model_that_cannot_tell_captions_apart_scores_0(tiny):
    blind = CLIP(CLIPConfig.from_dict(TINY)).eval()
    blind.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        blind.text_projection.zero_()  # every caption's feature is 0: all candidates tie
    assert all(r["accuracy"] == 0 for r in run_probe(blind, n=4).values())


def test_run_probe_refuses_bad_arguments(tiny):
    short = dict(TINY, text_cfg=dict(TINY["text_cfg"], context_length=16))
    with pytest.raises(ValueError, match="context_length 16"):
        run_probe(CLIP(CLIPConfig.from_dict(short)), n=2)
    with pytest.raises(ValueError, match="n >= 1"):
        run_probe(tiny, n=0)
    with pytest.raises(ValueError, match="precision"):
        run_probe(tiny, n=2, precision="fp8")
    with pytest.raises(ValueError, match="fp16"):
        run_probe(tiny, device="cpu", precision="fp16", n=2)

# ----------------------------------------------------------------------------- python test.py probe


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("probe") / "run" / "last.pt"
    save_checkpoint(path, tiny, step=0)
    return path


def test_cli_prints_the_table_and_writes_json_by_the_checkpoint(checkpoint, capsys):
    cli.main(["probe", "--checkpoint", str(checkpoint), "--n", "4", "--precision", "fp32"])
    out = capsys.readouterr().out
    written = checkpoint.parent / "probe.json"
    assert f"wrote {written}" in out and "precision fp32" in out
    results = json.loads(written.read_text())
    assert list(results) == probe.ROWS and results["shape"]["n"] == 4
    assert all(f"\n{task} " in out for task in probe.ROWS)


def test_cli_json_flag(checkpoint, tmp_path, capsys):
    cli.main(["probe", "--checkpoint", str(checkpoint), "--n", "2", "--json", str(tmp_path / "p.json")])
    assert json.loads((tmp_path / "p.json").read_text())["binding"]["n"] == 2


@pytest.mark.parametrize("argv, needle", [
    (["probe", "--checkpoint", "missing.pt"], "checkpoint not found: missing.pt"),
    (["probe", "--checkpoint", "{ckpt}", "--json", "{tmp}/no/such/folder/p.json"], "does not exist"),
    (["probe", "--checkpoint", "{ckpt}", "--json", "{tmp}"], "is a folder"),
])
def test_cli_bad_input_gives_one_line_error_before_loading(checkpoint, tmp_path, monkeypatch, argv, needle):
    monkeypatch.setattr(cli, "load_checkpoint", lambda *a, **k: pytest.fail("loaded the model before checking"))
    argv = [a.replace("{ckpt}", str(checkpoint)).replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert str(e.value).startswith("error: ") and needle in str(e.value) and "\n" not in str(e.value)


def test_cli_without_a_trained_default_run(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "DEFAULT_RUN", tmp_path / "out" / "shapes" / "last.pt")
    with pytest.raises(SystemExit) as e:
        cli.main(["probe"])
    assert "python train.py" in str(e.value) and str(e.value).startswith("error: ")


def test_cli_n_must_be_positive(checkpoint, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["probe", "--checkpoint", str(checkpoint), "--n", "0"])
    assert e.value.code == 2 and "at least 1" in capsys.readouterr().err
