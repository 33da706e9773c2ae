"""Test-only helpers: reference models (open_clip, Hugging Face transformers) with random weights, saved in
every checkpoint layout that checkpoints.load_checkpoint reads. The reference implementations are imported here
only; project code never imports them."""
import json
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def json_config(name):
    return json.loads((ROOT / "model_configs" / f"{name}.json").read_text())


def perturb_(model, seed):
    """Random weights everywhere: LayerNorm gains/biases and attention biases are ones/zeros at init, which
    would hide a swapped or missing key."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(3.9)
            else:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def openclip_model(cfg, seed=0):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    model = CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"]),
                 quick_gelu=cfg.get("quick_gelu", False))
    return perturb_(model, seed)


def save_tinyclip(model, path, style="ddp"):
    """The TinyCLIP release layout: {'state_dict': ...} whose towers are wrapped separately."""
    out = {}
    for k, v in model.state_dict().items():
        if style == "ddp":  # _image_encoder.module.visual.*, _text_encoder.module.*, _logit_scale.module.logit_scale
            k = ("_logit_scale.module." if k == "logit_scale" else
                 "_image_encoder.module." if k.startswith("visual.") else "_text_encoder.module.") + k
        else:  # the second observed spelling, with a leading DDP "module."
            k = "module." + ("_logit_scale.logit_scale" if k == "logit_scale" else
                             "image_encoder_without_ddp." + k if k.startswith("visual.") else "text_encoder_without_ddp." + k)
        out[k] = v.clone()
    torch.save({"state_dict": out, "epoch": 1, "name": "random"}, path)


def save_flat(model, path, prefix=""):
    torch.save({prefix + k: v.clone() for k, v in model.state_dict().items()}, path)


class _Archive(torch.nn.Module):
    """Holds an open_clip model's parameters under OpenAI's names plus OpenAI's three extra entries."""

    def __init__(self, model, image_size, context_length, vocab_size):
        super().__init__()
        for name, child in model.named_children():
            setattr(self, name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, value in (("input_resolution", image_size), ("context_length", context_length), ("vocab_size", vocab_size)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, images):
        return self.visual(images)


def save_torchscript(model, path, image_size, context_length, vocab_size):
    """An OpenAI-style TorchScript archive (the released OpenAI .pt files are traced modules)."""
    archive = _Archive(model, image_size, context_length, vocab_size)
    with warnings.catch_warnings():  # tracing is deprecated and warns about Python branches; the archive is only read
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(archive, torch.randn(1, 3, image_size, image_size), check_trace=False)
    traced.save(str(path))


def hf_model(cfg, openclip_sd):
    """A transformers CLIPModel with the same weights as an open_clip model (OpenAI -> HF key map written
    independently of model.py, following transformers' convert_clip_original_pytorch_to_hf.py)."""
    from transformers import CLIPConfig, CLIPModel
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    hf_cfg = CLIPConfig(
        projection_dim=cfg["embed_dim"],
        text_config=dict(vocab_size=t["vocab_size"], hidden_size=t["width"], intermediate_size=4 * t["width"],
                         num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                         max_position_embeddings=t["context_length"], hidden_act=act,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
        vision_config=dict(hidden_size=v["width"], intermediate_size=4 * v["width"], num_hidden_layers=v["layers"],
                           num_attention_heads=v["width"] // 64, image_size=v["image_size"],
                           patch_size=v["patch_size"], hidden_act=act))
    model = CLIPModel(hf_cfg).eval()
    sd = {}
    for k, w in openclip_sd.items():
        for tower, hf_tower in (("visual.transformer.resblocks.", "vision_model.encoder.layers."),
                                ("transformer.resblocks.", "text_model.encoder.layers.")):
            if k.startswith(tower):
                i, rest = k[len(tower):].split(".", 1)
                base = f"{hf_tower}{i}."
                if rest.startswith("attn.in_proj_"):
                    kind = rest.rsplit("_", 1)[1]
                    for name, part in zip("qkv", w.chunk(3)):
                        sd[f"{base}self_attn.{name}_proj.{kind}"] = part
                else:
                    rest = (rest.replace("ln_1", "layer_norm1").replace("ln_2", "layer_norm2")
                            .replace("mlp.c_fc", "mlp.fc1").replace("mlp.c_proj", "mlp.fc2").replace("attn.", "self_attn."))
                    sd[base + rest] = w
                break
        else:
            direct = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
                      "visual.class_embedding": "vision_model.embeddings.class_embedding",
                      "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
                      "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
                      "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
                      "visual.ln_post.weight": "vision_model.post_layernorm.weight",
                      "visual.ln_post.bias": "vision_model.post_layernorm.bias",
                      "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                      "positional_embedding": "text_model.embeddings.position_embedding.weight",
                      "ln_final.weight": "text_model.final_layer_norm.weight",
                      "ln_final.bias": "text_model.final_layer_norm.bias",
                      "logit_scale": "logit_scale"}
            if k == "visual.proj":
                sd["visual_projection.weight"] = w.t()
            elif k == "text_projection":
                sd["text_projection.weight"] = w.t()
            else:
                sd[direct[k]] = w
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(m.endswith("position_ids") for m in missing), (missing, unexpected)
    return model


def hf_features(model, images, tokens):
    """get_image_features / get_text_features; newer transformers may return an output object."""
    with torch.no_grad():
        img, txt = model.get_image_features(pixel_values=images), model.get_text_features(input_ids=tokens)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    return img, txt
