"""
Hard-negative captions, NegCLIP-style: the true caption with one thing changed, so that only shape, colour, size,
attribute binding or word order tells it apart from the truth.

Yuksekgonul et al., "When and why vision-language models behave like bags-of-words, and what to do about it?"
(ICLR 2023, https://arxiv.org/abs/2210.01936), section 5: in a random batch almost every caption can be told apart
by its bag of words alone, so contrastive training never needs word order or binding ("a red circle left of a blue
star" and "a blue circle left of a red star" have the same words). NegCLIP adds, for each image, captions with
their words swapped as extra negatives of the image->text loss (losses.clip_loss); losses.hard_negative_loss also
ranks each image's caption above its own negatives alone (SVLC, Doveh et al. 2023). Their swaps come from a parser;
the built-in Shapes captions use a known vocabulary (synthetic.py's word tables), so here each change is exact:

    shape     one shape word replaced by another shape's  "a red circle ..."          -> "a red star ..."
    colour    one colour word replaced by another's       "a red circle ..."          -> "a green circle ..."
    size      small <-> large                             "a small red circle ..."    -> "a large red circle ..."
    binding   the two objects' colours swapped            "a red circle and a blue star"
                                                             -> "a blue circle and a red star"
    order     the two objects swapped (where the caption  "a red circle left of a blue star"
              says where they are)                           -> "a blue star left of a red circle"
    place     where words changed: left <-> right,        "a red circle above a blue star" -> "... below ..."
              above <-> below, or a single object moved

Which new word a shape or colour change uses is uniform by default; with train.py --mine-every N it is drawn, every N
steps afresh, by how alike the model's text features of the words are (confusable(): hard-negative mining, Robinson
et al. 2021, "Contrastive Learning with Hard Negative Samples", https://arxiv.org/abs/2010.04592), so the pairs the
model confuses (circle and hexagon) come up most.

Captions of other datasets (train.py --data: Flickr, COCO, your own) get the changes their words allow: "a man in a
red shirt to the left of a small dog" -> "... to the right of ..." or "... a large dog"; a caption with none of these
words gets no hard negative (its rows stay empty and are masked out of the loss).
"""
import re
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from tokenizer import tokenize
from synthetic import COLOUR_WORDS, POSITION_WORDS, RELATION_WORDS, SHAPE_WORDS, SIZE_WORDS

KINDS = ("shape", "colour", "size", "binding", "order", "place")
_TABLES = {"shape": SHAPE_WORDS, "colour": COLOUR_WORDS, "size": SIZE_WORDS, "position": POSITION_WORDS}
# the spatial words and their opposites; "under"/"below" and the position phrases map to a word of the other side
_OPPOSITE = {"to the left of": "to the right of", "left of": "right of", "above": "below", "under": "above",
             "to the right of": "to the left of", "right of": "left of", "below": "above"}
