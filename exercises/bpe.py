"""
Exercise bpe: the merge loop of CLIP's byte-level BPE tokenizer.

Read: Sennrich et al. 2016, https://arxiv.org/abs/1508.07909, section 3.2 (the algorithm); GPT-2 (Radford et al.
2019, "Language Models are Unsupervised Multitask Learners"), section 2.2 (BPE on bytes); openai/CLIP
clip/simple_tokenizer.py, bpe (https://github.com/openai/CLIP); Karpathy's minbpe exercise.md
(https://github.com/karpathy/minbpe). This project's tokenizer.py explains the byte-to-character table.

    python exercises.py check bpe
    python exercises.py hint bpe

You will need: from tokenizer import get_pairs (get_pairs(('c', 'a', 't</w>')) == {('c', 'a'), ('a', 't</w>')}).
"""


def bpe(self, word):
    """Merge the symbols of one word; return the tuple of final symbols (vocabulary strings).

    self is a tokenizer.SimpleTokenizer; self.bpe_ranks maps a pair of symbols, e.g. ('t', 'h'), to its rank: the
    order in which the merges were learned, lower = earlier = merged first.
    word: one word whose UTF-8 bytes are already printable characters (bytes_to_unicode), e.g. 'banana'.
    The last symbol carries the end-of-word mark '</w>'. For example bpe(tok, 'photograph') == ('photograph</w>',)
    and an unknown word stays in smaller pieces.
    """
    # YOUR CODE HERE (about 15 lines)
    raise NotImplementedError("bpe: write the merge loop")
