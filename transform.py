"""
CLIP image preprocessing: a PIL image in, a normalised (3, size, size) tensor out.

Two pieces:
1) image_transform(): the reference pipeline, step for step. At eval time this is
   Resize(shortest side, bicubic) -> CenterCrop -> RGB -> ToTensor -> Normalize,
   the same as `_transform` in openai/CLIP and `image_transform` in open_clip. Training
   (train_augment) works on uint8 tensors, so a small dataset can be decoded once and kept.
2) load_image(): opens a file safely and returns a clean RGB image. It adds the
   checks that the reference leaves to the caller (transparency, 16-bit, corrupt files).

References:
- CLIP paper, Radford et al. 2021, "Learning Transferable Visual Models From Natural
  Language Supervision": https://arxiv.org/abs/2103.00020
- openai/CLIP clip/clip.py `_transform`: https://github.com/openai/CLIP/blob/main/clip/clip.py
- open_clip transform.py `image_transform`:
  https://github.com/mlfoundations/open_clip/blob/main/src/open_clip/transform.py
"""

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import (CenterCrop, Compose, InterpolationMode, Normalize, PILToTensor,
                                    Resize, ToTensor, v2)

# Per-channel mean and std of OpenAI's training images (not the ImageNet values).
# Pretrained CLIP weights expect exactly these; see openai/CLIP issue #20.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # what folder readers list


def to_rgb(image):
    # A named module-level function, not a lambda: DataLoader workers pickle the transform.
    return image.convert("RGB")


def train_augment(image_size, mean=OPENAI_MEAN, std=OPENAI_STD):
    """Training augmentation of a uint8 (3, H, W) RGB tensor -> a normalised float (3, size, size) tensor. The CLIP
    paper: "A random square crop from resized images is the only data augmentation used during training"; the crop
    covers 90-100% of the image (open_clip's default scale range), resized with bicubic interpolation and
    antialiasing like PIL's. On tensors rather than PIL images: a 64-pixel image takes ~0.2 ms here instead of
    ~0.7 ms, and the decoded images of a small dataset can be kept in memory (data.CaptionTrainDataset)."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.ToDtype(torch.float32, scale=True),  # [0, 255] -> [0, 1]
        v2.Normalize(mean, std),  # (x - mean) / std per channel
    ])


def image_transform(image_size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD):
    """Build the preprocessing of a PIL image for square `image_size` inputs (224 for ViT-B/32). is_train: the
    random crop of train_augment; eval is deterministic: the whole short side, centred."""
    if is_train:
        return Compose([to_rgb, PILToTensor(), train_augment(image_size, mean, std)])
    # As in the reference, the RGB conversion comes AFTER the resize and crop, so PIL resizes
    # in the original mode. We keep that order to match the reference to the last bit, quirks
    # included: "P" and "1" images are resized with NEAREST (PIL ignores bicubic for them),
    # RGBA/LA are resized premultiplied (so transparent pixels turn black whenever a resize
    # happens) and 16-bit images are clipped at 255, not scaled. load_image() avoids all of
    # this by giving the transform a clean RGB image, for which to_rgb does nothing.
    return Compose([
        Resize(image_size, interpolation=InterpolationMode.BICUBIC),  # shortest side -> image_size
        CenterCrop(image_size),                                       # (image_size, image_size)
        to_rgb,
        ToTensor(),            # (3, H, W) float in [0, 1]
        Normalize(mean, std),  # (x - mean) / std per channel
    ])


class ImageLoadError(ValueError):
    """A file that could not be read as an image; the message names the file and the cause."""


WHITE = (255, 255, 255)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow opens 16-bit PNG/TIFF as I;16 (older: I)


def _sixteen_bit_to_l(image):
    # 0..65535 -> 0..255 by dividing by 257 (65535 / 257 = 255 exactly). A plain
    # convert("L") would clip instead, turning every value above 255 white.
    values = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(np.round(values / 257), 0, 255).astype(np.uint8))  # mode "L"


def _to_rgb_on_white(image):
    if image.mode in SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_l(image)
    # Anything with transparency (an alpha channel, or a transparent palette/colour key)
    # is composited on WHITE. A plain convert("RGB") drops alpha and exposes whatever colour
    # hides under transparent pixels (often black or garbage; see openai/CLIP issue #422).
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, P, CMYK, 1, YCbCr, ... (CMYK uses PIL's formula, no ICC)


def load_image(path):
    """Open an image file and return it as an RGB PIL image, or raise ImageLoadError."""
    try:
        with Image.open(path) as image:
            image.load()  # decode every pixel now, so truncated files fail here, not in a batch
            image = ImageOps.exif_transpose(image)  # phone photos: apply the EXIF rotation
            return _to_rgb_on_white(image)
    except FileNotFoundError as e:
        raise ImageLoadError(f"cannot load image {path}: file not found") from e
    except Image.UnidentifiedImageError as e:
        raise ImageLoadError(f"cannot load image {path}: not a recognised image format") from e
    # Other errors: truncated data ("image file is truncated"), broken chunks, huge images.
    # We do not set ImageFile.LOAD_TRUNCATED_IMAGES: a silently grey-padded image is worse.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot load image {path}: {type(e).__name__}: {e}") from e
