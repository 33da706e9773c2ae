"""
Exercise clip_adapter: CLIP-Adapter's small bottleneck MLP, blended with the frozen feature it adapts.

Read: CLIP-Adapter (Gao et al. 2021, https://arxiv.org/abs/2110.04544), section 3.2; the released
code, gaopengcuhk/CLIP-Adapter clip_adapter.py (https://github.com/gaopengcuhk/CLIP-Adapter).

    python exercises.py check clip_adapter
    python exercises.py hint clip_adapter

You will need: import torch; import torch.nn.functional as F.
"""


def clip_adapter(self, x):
    """The forward pass of adapters.CLIPAdapter: x' = ratio * A(x) + (1 - ratio) * x.

    self is an adapters.CLIPAdapter with
        self.fc[0].weight (dim // reduction, dim), self.fc[2].weight (dim, dim // reduction): two linear layers
            without bias, each followed by a ReLU: A(x) = ReLU(W2 ReLU(W1 x))
        self.ratio: the residual ratio (alpha in the paper), e.g. 0.2
    x: (N, dim) features (image or text) of the frozen CLIP.
    Returns (N, dim). Write A(x) from the two weights (F.linear, F.relu).
    """
    # YOUR CODE HERE (about 3 lines)
    raise NotImplementedError("clip_adapter: write the adapter")
