"""
Tests for tokenizer.py: ids must equal the reference open_clip tokenizer, id for id, on a large
varied corpus; plus truncation, error messages and decode. Run: python -m pytest -q tests/test_tokenizer.py
"""

import gzip
import random

import pytest
import torch

import tokenizer  # found through pytest.ini's `pythonpath = .`
from tokenizer import EOT_ID, SOT_ID, SimpleTokenizer, count_tokens, decode, tokenize

# ----------------------------------------------------------------------------------------------
# the corpus: a hand-written list plus seeded random mixes of tricky fragments

HAND_WRITTEN = [
    "", " ", "   ", "\t\n\r", "\xa0\u2003\u3000", "\u200b", "\ufeff",
    "a photo of a dog.", "A Photo Of A DOG!", "Two dogs play in the grass .",
    "It's a cat. They're here, we've won, I'm sure, you'll see, he'd go, don't", "IT'S HE'LL WE'D ’s",
    "'s 't 're 've 'm 'll 'd", "it'ſ a long s",  # IGNORECASE makes 's match 'ſ (which lower() keeps)
    "rock'n'roll o'clock", "'''", "a" * 300, "ha" * 100, "!!!!!!!!", "??!..",
    "0", "2024", "3.14159", "1,000,000 people", "-42°C at 10:30pm", "½ ¾ ² ³ ٣ ४ 〇 ⅷ",
    "café résumé naïve Zürich façade", "Ça va? ÉTÉ Ölçek İstanbul ß ẞ", "e\u0301 vs é",  # combining accent
    "😀 🐶🐱 👍🏽 👨‍👩‍👧 🇫🇷 ❤️", "一只猫坐在垫子上", "東京タワーの写真", "고양이 사진",
    "صورة قطة على الأريكة", "एक कुत्ते की तस्वीर", "Фотография собаки на пляже", "ελληνικά λέξη",
    "&amp; &#39; &lt;b&gt; &quot;hi&quot; &nbsp; &amp;amp; &#x27; &copy; &bogus;",
    "cafÃ© â€™ â€œquotedâ€\x9d Ã©tÃ© Ã¼ber", "The Mona Lisa painting&rsquo;s smile",
    "tab\there\nnew line\r\nwindows\x0bvt\x0cff\x1c\x1d\x1e\x1f\x85 nel", "\x00\x01\x07\x7f control",
    "https://example.com/a/b?c=1&d=2#frag", "mail me: someone@example.org", "#hashtag @user",
    "def f(x): return x**2 + 1  # code", "for (int i = 0; i < n; ++i) { a[i] = b[i]; }", "<div class='x'>hi</div>",
    "<|endoftext|>", "hi<|startoftext|>there<|endoftext|>", "</w> <unk> [CLS] [SEP] <s> </s>",
    "a man riding a wave on top of a surfboard ." * 12,  # a long Flickr/COCO-like caption
]

FRAGMENTS = [
    "a", "the", "photo", "dog", "Cat", "RUNNING", "isn't", "we'll", "'ſ", "THEY'RE", "o'neil", "x", "zebra-crossing",
    ".", ",", "!", "?", "...", ";", ":", "-", "—", "–", "(", ")", "[", "]", "{", "}", "\"", "'", "`", "’", "“", "”",
    "/", "\\", "|", "_", "*", "&", "%", "$", "€", "£", "¥", "@", "#", "+", "=", "~", "^", "<", ">", "§", "•", "…",
    "0", "7", "42", "1999", "3.5", "100%", "1st", "2nd", "4k", "v2.0", "٣", "४", "½", "Ⅻ",
    "é", "ñ", "ü", "ø", "ç", "Å", "İ", "ß", "ﬁ", "ǅ", "\u0301", "ё", "ё",
    "😀", "🐶", "👍🏽", "👨‍👩‍👧", "🇯🇵", "❤️", "™", "©", "★", "☺", "♪", "𝕏", "𝔸",
    "猫", "犬", "写真", "カメラ", "사진", "قطة", "कुत्ता", "собака", "Ελλάδα", "עברית", "ไทย",
    "&amp;", "&#39;", "&lt;", "&gt;", "&quot;", "&amp;amp;", "&#x1F600;", "&nbsp;",
    "cafÃ©", "â€™", "â€œ", "Ã¼", "Ã±", "Ãƒ",
    " ", "  ", "\t", "\n", "\r\n", "\xa0", "\u200b", "\u200d", "\u2028", "\u3000", "\ufeff", "\x1f", "\x85",
    "http://", "www.", ".com", "https://x.org/p?q=1&r=2", "user@mail.com", "def", "foo()", "x==y", "a->b", "i++",
    "<|endoftext|>", "<|startoftext|>", "</w>",
]
SEPARATORS = [" "] * 8 + ["", "  ", "\t", "\n", "\xa0", "\u200b"]


