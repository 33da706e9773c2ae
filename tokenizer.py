"""
CLIP's text tokenizer: byte-level BPE, id-for-id equal to open_clip's and OpenAI's (see PAT below
for the one deliberate difference: special-token text typed inside a caption).

References:
  - CLIP paper, Radford et al. 2021, Sec. 2.4: https://arxiv.org/abs/2103.00020
    ("lower-cased byte pair encoding (BPE) with a 49,152 vocab size ... [SOS] and [EOS] tokens")
  - openai/CLIP clip/simple_tokenizer.py: https://github.com/openai/CLIP/blob/main/clip/simple_tokenizer.py
  - BPE for subwords, Sennrich et al. 2016: https://arxiv.org/abs/1508.07909
  - byte-level BPE as in GPT-2 / minGPT bpe.py: https://github.com/karpathy/minGPT/blob/master/mingpt/bpe.py

Pipeline for one caption:
  1. clean:     ftfy.fix_text, html.unescape twice, collapse whitespace, lowercase
  2. split:     a regex cuts the text into words, single digits and punctuation runs
  3. bytes:     each word's UTF-8 bytes become printable unicode characters (bytes_to_unicode)
  4. BPE:       adjacent symbols are merged, lowest-rank merge first; the last symbol carries '</w>'
  5. ids:       each final symbol is looked up in the 49,408-entry vocabulary
  6. tokenize:  [SOT] + ids + [EOT], zero-padded (or truncated) to context_length
"""

import gzip
import hashlib
import html
import os
from functools import lru_cache

import ftfy
import regex as re  # `regex`, not `re`: we need the \p{L} (letter) and \p{N} (number) classes
import torch

BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 49152 - 256 - 2  # 48,894 merges (the paper's 49,152 = 256 bytes + merges + 2 specials)
SOT_ID = 49406  # <|startoftext|>
EOT_ID = 49407  # <|endoftext|>; the text tower pools at this position (the highest id in a row)
# Padding uses id 0, which is NOT a reserved id: it is the real token "!" (the byte '!' inside a word).
# Only the EOT position is ever pooled, so padding is harmless there; decode() strips it.

# Words are English contractions, letter runs, single digits ("2024" is 4 tokens) or runs of other
# non-space characters. There are no special-token alternatives: SOT/EOT are only inserted as ids, so
# "<|endoftext|>" typed in a caption is plain text (as in open_clip; openai/CLIP would emit 49407, and
# open_clip turns its own spelling "<end_of_text>" into a second EOT). So a row has exactly one EOT.
PAT = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", re.IGNORECASE)


@lru_cache()
def bytes_to_unicode():
    """
    Map every byte 0..255 to a printable unicode character, so BPE can work on strings.

    BPE works on strings of symbols, but we want it to handle any UTF-8 input, so we start from the
    256 possible byte values. Most bytes already look fine as characters (b'a' -> 'a', b'!' -> '!',
    0xE9 -> 'é'), and those 188 keep their own code point. The rest are whitespace or control bytes
    that would be invisible or that the merges file cannot hold (a space separates the two halves of
    a merge), so they are shifted to chr(256 + n) in order: 0x00 -> 'Ā', ..., 0x20 (space) -> 'Ġ'.
    Example: "€" is the bytes E2 82 AC, which become the three symbols 'â', 'Ĥ', '¬'.
    """
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]  # the order matters: it fixes ids 0..255 ("!" = 0, ..., then the shifted bytes)
    n = 0
    for b in range(256):
        if b not in bs:  # an "ugly" byte: give it the next unused code point above 255
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def get_pairs(word):
    """Set of adjacent symbol pairs in a word, e.g. ('c','a','t</w>') -> {('c','a'), ('a','t</w>')}."""
    return set(zip(word[:-1], word[1:]))


def clean(text):
    # printable ASCII without "&" is what every training caption is, and neither step below can change it (ftfy
    # repairs non-ASCII text and control characters, html.unescape entities): skip them, ftfy is slow
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = ftfy.fix_text(text)  # repair mojibake ("cafÃ©" -> "café") and normalise unicode
        text = html.unescape(html.unescape(text))  # twice, for doubly escaped "&amp;amp;"
    return " ".join(text.split()).lower()  # str.split() collapses every unicode whitespace run (and strips)


