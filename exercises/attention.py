"""
Exercise attention: multi-head self-attention, with the causal mask the text tower uses.

Read: Vaswani et al. 2017, "Attention Is All You Need", https://arxiv.org/abs/1706.03762, sections 3.2.1-3.2.2;
CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020), section 2.4 ("masked self-attention was used in the
text encoder"); nanoGPT model.py, CausalSelfAttention (https://github.com/karpathy/nanoGPT).

    python exercises.py check attention
    python exercises.py hint attention

You will need: import math; import torch; import torch.nn.functional as F.
"""


def attention(self, x, causal=False):
    """The forward pass of model.Attention, written out: softmax(q k^T / sqrt(hd)) v for each head.

    self is a model.Attention with
        self.in_proj_weight (3D, D), self.in_proj_bias (3D,): q, k and v stacked, in that order
        self.heads: the number of heads; each head has hd = D // heads dimensions
        self.out_proj: an nn.Linear(D, D) applied to the heads' outputs side by side
    x: (B, L, D), L tokens of width D. causal=True: token i may attend to tokens 0..i only (the text tower).
    Returns (B, L, D).

    Write the attention yourself: calling F.scaled_dot_product_attention fails the check.
    """
    # YOUR CODE HERE (about 10 lines)
    raise NotImplementedError("attention: write multi-head self-attention")