def random_text(rng):
    n = rng.choice([1, 2, 3, 5, 8, 13, 20, 40, 90])  # some mixes are far over 77 tokens
    parts = [rng.choice(FRAGMENTS) * rng.choice([1, 1, 1, 1, 2, 5]) for _ in range(n)]
    text = "".join(p + rng.choice(SEPARATORS) for p in parts)
    return text.upper() if rng.random() < 0.1 else text


def random_unicode(rng):
    # random code points from the BMP and beyond, minus surrogates (which are not valid UTF-8)
    points = [rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0x2FFF), rng.randrange(0x3000, 0xD7FF),
                          rng.randrange(0xE000, 0xFFFF), rng.randrange(0x10000, 0x1FAFF)]) for _ in range(rng.randrange(1, 30))]
    return "".join(map(chr, points))


def build_corpus():
    rng = random.Random(0)
    return HAND_WRITTEN + [random_text(rng) for _ in range(4000)] + [random_unicode(rng) for _ in range(1000)]


CORPUS = build_corpus()
CAPTION_WORDS = "a an the man woman dog cat two of on in with is are red blue small large playing sitting near " \
                "street water grass ball child people standing white black group riding bike beach".split()


def plain_captions(n, seed=0, max_words=25):
    rng = random.Random(seed)
    return [" ".join(rng.choice(CAPTION_WORDS) for _ in range(rng.randrange(1, max_words))) for _ in range(n)]


@pytest.fixture(scope="module")
def open_clip():
    return pytest.importorskip("open_clip")  # the test-only oracle; skip if it is not installed


def first_mismatch(ours, ref, texts):
    rows = (ours != ref).any(dim=1).nonzero().flatten().tolist()
    if not rows:
        return ""
    i = rows[0]
    return f"{len(rows)} of {len(texts)} rows differ; first: {texts[i]!r}\nours {ours[i].tolist()}\nref  {ref[i].tolist()}"

# ----------------------------------------------------------------------------------------------
# equality with the reference


def corpus_id(context_length):  # the corpus size shows in the test name, e.g. "[ctx77-5052texts]"
    return f"ctx{context_length}-{len(CORPUS) if context_length == 77 else len(CORPUS[::3])}texts"


@pytest.mark.parametrize("context_length", [77, 32, 16], ids=corpus_id)
def test_tokenize_matches_open_clip_on_corpus(open_clip, context_length):
    assert len(CORPUS) > 5000, f"corpus has {len(CORPUS)} strings"
    texts = CORPUS if context_length == 77 else CORPUS[::3]  # the short lengths on a third, for speed
    ours = tokenize(texts, context_length=context_length)
    ref = open_clip.tokenize(texts, context_length=context_length)
    assert ours.dtype == torch.long and ours.shape == (len(texts), context_length)
    assert torch.equal(ours, ref), first_mismatch(ours, ref, texts)
    # exactly one EOT per row, and it is the highest id, so argmax pooling finds it too
    assert ((ours == EOT_ID).sum(dim=1) == 1).all()
    assert torch.equal(ours.argmax(dim=1), (ours == EOT_ID).int().argmax(dim=1))


def test_encode_and_count_match_open_clip(open_clip):
    ref = open_clip.tokenizer.SimpleTokenizer()
    ours = SimpleTokenizer()
    for i, text in enumerate(CORPUS):
        ids = ours.encode(text)
        assert ids == ref.encode(text), f"encode differs on {text!r} (corpus of {len(CORPUS)})"
        assert i % 10 or count_tokens(text) == len(ids)
        assert ours.decode(ids) == ref.decode(ids).strip(), text  # ref leaves a trailing space


def test_vocabulary_matches_open_clip(open_clip):
    ref = open_clip.tokenizer.SimpleTokenizer().encoder
    ours = SimpleTokenizer().encoder
    assert len(ours) == len(ref) == 49408
    # same strings at the same ids, except the two specials, which open_clip spells differently
    assert {k: v for k, v in ours.items() if v < SOT_ID} == {k: v for k, v in ref.items() if v < SOT_ID}
    assert ours["<|startoftext|>"] == ref["<start_of_text>"] == SOT_ID
    assert ours["<|endoftext|>"] == ref["<end_of_text>"] == EOT_ID


