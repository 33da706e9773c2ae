"""
MiniCLIP's CLIP with a convolutional stem, for Hugging Face transformers. export.py copies this file into an exported
folder; load it with transformers.AutoModel.from_pretrained(FOLDER, trust_remote_code=True). It is transformers'
CLIPModel with one change, as in this project's model.py: the patch convolution runs after early convolutions
(3x3 stride-2 convolutions with BatchNorm and ReLU; Xiao et al. 2021, "Early Convolutions Help Transformers See
Better", https://arxiv.org/abs/2106.14881). This file is read by transformers only; MiniCLIP itself never imports it.
"""
from torch import nn
from transformers import CLIPConfig, CLIPModel


class MiniCLIPConfig(CLIPConfig):
    model_type = "miniclip"  # vision_config.stem_channels: the stem's channels, e.g. [32, 64, 128]


class StemPatchEmbedding(nn.Conv2d):
    """The patch convolution (its weight keeps CLIPModel's key, patch_embedding.weight), after the stem (model.py
    conv_stem): each stem convolution halves the image, so the patch convolution covers what is left of a patch."""

    def __init__(self, channels, width, patch_size):
        p = patch_size // 2 ** len(channels)
        super().__init__(channels[-1], width, kernel_size=p, stride=p, bias=False)
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.stem = nn.Sequential(*layers)

    def forward(self, x):
        return super().forward(self.stem(x))


class MiniCLIPModel(CLIPModel):
    config_class = MiniCLIPConfig

    def __init__(self, config):
        super().__init__(config)
        v = config.vision_config
        self.vision_model.embeddings.patch_embedding = StemPatchEmbedding(v.stem_channels, v.hidden_size, v.patch_size)
        self.post_init()