def read_merges(path):
    """Read and verify the merges file; raise a clear error if it is missing or not the real file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"BPE merges file not found: {path}. Copy bpe_simple_vocab_16e6.txt.gz "
                                "from openai/CLIP (clip/) or open_clip into the folder of tokenizer.py.")
    with open(path, "rb") as f:
        data = f.read()
    fix = "Get the real file again (`git lfs pull`, or copy it from an installed open_clip package)."
    if data[:2] != b"\x1f\x8b":  # the gzip magic number; Git LFS pointers and HTML pages lack it
        raise ValueError(f"{path} is not a gzip file (it starts with {data[:40]!r}); it is probably "
                         f"a Git LFS pointer or a saved web page. {fix}")
    if (sha := hashlib.sha256(data).hexdigest()) != BPE_SHA256:
        raise ValueError(f"{path} has SHA-256 {sha}, expected {BPE_SHA256}: corrupt or another vocabulary. {fix}")
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]  # line 0 is a "#version" header


class SimpleTokenizer:
    def __init__(self, bpe_path=None):
        merges = read_merges(bpe_path or BPE_PATH)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        # vocabulary: 256 bytes, 256 bytes ending a word, one entry per merge, 2 specials = 49,408
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        assert self.encoder["<|startoftext|>"] == SOT_ID and self.encoder["<|endoftext|>"] == EOT_ID
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}  # lower rank = learned earlier = merged first
        self.cache = {}  # word -> list of ids; captions repeat words a lot, so this is most of the speed

    def bpe(self, word):
        """Merge the symbols of one (byte-encoded) word; return its list of vocabulary strings."""
        symbols = tuple(word[:-1]) + (word[-1] + "</w>",)  # '</w>' marks the end of a word
        while len(symbols) > 1:
            # the adjacent pair that was learned first; stop when no pair is a known merge
            pair = min(get_pairs(symbols), key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if pair not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # replace every occurrence of the pair, left to right
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = tuple(merged)
        return symbols

    def encode(self, text):
        """Text -> list of BPE ids, without SOT/EOT."""
        ids = []
        for word in PAT.findall(clean(text)):
            if word not in self.cache:
                chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                self.cache[word] = [self.encoder[s] for s in self.bpe(chars)]
            ids.extend(self.cache[word])
        return ids

    def decode(self, ids):
        """Ids -> text. Drops SOT, everything from the first EOT on, and trailing padding zeros."""
        ids = [int(i) for i in ids]
        if EOT_ID in ids:
            ids = ids[:ids.index(EOT_ID)]
        while ids and ids[-1] == 0:  # safe: a word always ends with a '</w>' id (>= 256), never with 0
            ids.pop()
        text = "".join(self.decoder[i] for i in ids if i != SOT_ID)
        text = bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()  # '<', '/', 'w', '>' are plain bytes, so this is safe


@lru_cache()
def default_tokenizer():
    """The shared tokenizer, built on first use, so importing this file does not read the merges."""
    return SimpleTokenizer()


def tokenize(texts, context_length=77, truncate=True):
    """str or list of str -> LongTensor (N, context_length) of [SOT] + ids + [EOT] + zero padding.
    Over-long text keeps its first context_length - 2 ids, so EOT is always the last token."""
    if isinstance(texts, str):
        texts = [texts]
    assert context_length >= 2, "context_length must leave room for SOT and EOT"
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = default_tokenizer().encode(text)
        if len(ids) > context_length - 2:
            if not truncate:
                short = text if len(text) <= 60 else text[:57] + "..."
                raise ValueError(f"Text {short!r} is {len(ids) + 2} tokens long (with SOT/EOT), more than "
                                 f"context_length={context_length}; pass truncate=True to cut it.")
            ids = ids[:context_length - 2]  # keep room for EOT: pooling reads the EOT position
        tokens = [SOT_ID] + ids + [EOT_ID]
        result[row, :len(tokens)] = torch.tensor(tokens)
    return result


def decode(ids):
    """One row of ids (list or 1-D tensor) -> text."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return default_tokenizer().decode(ids)


def count_tokens(text):
    """Number of content tokens (no SOT/EOT); a caption is truncated when this exceeds context_length - 2."""
    return len(default_tokenizer().encode(text))