def test_literal_special_text_is_plain_text(open_clip):
    # "<|endoftext|>" typed in a caption is BPE-encoded like any text, exactly as open_clip does.
    text = "what is this?<|endoftext|>"
    assert torch.equal(tokenize(text), open_clip.tokenize(text))
    # open_clip's own spelling "<end_of_text>" becomes a second EOT in open_clip; ours stays plain text
    # (a deliberate difference: a second EOT would make argmax pooling read the wrong position).
    text = "a <end_of_text> b"
    assert (open_clip.tokenize(text) == EOT_ID).sum() == 2
    assert (tokenize(text) == EOT_ID).sum() == 1
    assert decode(tokenize(text)[0]) == "a < end _ of _ text > b"

# ----------------------------------------------------------------------------------------------
# truncation and its errors


@pytest.mark.parametrize("context_length", [2, 3, 16, 77])
def test_truncation_keeps_one_eot_last(open_clip, context_length):
    texts = ["a dog " * 200, "x", "", "a photo " * (context_length // 2)]
    ours = tokenize(texts, context_length=context_length)
    assert torch.equal(ours, open_clip.tokenize(texts, context_length=context_length))
    assert ours[0, -1] == EOT_ID and ours[0, 0] == SOT_ID
    assert ((ours == EOT_ID).sum(dim=1) == 1).all()


def test_truncate_false_raises_clear_error():
    long_text = "a very long caption about a dog " * 20
    with pytest.raises(ValueError, match=r"'a very long caption.*\.\.\.' is 142 tokens long.*context_length=77"):
        tokenize(long_text, truncate=False)
    exact = "dog " * 75  # 75 content tokens + SOT + EOT fits exactly
    assert tokenize(exact, truncate=False)[0, -1] == EOT_ID


def test_count_tokens_tells_which_captions_are_truncated():
    assert count_tokens("a photo of a cat") == 5
    assert count_tokens("") == 0
    assert count_tokens("dog " * 76) == 76 > 77 - 2

# ----------------------------------------------------------------------------------------------
# decode


def test_decode_round_trips_plain_captions():
    captions = plain_captions(2000)
    rows = tokenize(captions)
    for caption, row in zip(captions, rows):
        assert decode(row) == caption  # a tensor row: SOT, EOT and padding are stripped
        assert decode(row.tolist()) == caption  # a list works too
    assert decode(SimpleTokenizer().encode("A  Dog,\nRunning")) == "a dog , running"  # cleaned + split


def test_decode_keeps_a_real_exclamation_mark():
    # id 0 is the padding id AND the real token "!" (inside a word); decode only strips trailing 0s
    row = tokenize("wow !\u200b")[0]
    assert 0 in row[1:4].tolist()
    assert decode(row) == "wow !\u200b"

# ----------------------------------------------------------------------------------------------
# the merges file


def use_merges_file(monkeypatch, tmp_path, content):
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setattr(tokenizer, "BPE_PATH", str(path))
    return path


def test_missing_merges_file(monkeypatch, tmp_path):
    path = use_merges_file(monkeypatch, tmp_path, None)
    with pytest.raises(FileNotFoundError, match="not found.*" + path.name):
        SimpleTokenizer()


@pytest.mark.parametrize("content", [
    b"version https://git-lfs.github.com/spec/v1\noid sha256:924691ac\nsize 1356917\n",
    b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
    b"",
], ids=["lfs-pointer", "html-page", "empty"])
def test_merges_file_that_is_not_gzip(monkeypatch, tmp_path, content):
    use_merges_file(monkeypatch, tmp_path, content)
    with pytest.raises(ValueError, match="bpe_simple_vocab_16e6.txt.gz is not a gzip file.*Git LFS pointer"):
        SimpleTokenizer()


def test_merges_file_with_wrong_checksum(monkeypatch, tmp_path):
    use_merges_file(monkeypatch, tmp_path, gzip.compress(b"#version: 0.2\ni n\nt h\n"))
    with pytest.raises(ValueError, match="has SHA-256 [0-9a-f]{64}, expected " + tokenizer.BPE_SHA256):
        SimpleTokenizer()


def test_shipped_merges_file_is_valid():
    assert len(tokenizer.read_merges(tokenizer.BPE_PATH)) == tokenizer.NUM_MERGES == 48894
