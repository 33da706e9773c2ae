"""
Export a CLIP trained here (or any checkpoint load_checkpoint reads) to the files other tools read:

    python export.py out/shapes/last.pt --to safetensors exported/miniclip.safetensors   # any model, loads back here
    python export.py CKPT --to hf exported/miniclip-hf            # transformers: CLIPModel.from_pretrained(DIR)
    python export.py CKPT --to open_clip exported/miniclip.pt     # + exported/miniclip.json, open_clip's model config

Each conversion is checkpoints.py's reader of that layout run backwards: Hugging Face's key names by the same
HF_TO_OPENAI list, q/k/v split out of the fused in_proj, the projections transposed to nn.Linear's (out, in), and a
config.json written from our config (transformers' modeling_clip.py, CLIPConfig); open_clip's keys are ours (the
OpenAI layout), with its model-config JSON (open_clip factory.py). The Hugging Face folder also holds CLIP's
tokenizer (vocab.json and merges.txt, built from the same BPE merges as tokenizer.py, for CLIPTokenizer) and its
image preprocessing (preprocessor_config.json, for CLIPImageProcessor).

A CLIP ViT starts with one patch convolution. The default MiniCLIP-S starts with a convolutional stem (its
stem_channels): for it the Hugging Face folder also holds modeling_miniclip.py (from hf_code/), CLIPModel with the stem
added, which transformers runs with AutoModel.from_pretrained(FOLDER, trust_remote_code=True); open_clip has no such
mechanism, so --to open_clip refuses it with a message, as --to hf refuses SigLIP's logit bias (CLIPModel has none).
--to safetensors writes every model; load_checkpoint reads every exported file back.
"""
import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

import torch

from checkpoints import CheckpointError, HF_TO_OPENAI, load_checkpoint, SAFETENSORS_DTYPES
from tokenizer import BPE_PATH, EOT_ID, read_merges, SimpleTokenizer, SOT_ID
from transform import OPENAI_MEAN, OPENAI_STD

FORMATS = ("hf", "open_clip", "safetensors")
# For a model with a conv stem: the modeling file transformers runs in the exported folder. A template, not project
# code (MiniCLIP never imports transformers): it is copied as modeling_miniclip.py.
REMOTE_CODE = Path(__file__).resolve().parent / "hf_code" / "modeling_miniclip.py.in"
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}  # the reader's table, inverted


# -----------------------------------------------------------------------------
# safetensors (https://github.com/huggingface/safetensors): 8 bytes of header length, a JSON header, the raw bytes


def save_safetensors(tensors, path, metadata=None):
    """tensors {name: tensor} -> a .safetensors file (little-endian, C order), metadata {str: str} in the header's
    "__metadata__"; checkpoints.read_safetensors reads it, and so does the safetensors package."""
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()  # x86/ARM: little-endian
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data start 8-byte aligned, as the format recommends
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for data in blobs:
            f.write(data)


# -----------------------------------------------------------------------------
# Hugging Face transformers: a CLIPModel folder


def hf_state_dict(sd):
    """Our (OpenAI-layout) state dict -> transformers' CLIPModel keys: checkpoints.convert_state_dict(sd, 'hf') run
    backwards."""
    out = {}
    for k, v in sd.items():
        if k in ("visual.proj", "text_projection"):  # ours (in, out); nn.Linear stores (out, in)
            out["visual_projection.weight" if k == "visual.proj" else "text_projection.weight"] = v.t()
            continue
        for hf, ours in HF_TO_OPENAI:
            k = k.replace(ours, hf)
        if ".attn.in_proj_" in k:  # one fused (3 * width, ...) in_proj: the rows are q, k, v
            kind = k.rsplit("_", 1)[1]  # weight or bias
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3)):
                out[k.replace(f"attn.in_proj_{kind}", f"self_attn.{name}.{kind}")] = part
        else:
            out[k] = v
    return {k: v.contiguous() for k, v in out.items()}


def to_hf_config(config):
    """Our CLIPConfig -> the config.json of transformers' CLIPModel (checkpoints.hf_config reads it back). The MLP
    widths are model.py's (and open_clip's) int(width * mlp_ratio)."""
    v, t, act = config.vision, config.text, "quick_gelu" if config.quick_gelu else "gelu"
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": config.embed_dim,
        "logit_scale_init_value": config.init_logit_scale, "torch_dtype": "float32",
        "vision_config": {"hidden_size": v.width, "intermediate_size": int(v.width * v.mlp_ratio),
                          "num_hidden_layers": v.layers, "num_attention_heads": v.width // v.head_width,
                          "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": 3,
                          "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": config.embed_dim},
        # eos_token_id 49407: transformers pools the text at the first EOT, as eot_pool does (the highest id)
        "text_config": {"vocab_size": t.vocab_size, "hidden_size": t.width,
                        "intermediate_size": int(t.width * t.mlp_ratio), "num_hidden_layers": t.layers,
                        "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
                        "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": config.embed_dim,
                        "bos_token_id": SOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID},
    }


