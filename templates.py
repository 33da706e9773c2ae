"""
Prompt templates for zero-shot classifiers: "{}" is replaced by a class name.

Three standard sets, and a reader for your own file (one template per line):
- SINGLE: "a photo of a {}.", the CLIP paper's default prompt (Radford et al. 2021, section 3.1.4).
- IMAGENET7: the 7-template ensemble the CoOp / Tip-Adapter / CLIP-Adapter papers use for ImageNet
  (Tip-Adapter's datasets/imagenet.py, github.com/gaopengcuhk/Tip-Adapter).
- OPENAI80: the 80 ImageNet templates of OpenAI's prompt-engineering notebook (openai/CLIP,
  notebooks/Prompt_Engineering_for_ImageNet.ipynb); FD-Align uses them for its spurious prototypes.
"""
from pathlib import Path

SINGLE = ["a photo of a {}."]

IMAGENET7 = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
             "a {} in a video game.", "art of the {}.", "a photo of the small {}."]

OPENAI80 = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}."]

TEMPLATE_SETS = {"single": SINGLE, "imagenet7": IMAGENET7, "openai80": OPENAI80}


def get_templates(name):
    """A set name (single, imagenet7, openai80) or a text file with one template per line, each containing {}."""
    if name in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[name])
    lines = [line.strip() for line in Path(name).read_text().splitlines() if line.strip()]
    bad = [t for t in lines if t.count("{}") != 1]
    if not lines or bad:
        raise ValueError(f"{name}: every template must contain exactly one '{{}}' (bad: {bad[:3]})")
    return lines
