"""exercises/ and exercises.py: for every exercise, its checks pass with the project's own function injected, fail on
the untouched stub, and fail on typical wrong answers (the mutants below, at least two per exercise); a correct
answer written another way (by hand, within float error) passes; the command line's reports and its one-line errors;
the open experiments' train.py commands and plots."""
import importlib.util
import inspect
import json
import math
import re
import types

import pytest
import torch
import torch.nn.functional as F

from exercises.checks import EXERCISES, resolve
from exercises.grading import grade, grade_module, load_learner, status_of
from oracles import ROOT

_spec = importlib.util.spec_from_file_location("exercises_cli", ROOT / "exercises.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def solution(name, **replaced):
    """The exercise's functions as the project has them, some of them replaced (a mutant, or a by-hand version)."""
    fns = {f: resolve(target) for f, target in EXERCISES[name].solution.items()}
    return types.SimpleNamespace(**{**fns, **replaced})


def results(name, module):
    return grade_module(EXERCISES[name], module)


# -----------------------------------------------------------------------------
# Typical wrong answers, one thing wrong in each


def clip_loss_one_direction(image_features, text_features, logit_scale, negative_features=None, negative_valid=None):
    logits = logit_scale * image_features @ text_features.T
    return F.cross_entropy(logits, torch.arange(len(logits)))  # image -> text only


def clip_loss_no_temperature(image_features, text_features, logit_scale, negative_features=None, negative_valid=None):
    logits = image_features @ text_features.T  # cosines in [-1, 1]: the softmax is nearly flat
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def clip_loss_summed(image_features, text_features, logit_scale, negative_features=None, negative_valid=None):
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(len(logits))
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)  # not averaged


def clip_loss_by_hand(image_features, text_features, logit_scale, negative_features=None, negative_valid=None):
    logits = logit_scale * image_features @ text_features.T  # no bonus: NegCLIP's negatives ignored
    return -(logits.log_softmax(dim=1).diagonal().mean() + logits.log_softmax(dim=0).diagonal().mean()) / 2