for _side, _other in (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top")):
    for _i, _phrase in enumerate(POSITION_WORDS[_side]):
        _OPPOSITE[_phrase] = POSITION_WORDS[_other][min(_i, len(POSITION_WORDS[_other]) - 1)]
assert all(w in _OPPOSITE for rel, rev, _ in RELATION_WORDS.values() for w in rel + rev), "a relation word is missing"

_WORD_OF = {w: (kind, value) for kind, table in _TABLES.items() for value, words in table.items() for w in words}
_SPAN = re.compile(r"\b(" + "|".join(sorted(map(re.escape, list(_WORD_OF) + list(_OPPOSITE)), key=len, reverse=True))
                   + r")\b", re.IGNORECASE)


@lru_cache(maxsize=2 ** 16)  # each caption is asked for several kinds of negative, epoch after epoch
def spans(caption):
    """The attribute words of a caption in order: ((start, end, kind, value), ...), kind in shape/colour/size/position
    /relation (a relation's value is its own phrase). Longest phrases win ("to the left of" over "to the left")."""
    found = []
    for m in _SPAN.finditer(caption):
        word = m.group(0).lower()
        kind, value = _WORD_OF.get(word, ("relation", word))
        found.append((m.start(), m.end(), kind, value))
    return tuple(found)


def _replace(caption, edits):
    """Apply {(start, end): new text}, then fix the articles the new words need ("a orange" -> "an orange")."""
    for (start, end), text in sorted(edits.items(), reverse=True):
        caption = caption[:start] + text + caption[end:]
    return re.sub(r"\b([Aa])n? (?=(\w))", lambda m: m.group(1) + ("n " if m.group(2) in "aeiouAEIOU" else " "),
                  caption)


def _other_word(table, value, rng, odds=None):
    """A word for a different value of the same attribute (any of its synonyms). odds: None (every other value
    equally likely) or a (V, V) array whose row i gives the chance of each value replacing value i (confusable())."""
    values = list(table)
    if odds is None:
        other = [v for v in values if v != value]
        return str(rng.choice(table[str(rng.choice(other))]))
    row = np.asarray(odds[values.index(value)], dtype=np.float64)
    return str(rng.choice(table[values[rng.choice(len(values), p=row / row.sum())]]))


def confusable(features, temperature=0.05, uniform=0.5):
    """Which value to put in a hard negative: the model's own confusions (hard-negative mining, as in Robinson et
    al. 2021, "Contrastive Learning with Hard Negative Samples"). features (V, D): L2-normalised text features of one
    phrase per value ("a circle", "a square", ...). Returns (V, V) odds: row i mixes `uniform` of the uniform choice
    among the other values with a softmax of their cosines to value i at `temperature`, so the values the model
    cannot yet tell apart are drawn most often and every value still comes up."""
    V = features.shape[0]
    cos = (features @ features.T).double()  # (V, V)
    cos.fill_diagonal_(float("-inf"))  # never the value itself
    hard = torch.softmax(cos / temperature, dim=1)  # (V, V)
    even = (1 - torch.eye(V, dtype=torch.float64)) / (V - 1)  # (V, V)
    return (uniform * even + (1 - uniform) * hard).numpy()


def even_odds(kinds):
    """{kind: (V, V) odds with every other value equally likely} for the kinds among `kinds` whose replacement word
    can be mined (shape, colour). The tensors are in shared memory, so DataLoader workers see what train.py copies in."""
    return {k: (1 - torch.eye(len(_TABLES[k]))).share_memory_()
            for k in ("shape", "colour") if k in kinds}


@torch.no_grad()
def mined_odds(model, kinds, ctx):
    """{kind: (V, V) odds} from confusable() on the model's text features of "a {word}", one word per value."""
    odds = {}
    for kind in kinds:
        phrases = [f"a {words[0]}" for words in _TABLES[kind].values()]
        tokens = tokenize(phrases, model.config.text.context_length).to(next(model.parameters()).device)  # (V, L)
        with ctx:
            features = F.normalize(model.encode_text(tokens).float(), dim=-1).cpu()  # (V, D)
        odds[kind] = torch.from_numpy(confusable(features))
    return odds


def hard_negative(caption, kind, rng, odds=None):
    """The caption changed in one way (KINDS), or None where that change does not apply (no such words, or the
    swap would leave the meaning unchanged: two equal colours swapped, or two objects said to be 'side by side').
    odds: {kind: (V, V) array} from confusable() for the word-replacing kinds; a kind not in it is drawn uniformly."""
    found = spans(caption)
    of = {k: [s for s in found if s[2] == k] for k in ("shape", "colour", "size", "position", "relation")}
    if kind in ("shape", "colour", "size"):
        if not of[kind]:
            return None
        start, end, _, value = of[kind][rng.integers(len(of[kind]))]
        return _replace(caption, {(start, end): _other_word(_TABLES[kind], value, rng, (odds or {}).get(kind))})
    if kind == "binding" or kind == "order":
        swap = ("colour",) if kind == "binding" else ("colour", "shape", "size")
        if kind == "order" and not (of["relation"] or of["position"]):
            return None  # "a red circle and a blue star": swapping the objects says the same
        edits = {}
        for k in swap:
            if len(of[k]) == 2 and of[k][0][3] != of[k][1][3]:
                (s0, e0, _, _), (s1, e1, _, _) = of[k]
                edits[(s0, e0)], edits[(s1, e1)] = caption[s1:e1], caption[s0:e0]
        return _replace(caption, edits) if edits else None
    if kind == "place":
        where = of["relation"] + of["position"]
        if not where:
            return None
        if of["position"] and not of["relation"] and len(of["position"]) == 1:  # one object: move it elsewhere
            start, end, _, value = of["position"][0]
            new = _other_word(POSITION_WORDS, value, rng)
            return _replace(caption, {(start, end): _match_case(caption[start:end], new)})
        return _replace(caption, {(s, e): _match_case(caption[s:e], _OPPOSITE[caption[s:e].lower()])
                                  for s, e, _, _ in where if caption[s:e].lower() in _OPPOSITE})
    raise ValueError(f"unknown hard-negative kind {kind!r}; choose from {KINDS}")


def _match_case(old, new):
    return new[0].upper() + new[1:] if old[0].isupper() else new


def sample_negatives(caption, k, rng, kinds=KINDS, odds=None):
    """k hard negatives of a caption, each of a different kind drawn at random among those that apply (fewer when
    fewer apply). A negative equal to the caption (a change that left it as it was) is never returned."""
    out = []
    for kind in rng.permutation(list(kinds)):
        negative = hard_negative(caption, str(kind), rng, odds)
        if negative is not None and negative != caption and negative not in out:
            out.append(negative)
        if len(out) == k:
            break
    return out
