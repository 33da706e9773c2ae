"""
Label prompts: the classes of one attribute as captions of their own ("a circle", "a square", ...), and which class
each training caption names, for losses.label_prompt_loss (UniCL: Yang et al. 2022, "Unified Contrastive Learning in
Image-Text-Label Space", https://arxiv.org/abs/2204.03610, section 3: image-label data joins image-text data by
turning each label into a prompt, so one loss learns from both).

Why a contrastive batch needs it: an image is told apart from the other captions of its batch by whatever is
cheapest, and in a random batch of Shapes scenes a red circle and a red hexagon of the same size in the same place
almost never meet, so "circle" versus "hexagon" is left unlearned (both towers keep the two nearly equal, and at that
point neither gets a gradient that separates them). A caption that names exactly one shape makes its image a
labelled example: every step it must pick its class among all C prompts, as in supervised classification, but the
class vectors are the text tower's own features of the prompts, so what is learned is what zero-shot
classification reads.

Which class a caption names is read from its tokens: each class's words (synthetic.py's tables, synonyms included,
"disc" for circle, "six-sided shape" for hexagon) are tokenized alone, and since CLIP's BPE encodes a word the same
inside a caption, a word is a run of token ids to look for. Captions naming no class, or two different ones, get
label -1 and are left out. On other datasets these words need not name what is drawn ("a town square", "a star
player"), so train.py turns the prompts on by default for the built-in Shapes data only.
"""
import torch

from synthetic import COLOUR_WORDS, SHAPE_WORDS, SIZE_WORDS
from tokenizer import tokenize

KINDS = {"shape": (SHAPE_WORDS, "a {}"), "colour": (COLOUR_WORDS, "a {} shape"), "size": (SIZE_WORDS, "a {} shape")}


def word_ids(text):
    """The BPE token ids of a word or phrase, without the start and end tokens: (n,)."""
    ids = tokenize([text], context_length=77)[0]
    return ids[1:int(ids.argmax())]  # EOT, the largest id, ends the text


class LabelPrompts:
    """The C classes of one attribute (KINDS) as prompt tokens (C, L), and the labels of a batch's captions."""

    def __init__(self, kind, context_length, weight=1.0, device="cpu"):
        table, template = KINDS[kind]
        self.kind, self.weight, self.names = kind, weight, list(table)
        self.tokens = tokenize([template.format(name) for name in table], context_length).to(device)  # (C, L)
        self.words = [(c, word_ids(word).to(device)) for c, words in enumerate(table.values()) for word in words]

    def __len__(self):
        return len(self.names)

    def labels(self, captions):
        """captions (B, L) -> (B,): the index of the one class each caption names, -1 where it names none or
        several different ones ("a red circle left of a blue star")."""
        named = torch.zeros(captions.shape[0], len(self), dtype=torch.bool, device=captions.device)  # (B, C)
        for c, ids in self.words:
            windows = captions.unfold(1, len(ids), 1)  # (B, L - n + 1, n): every run of n tokens
            named[:, c] |= (windows == ids).all(dim=-1).any(dim=-1)
        return torch.where(named.sum(dim=1) == 1, named.long().argmax(dim=1), -1)