def write_hf_tokenizer(out, context_length):
    """CLIP's BPE as CLIPTokenizer reads it: vocab.json (token -> id: tokenizer.SimpleTokenizer's own vocabulary)
    and merges.txt (a "#version" line, then one merge per line), plus the special tokens."""
    merges = read_merges(BPE_PATH)
    vocab = SimpleTokenizer().encoder
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "do_lower_case": True, **specials},
        indent=2))


def export_hf(model, out):
    """A folder transformers.CLIPModel.from_pretrained and CLIPProcessor.from_pretrained read."""
    check_exportable(model, "hf")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = to_hf_config(model.config)
    if model.config.vision.stem_channels:  # CLIPModel has no conv stem: hf_code's small subclass adds it
        shutil.copy(REMOTE_CODE, out / "modeling_miniclip.py")
        model_class = "modeling_miniclip.MiniCLIPModel"  # also what the zero-shot-image-classification pipeline uses
        config |= {"model_type": "miniclip", "architectures": ["MiniCLIPModel"], "auto_map": {
            "AutoConfig": "modeling_miniclip.MiniCLIPConfig", "AutoModel": model_class,
            "AutoModelForZeroShotImageClassification": model_class}}
        config["vision_config"]["stem_channels"] = model.config.vision.stem_channels
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_safetensors(hf_state_dict(model.state_dict()), out / "model.safetensors", {"format": "pt"})
    write_hf_tokenizer(out, model.config.text.context_length)
    size = model.config.vision.image_size
    (out / "preprocessor_config.json").write_text(json.dumps({  # transform.image_transform's steps
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(OPENAI_MEAN),
        "image_std": list(OPENAI_STD), "do_convert_rgb": True}, indent=2))
    return out


# -----------------------------------------------------------------------------
# open_clip: the state dict (our keys are open_clip's) and its model config JSON


def export_open_clip(model, path):
    """OUT.pt (the state dict) and OUT.json (open_clip's model config). Load it in open_clip with
    open_clip.add_model_config("OUT.json"); open_clip.create_model_and_transforms("OUT", pretrained="OUT.pt")."""
    check_exportable(model, "open_clip")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    del config["vision_cfg"]["stem_channels"]  # empty here (checked by check_exportable); open_clip has no such key
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
    path.with_suffix(".json").write_text(json.dumps(config, indent=4))
    return path


def export_safetensors(model, path):
    """Our state dict as safetensors, with our config in the header (load_checkpoint reads it back exactly)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), path, {"format": "pt", "miniclip_config": json.dumps(model.config.to_dict())})
    return Path(path)


def check_exportable(model, to):
    """The two models a format cannot hold, refused before anything is written."""
    if to == "hf" and model.logit_bias is not None:
        raise ValueError("this model was trained with the SigLIP loss; its logit bias has no place in transformers' "
                         "CLIPModel: export --to open_clip or --to safetensors")
    if to == "open_clip" and model.config.vision.stem_channels:
        raise ValueError(f"this model's image tower starts with a convolutional stem (stem_channels "
                         f"{model.config.vision.stem_channels}), which open_clip's ViT cannot hold (it starts with one "
                         "patch convolution): export --to hf (transformers, with trust_remote_code) or --to "
                         "safetensors, or train with --config model_configs/MiniCLIP-S-64px-patchify.json")


EXPORTS = {"hf": export_hf, "open_clip": export_open_clip, "safetensors": export_safetensors}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint load_checkpoint reads (train.py's last.pt, TinyCLIP, HF, ...)")
    p.add_argument("--to", choices=FORMATS, required=True, help="the format to write")
    p.add_argument("out", help="hf: a folder; open_clip: OUT.pt (OUT.json is written beside it); safetensors: a file")
    p.add_argument("--config", help="model JSON, for a flat state dict whose activation the file does not say")
    args = p.parse_args(argv)
    try:
        model = load_checkpoint(args.checkpoint, config=args.config)
        written = EXPORTS[args.to](model, args.out)
    except (CheckpointError, FileNotFoundError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {written} ({args.to}) from {args.checkpoint}")


if __name__ == "__main__":
    main()