def attention_by_hand(self, x, causal=False, scale=True, mask_after=False, split_heads_wrong=False, width_scale=False):
    """Correct with the defaults; each flag is a typical mistake."""
    B, L, D = x.shape
    h = self.heads
    q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
    if split_heads_wrong:
        q, k, v = (t.reshape(B, h, L, D // h) for t in (q, k, v))
    else:
        q, k, v = (t.view(B, L, h, D // h).transpose(1, 2) for t in (q, k, v))
    att = q @ k.transpose(-2, -1)
    if scale:
        att = att / math.sqrt(D if width_scale else D // h)
    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    if causal and not mask_after:
        att = att.masked_fill(future, float("-inf"))
    att = att.softmax(dim=-1)
    if causal and mask_after:
        att = att.masked_fill(future, 0.0)
    return self.out_proj((att @ v).transpose(1, 2).reshape(B, L, D))


def patch_embed_by_hand(self, x, positional_embedding=None, class_last=False, no_transpose=False, no_positions=False):
    pos = self.positional_embedding if positional_embedding is None else positional_embedding
    x = self.conv1(self.stem(x))  # (B, width, g, g)
    B, width = x.shape[:2]
    x = x.reshape(B, -1, width) if no_transpose else x.flatten(2).transpose(1, 2)
    cls = self.class_embedding.expand(B, 1, -1)
    x = torch.cat([x, cls] if class_last else [cls, x], dim=1)
    return self.ln_pre(x if no_positions else x + pos)


def eot_pool_last(x, tokens):
    return x[:, -1]


def eot_pool_sot(x, tokens):
    return x[:, 0]


def eot_pool_by_length(x, tokens):
    return x[torch.arange(len(x)), (tokens != 0).sum(dim=-1) - 1]  # wrong where a caption holds "!" (id 0)


def eot_pool_no_arange(x, tokens):
    return x[:, tokens.argmax(dim=-1)]  # (B, B, width)


def bpe_by_hand(self, word, rank=min, first_only=False, leftmost=False, end_of_word=True):
    """Correct with the defaults; rank=max, leftmost and end_of_word=False are typical mistakes (first_only is
    slower, and still right)."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"] if end_of_word else list(word)
    while len(symbols) > 1:
        known = [(a, b) for a, b in zip(symbols, symbols[1:]) if (a, b) in self.bpe_ranks]
        if not known:
            break
        pair = known[0] if leftmost else rank(known, key=self.bpe_ranks.get)
        out, i, merged = [], 0, False
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair and not (first_only and merged):
                out.append(symbols[i] + symbols[i + 1])
                i, merged = i + 2, True
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return tuple(symbols)


def bpe_string_replace(self, word):
    """Sennrich et al.'s merge on the space-joined symbols, without their regex's symbol boundaries."""
    from tokenizer import get_pairs
    text = " ".join(list(word[:-1]) + [word[-1] + "</w>"])
    while " " in text:
        pair = min(get_pairs(tuple(text.split(" "))), key=lambda p: self.bpe_ranks.get(p, float("inf")))
        if pair not in self.bpe_ranks:
            break
        text = text.replace(" ".join(pair), "".join(pair))  # "xa b" -> "xab" when merging ("a", "b")
    return tuple(text.split(" "))


def lr_no_warmup(step, peak, warmup, total):
    return 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0))) * peak


def lr_warmup_from_zero(step, peak, warmup, total):
    if step < warmup:
        return peak * step / warmup  # step 0 trains at lr 0, and the peak is never reached
    return 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(1, total - warmup), 1.0))) * peak


def lr_no_stop(step, peak, warmup, total):
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * peak  # rises again after total


def clamp_by_hand(logit_scale):
    with torch.no_grad():
        logit_scale.clamp_(0, math.log(100))


def clamp_at_100(logit_scale):
    with torch.no_grad():
        logit_scale.clamp_(0, 100)  # 100 is the bound of exp(logit_scale), not of logit_scale


def clamp_above_only(logit_scale):
    with torch.no_grad():
        logit_scale.clamp_(max=math.log(100))


def clamp_not_in_place(logit_scale):
    return logit_scale.clamp(0, math.log(100))  # a new tensor: the parameter is unchanged


def recall_by_hand(image_features, text_features, caption_image, ks=(1, 5, 10), one_caption=False, swapped=False,
                   ascending=False, off_by_one=False):
    """Correct with the defaults; each flag is a typical mistake."""
    images, texts = torch.tensor(image_features), torch.tensor(text_features)
    owner = torch.tensor(caption_image)
    best_first = not ascending  # ascending: the similarity sorted as if it were a distance
    t2i = (texts @ images.T).argsort(dim=1, descending=best_first)  # (n_captions, n_images) image ids, best first
    i2t = (images @ texts.T).argsort(dim=1, descending=best_first)  # (n_images, n_captions)
    ks_cut = {k: k + 1 if off_by_one else k for k in ks}  # off_by_one: the best k + 1 counted as the top k
    if one_caption:  # only each image's first caption counts as its caption
        first = torch.tensor([caption_image.tolist().index(i) for i in range(len(images))])
        i2t_hit = i2t == first[:, None]
    else:
        i2t_hit = owner[i2t] == torch.arange(len(images))[:, None]
    t2i_hit = t2i == owner[:, None]
    out = {"text_to_image": {f"R@{k}": t2i_hit[:, :ks_cut[k]].any(1).float().mean().item() for k in ks},
           "image_to_text": {f"R@{k}": i2t_hit[:, :ks_cut[k]].any(1).float().mean().item() for k in ks}}
    if swapped:
        out = {"text_to_image": out["image_to_text"], "image_to_text": out["text_to_image"]}
    return out


def prototypes_mean_first(template_features):
    return F.normalize(template_features.mean(dim=1), dim=-1)


def prototypes_not_renormalised(template_features):
    return F.normalize(template_features, dim=-1).mean(dim=1)


def template_major_features(model, classnames, templates, device):
    from tokenizer import tokenize
    prompts = [t.format(c) for t in templates for c in classnames]  # template by template: rows mix classes
    x = model.encode_text(tokenize(prompts, model.config.text.context_length).to(device)).float()
    return x.view(len(classnames), len(templates), -1).cpu()


def key_remap_one_pass(key):
    from checkpoints import TINYCLIP_WRAPPERS
    for prefix in ("module.",) + TINYCLIP_WRAPPERS:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return "logit_scale" if key.endswith("logit_scale") else key


def key_remap_module_only(key):
    return key[len("module."):] if key.startswith("module.") else key  # open_clip's rule, for DDP only


def key_remap_split(key):
    return key.split("module.")[-1]  # misses "module.image_encoder_without_ddp."


def hard_negative_ignores_mask(image_features, text_features, negative_features, negative_valid, logit_scale):
    positive = (image_features * text_features).sum(dim=-1, keepdim=True)
    negative = torch.einsum("bd,bkd->bk", image_features, negative_features)
    logits = logit_scale * torch.cat([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))


def hard_negative_no_temperature(image_features, text_features, negative_features, negative_valid, logit_scale):
    return resolve("losses:hard_negative_loss")(image_features, text_features, negative_features, negative_valid,
                                               torch.tensor(1.0))


def hard_negative_arange_labels(image_features, text_features, negative_features, negative_valid, logit_scale):
    positive = (image_features * text_features).sum(dim=-1, keepdim=True)
    negative = torch.einsum("bd,bkd->bk", image_features, negative_features)
    logits = (logit_scale * torch.cat([positive, negative], dim=1)).masked_fill(
        ~F.pad(negative_valid, (1, 0), value=True), float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(logits)))  # copied from clip_loss: the answer is index 0


def adapter_by_hand(self, x, wrong_way=False, last_relu=True, residual=True):
    a = F.relu(F.linear(F.relu(F.linear(x, self.fc[0].weight)), self.fc[2].weight))
    a = a if last_relu else F.linear(F.relu(F.linear(x, self.fc[0].weight)), self.fc[2].weight)
    if not residual:
        return a
    return self.ratio * x + (1 - self.ratio) * a if wrong_way else self.ratio * a + (1 - self.ratio) * x


def tip_by_hand(image_features, cache_keys, cache_values, text_weights, alpha, beta, sharpen="paper", clip_scale=100.0):
    affinity = image_features @ cache_keys.T  # (B, N)
    weights = {"paper": torch.exp(-beta * (1 - affinity)), "none": affinity,
               "exp(-beta A)": torch.exp(-beta * affinity)}
    return clip_scale * image_features @ text_weights.T + alpha * weights[sharpen] @ cache_values


def coop_by_hand(self, overwrite_sos=False, detach=False, insert=False):
    model = self.model[0]
    with torch.no_grad():
        embedded = model.token_embedding(self.tokens)  # (C, L, width)
    ctx = (self.ctx.detach() if detach else self.ctx).expand(len(embedded), -1, -1)  # (C, M, width)
    M = ctx.shape[1]
    if overwrite_sos:
        x = torch.cat([ctx, embedded[:, M:]], dim=1)
    elif insert:
        x = torch.cat([embedded[:, :1], ctx, embedded[:, 1:]], dim=1)
    else:
        x = torch.cat([embedded[:, :1], ctx, embedded[:, 1 + M:]], dim=1)
    return model.encode_text_embeddings(x, self.tokens)


def by(fn, **flags):
    """fn with some of its keyword flags set (a mutant of a by-hand version), under fn's own name."""
    def mutant(*args, **kwargs):
        return fn(*args, **kwargs, **flags)
    return mutant


MUTANTS = {  # exercise -> {what is wrong: {function: wrong version}}
    "clip_loss": {"one direction only": {"clip_loss": clip_loss_one_direction},
                  "no temperature": {"clip_loss": clip_loss_no_temperature},
                  "the two halves summed, not averaged": {"clip_loss": clip_loss_summed}},
    "attention": {"no 1/sqrt(d) scale": {"attention": by(attention_by_hand, scale=False)},
                  "mask applied after the softmax": {"attention": by(attention_by_hand, mask_after=True)},
                  "scaled by sqrt(width), not sqrt(head width)": {"attention": by(attention_by_hand, width_scale=True)},
                  "heads split by reshape, without transpose": {"attention": by(attention_by_hand,
                                                                                split_heads_wrong=True)}},
    "patch_embed": {"class token last": {"patch_embed": by(patch_embed_by_hand, class_last=True)},
                    "patches reshaped without transpose": {"patch_embed": by(patch_embed_by_hand, no_transpose=True)},
                    "no positions": {"patch_embed": by(patch_embed_by_hand, no_positions=True)}},
    "eot_pool": {"the last position": {"eot_pool": eot_pool_last},
                 "the SOT position": {"eot_pool": eot_pool_sot},
                 "the length from non-zero ids": {"eot_pool": eot_pool_by_length},
                 "x[:, eot] without arange": {"eot_pool": eot_pool_no_arange}},
    "bpe": {"the highest rank merged first": {"bpe": by(bpe_by_hand, rank=max)},
            "the leftmost known pair merged first": {"bpe": by(bpe_by_hand, leftmost=True)},
            "no end-of-word mark": {"bpe": by(bpe_by_hand, end_of_word=False)},
            "merged with str.replace across symbols": {"bpe": bpe_string_replace}},
    "cosine_schedule": {"no warmup": {"cosine_schedule": lr_no_warmup},
                        "warmup starting at 0": {"cosine_schedule": lr_warmup_from_zero},
                        "the cosine rising again after total": {"cosine_schedule": lr_no_stop},
                        "clamp at 100 instead of log(100)": {"clamp_logit_scale": clamp_at_100},
                        "no lower bound": {"clamp_logit_scale": clamp_above_only},
                        "clamp not in place": {"clamp_logit_scale": clamp_not_in_place}},
    "recall_at_k": {"1-caption recall for the 5-caption protocol": {"recall_at_k": by(recall_by_hand,
                                                                                     one_caption=True)},
                    "directions swapped": {"recall_at_k": by(recall_by_hand, swapped=True)},
                    "similarity sorted as a distance": {"recall_at_k": by(recall_by_hand, ascending=True)},
                    "the top k + 1 counted": {"recall_at_k": by(recall_by_hand, off_by_one=True)}},
    "zeroshot_classifier": {"averaged before normalising": {"class_prototypes": prototypes_mean_first},
                            "not normalised after averaging": {"class_prototypes": prototypes_not_renormalised},
                            "prompts in template-major order": {"template_features": template_major_features}},
    "key_remap": {"one pass over the prefixes": {"key_remap": key_remap_one_pass},
                  "only DDP's module. stripped": {"key_remap": key_remap_module_only},
                  "split at the last module.": {"key_remap": key_remap_split}},
    "hard_negative_loss": {"missing negatives not masked": {"hard_negative_loss": hard_negative_ignores_mask},
                           "no temperature": {"hard_negative_loss": hard_negative_no_temperature},
                           "labels arange(B) as in clip_loss": {"hard_negative_loss": hard_negative_arange_labels}},
    "clip_adapter": {"blended the wrong way round": {"clip_adapter": by(adapter_by_hand, wrong_way=True)},
                     "no ReLU after the second layer": {"clip_adapter": by(adapter_by_hand, last_relu=False)},
                     "no residual blend": {"clip_adapter": by(adapter_by_hand, residual=False)}},
    "tip_adapter_logits": {"no exp(-beta(1 - A)) sharpening": {"tip_adapter_logits": by(tip_by_hand, sharpen="none")},
                           "exp(-beta A)": {"tip_adapter_logits": by(tip_by_hand, sharpen="exp(-beta A)")},
                           "CLIP's logits without the 100": {"tip_adapter_logits": by(tip_by_hand, clip_scale=1.0)}},
    "coop_prompts": {"the context overwrites SOS": {"coop_prompts": by(coop_by_hand, overwrite_sos=True)},
                     "the context detached": {"coop_prompts": by(coop_by_hand, detach=True)},
                     "the context inserted, not replacing": {"coop_prompts": by(coop_by_hand, insert=True)}},
}

BY_HAND = {  # correct answers written another way than the project's: they must pass (float error allowed)
    "clip_loss": {"clip_loss": clip_loss_by_hand},
    "attention": {"attention": attention_by_hand},
    "patch_embed": {"patch_embed": patch_embed_by_hand},
    "bpe": {"bpe": bpe_by_hand},
    "cosine_schedule": {"clamp_logit_scale": clamp_by_hand},
    "recall_at_k": {"recall_at_k": recall_by_hand},
    "clip_adapter": {"clip_adapter": adapter_by_hand},
    "tip_adapter_logits": {"tip_adapter_logits": tip_by_hand},
    "coop_prompts": {"coop_prompts": coop_by_hand},
}


# -----------------------------------------------------------------------------
# Every exercise: the solution passes, the stub and the mutants fail


@pytest.mark.parametrize("name", EXERCISES)
def test_the_projects_own_function_passes_every_check(name):
    res = results(name, solution(name))
    assert res and all(r.passed for r in res), [(r.name, r.message) for r in res if not r.passed]


@pytest.mark.parametrize("name", EXERCISES)
def test_the_untouched_stub_fails_every_check_as_not_started(name):
    report = grade(EXERCISES[name], EXERCISES[name].stub)
    assert report.status == "not started" and not report.error
    assert all(not r.passed and r.not_implemented for r in report.results)


@pytest.mark.parametrize("name", EXERCISES)
def test_every_exercise_keeps_at_least_two_mutants(name):
    assert len(MUTANTS[name]) >= 2


@pytest.mark.parametrize("name,wrong", [(n, w) for n, ms in MUTANTS.items() for w in ms])
def test_a_typical_wrong_answer_fails_a_required_check(name, wrong):
    res = results(name, solution(name, **MUTANTS[name][wrong]))
    assert status_of(res) == "fails" and any(not r.passed for r in res if not r.bonus)


@pytest.mark.parametrize("name", BY_HAND)
def test_a_correct_answer_written_by_hand_passes(name):
    res = results(name, solution(name, **BY_HAND[name]))
    assert status_of(res) == "passes", [(r.name, r.message, r.maxdiff) for r in res if not r.passed]


def test_merging_only_the_first_occurrence_is_slower_but_not_wrong():
    """A merge creates pairs that were learned after it (higher ranks), so the pair's other occurrences are still
    the best pairs on the next round: the result is the same (a question of the bpe questionnaire)."""
    assert status_of(results("bpe", solution("bpe", bpe=by(bpe_by_hand, first_only=True)))) == "passes"


def test_a_required_pass_with_a_failed_bonus_still_passes():
    res = results("clip_loss", solution("clip_loss", clip_loss=clip_loss_by_hand))
    assert status_of(res) == "passes" and [r.name for r in res if not r.passed] == [r.name for r in res if r.bonus]


@pytest.mark.parametrize("name", EXERCISES)
def test_each_stub_has_the_signature_of_the_projects_function(name):
    e = EXERCISES[name]
    stub = load_learner(e.stub, e.functions)
    for fn, target in e.solution.items():
        assert list(inspect.signature(getattr(stub, fn)).parameters) == \
            list(inspect.signature(resolve(target)).parameters), fn
    text = e.stub.read_text()
    assert "YOUR CODE HERE" in text and "NotImplementedError" in text and "https://" in text
    assert 1 <= len(e.hints) <= 3


def test_project_modules_never_import_exercises():
    for path in ROOT.glob("*.py"):
        if path.name != "exercises.py":
            assert not re.search(r"^\s*(from|import) exercises", path.read_text(), re.M), path.name


def test_writing_attention_with_the_builtin_kernel_is_refused(tmp_path):
    (tmp_path / "attention.py").write_text("import torch.nn.functional as F\n\n\n"
                                           "def attention(self, x, causal=False):\n"
                                           "    return F.scaled_dot_product_attention(x, x, x, is_causal=causal)\n")
    report = grade(EXERCISES["attention"], tmp_path / "attention.py")
    assert report.status == "fails" and all("write softmax" in r.message for r in report.results)


# -----------------------------------------------------------------------------
# The command line


def run_cli(capsys, *argv):
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_start_copies_the_stubs_and_keeps_existing_work(tmp_path, capsys):
    ws = tmp_path / "ws"
    code, out, _ = run_cli(capsys, "start", str(ws))
    assert code == 0 and sorted(p.stem for p in ws.glob("*.py")) == sorted(EXERCISES)
    (ws / "clip_loss.py").write_text("# my work\n")
    code, _, _ = run_cli(capsys, "start", str(ws))
    assert code.startswith("error: ") and "--force" in code and "\n" not in code  # one line, nothing copied
    assert (ws / "clip_loss.py").read_text() == "# my work\n"
    (ws / "bpe.py").unlink()
    code, out, _ = run_cli(capsys, "start", str(ws))  # a missing file is copied, the others kept
    assert code == 0 and "copied 1 stub" in out and (ws / "clip_loss.py").read_text() == "# my work\n"
    code, out, _ = run_cli(capsys, "start", str(ws), "--force", "--only", "clip_loss")
    assert code == 0 and (ws / "clip_loss.py").read_text() == EXERCISES["clip_loss"].stub.read_text()


def test_list_shows_each_status(tmp_path, capsys):
    ws = tmp_path / "ws"
    run_cli(capsys, "start", str(ws))
    (ws / "clip_loss.py").write_text("from losses import clip_loss\n")
    (ws / "eot_pool.py").write_text("def eot_pool(x, tokens):\n    return x[:, -1]\n")
    (ws / "bpe.py").unlink()
    code, out, _ = run_cli(capsys, "list", "--workspace", str(ws))
    status = {line.split()[0]: line.rsplit("  ", 1)[-1].strip() for line in out.splitlines()[1:]}
    assert code == 0 and status["clip_loss"] == "passes" and status["eot_pool"] == "fails"
    assert status["bpe"] == "missing" and status["attention"] == "not started"


def test_check_reports_each_check_like_cmp(tmp_path, capsys):
    (tmp_path / "eot_pool.py").write_text("def eot_pool(x, tokens):\n    return x[:, -1]\n")
    code, out, _ = run_cli(capsys, "check", "eot_pool", "--workspace", str(tmp_path))
    assert code == 1 and "compared with model.py eot_pool" in out and "eot_pool fails: 1 of 3 checks" in out
    assert re.search(r"FAIL .*exact: no  \| approximate: no  \| maxdiff: \S+ \| rel err: \S+", out)
    assert re.search(r"PASS .*1 caption that fills its 4 places", out)  # the last place is right there


def test_check_all_json_for_collecting_results(tmp_path, capsys):
    run_cli(capsys, "start", str(tmp_path))
    (tmp_path / "tip_adapter_logits.py").write_text("from adapters import tip_adapter_logits\n")
    code, out, _ = run_cli(capsys, "check", "--all", "--json", "--workspace", str(tmp_path))
    data = json.loads(out)
    assert code == 1 and data["summary"] == {"passes": 1, "fails": 0, "not started": len(EXERCISES) - 1, "missing": 0}
    tip = next(x for x in data["exercises"] if x["exercise"] == "tip_adapter_logits")
    assert tip["status"] == "passes" and all(c["passed"] and c["maxdiff"] == 0 for c in tip["checks"])


@pytest.mark.parametrize("source,expected", [
    ("def clip_loss(a, b, s, n=None, v=None)\n    return 0\n", r"clip_loss\.py, line 1: expected ':'"),
    ("import no_such_module\n", r"importing .*clip_loss\.py raised ModuleNotFoundError: No module named"),
    ("def loss(a, b, s):\n    return 0\n", r"defines no function clip_loss\(\)"),
    ("def clip_loss(a, b, s, n=None, v=None):\n    return a @ b.T\n", r"returned shape \(8, 8\), expected a scalar"),
    ("def clip_loss(a, b, s, n=None, v=None):\n    return a @ b.T @ s\n",
     r"your code raised RuntimeError: .* \(clip_loss\.py line 2\)"),
    ("def clip_loss(a, b, s, n=None, v=None):\n    return None\n", r"returned NoneType, expected a tensor of a scalar"),
])
def test_bad_learner_files_give_one_clear_line(tmp_path, capsys, source, expected):
    (tmp_path / "clip_loss.py").write_text(source)
    code, out, err = run_cli(capsys, "check", "clip_loss", "--workspace", str(tmp_path))
    assert code == 1 and re.search(expected, out) and "Traceback" not in out + err


@pytest.mark.parametrize("argv,expected", [
    (["check", "clip_lose"], "error: unknown exercise 'clip_lose'; the exercises: clip_loss, "),
    (["check", "clip_loss", "--workspace", "/nonexistent/ws"], "error: no workspace /nonexistent/ws/: python "),
    (["check"], "error: name one exercise"),
    (["hint", "nope"], "error: unknown exercise 'nope'"),
    (["hint", "bpe", "7"], "error: bpe has hints 1 to 3, not 7"),
])
def test_bad_command_lines_give_one_line(capsys, argv, expected):
    code, _, _ = run_cli(capsys, *argv)
    assert isinstance(code, str) and code.startswith(expected) and "\n" not in code


def test_hint_shows_the_next_hint_each_call(tmp_path, capsys):
    ws = ["--workspace", str(tmp_path)]
    hints = EXERCISES["attention"].hints
    outs = [run_cli(capsys, "hint", "attention", *ws)[1] for _ in range(len(hints) + 1)]
    for n, out in enumerate(outs[:-1], 1):
        assert out.startswith(f"attention, hint {n} of {len(hints)}: ")
    assert outs[-1].startswith(f"all {len(hints)} hints of attention shown")
    assert run_cli(capsys, "hint", "attention", "2", *ws)[1].startswith("attention, hint 2 of")
    assert run_cli(capsys, "hint", "attention", *ws)[1].startswith("attention, hint 3 of")


# -----------------------------------------------------------------------------
# The open experiments: their train.py commands parse, their plots draw from the files a run writes


def experiment(name):
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", ROOT / "exercises" / "experiments" /
                                                  f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["batch_size", "hard_negatives"])
def test_experiment_help_and_commands_parse(name, capsys):
    from train import get_args
    module = experiment(name)
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    capsys.readouterr()
    module.main(["commands", "--out", "/tmp/x"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 3
    for line in lines:
        flags = [f.replace("''", "") for f in line.split()[2:]]
        args = get_args(flags)  # every flag is train.py's
        assert args.out.startswith("/tmp/x/") and args.max_steps > 0 and args.eval_every == 0


def fake_run(run_dir, batch, probe=None):
    run_dir.mkdir(parents=True)
    recall = {"R@1": 0.3 + batch / 1000, "R@5": 0.7, "R@10": 0.9}
    (run_dir / "results_val.json").write_text(json.dumps({"text_to_image": recall, "image_to_text": recall}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 4.0 / (s + 1), "lr": 1e-3,
                                                               "logit_scale": 14.3}) + "\n" for s in range(1, 6)))
    if probe is not None:
        (run_dir / "probe.json").write_text(json.dumps(probe))


def test_batch_size_plot_from_fake_runs(tmp_path, capsys):
    module = experiment("batch_size")
    for b in (16, 64):
        fake_run(tmp_path / f"b{b}", b)
    png = module.plot(tmp_path, [16, 32, 64])  # b32 not run yet: left out
    out = capsys.readouterr().out
    assert png.stat().st_size > 1000 and "   16" in out and "   64" in out and "   32" not in out


def test_hard_negatives_plot_from_fake_runs(tmp_path, capsys):
    module = experiment("hard_negatives")
    for i, v in enumerate(["plain", "negclip+loss"]):
        probe = {t: {"accuracy": 40.0 + 10 * i, "chance": 50.0, "n": 200} for t in module.TASKS}
        fake_run(tmp_path / v, 128, probe)
    png = module.plot(tmp_path, list(module.VARIANTS))
    out = capsys.readouterr().out
    assert png.stat().st_size > 1000 and "negclip+loss" in out and "shape-only" not in out
    with pytest.raises(SystemExit, match="no finished run"):
        module.plot(tmp_path / "empty", list(module.VARIANTS))
