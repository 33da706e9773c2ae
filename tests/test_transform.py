"""
Tests for transform.py: the eval pipeline against open_clip's (the reference), the train
pipeline's randomness, and load_image on awkward files (alpha, 16-bit, CMYK, EXIF, broken).
"""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from transform import ImageLoadError, image_transform, load_image  # pytest.ini puts the repo root on sys.path

SIZES = [(1, 1), (7, 300), (300, 7), (224, 224), (225, 224), (640, 480), (500, 1000)]  # (width, height)
MODES = ["RGB", "RGBA", "LA", "L", "P", "PA", "I;16", "I", "F", "CMYK", "1"]


def make_image(mode, width, height, seed=0):
    """A random-noise PIL image of the given mode (noise is the hardest case for resampling)."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.int32))
    if mode == "F":
        return Image.fromarray((rng.random((height, width)) * 300).astype(np.float32))
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    rgba[::3, ::2, 3] = 0  # some fully transparent pixels, hiding random colours
    rgba = Image.fromarray(rgba)  # mode "RGBA"
    if mode == "PA":
        return rgba.convert("P").convert("PA")
    return rgba.convert(mode)


# ----------------------------------------------------------------------------- eval vs reference

@pytest.mark.parametrize("image_size", [224, 64])
@pytest.mark.parametrize("mode", MODES)
def test_eval_matches_open_clip(mode, image_size):
    open_clip = pytest.importorskip("open_clip")
    ours = image_transform(image_size, is_train=False)
    reference = open_clip.image_transform(image_size, is_train=False)
    for width, height in SIZES:
        image = make_image(mode, width, height)
        assert image.mode == mode
        x, y = ours(image), reference(image)
        assert x.shape == (3, image_size, image_size)
        diff = (x - y).abs().max().item()
        assert diff <= 1e-5, f"{mode} {width}x{height} -> {image_size}: max abs diff {diff}"


def test_transforms_pickle():
    # DataLoader workers pickle the transform, so it must contain no lambdas.
    image = make_image("RGB", 50, 40)
    for is_train in (False, True):
        transform = pickle.loads(pickle.dumps(image_transform(32, is_train=is_train)))
        assert transform(image).shape == (3, 32, 32)


# ----------------------------------------------------------------------------- train transform

def test_train_transform_random_but_seeded():
    image = make_image("RGB", 640, 480)
    train, evaluate = image_transform(64, is_train=True), image_transform(64, is_train=False)
    torch.manual_seed(0)
    a = train(image)
    torch.manual_seed(0)
    b = train(image)
    c = train(image)  # next draw from the same generator
    assert a.shape == (3, 64, 64)
    assert torch.equal(a, b)  # reproducible under torch.manual_seed
    assert not torch.allclose(a, c)  # a fresh draw gives a different crop
    assert not torch.allclose(a, evaluate(image))  # and the train crop is not the eval crop


# ----------------------------------------------------------------------------- load_image

def pixel(image, xy):
    return tuple(image.getpixel(xy))


def test_rgba_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 255))  # opaque blue
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent, but red underneath
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    path = tmp_path / "rgba.png"
    rgba.save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (4, 4)
    assert pixel(image, (0, 0)) == (255, 255, 255)  # the plain convert("RGB") would give red
    assert all(abs(v - 127) <= 1 for v in pixel(image, (1, 0)))  # half-way to white
    assert pixel(image, (2, 2)) == (0, 0, 255)


def test_la_composited_on_white(tmp_path):
    la = Image.new("LA", (3, 3), (100, 255))
    la.putpixel((0, 0), (0, 0))  # fully transparent black
    path = tmp_path / "la.png"
    la.save(path)
    image = load_image(path)
    assert pixel(image, (0, 0)) == (255, 255, 255)
    assert pixel(image, (1, 1)) == (100, 100, 100)


@pytest.mark.parametrize("suffix", ["png", "gif"])
def test_palette_transparency_composited_on_white(tmp_path, suffix):
    p = Image.new("P", (3, 3), 1)
    p.putpalette([0, 0, 0, 200, 30, 40] + [0, 0, 0] * 254)  # index 0 black, index 1 reddish
    p.putpixel((0, 0), 0)
    path = tmp_path / f"palette.{suffix}"
    p.save(path, transparency=0)  # index 0 is transparent
    assert Image.open(path).mode == "P"
    image = load_image(path)
    assert pixel(image, (0, 0)) == (255, 255, 255)
    assert pixel(image, (2, 2)) == (200, 30, 40)


def test_grayscale_and_bilevel(tmp_path):
    Image.new("L", (2, 2), 77).save(tmp_path / "l.png")
    assert pixel(load_image(tmp_path / "l.png"), (0, 0)) == (77, 77, 77)
    one = Image.new("1", (2, 2), 0)
    one.putpixel((1, 1), 1)
    one.save(tmp_path / "one.png")
    image = load_image(tmp_path / "one.png")
    assert pixel(image, (0, 0)) == (0, 0, 0) and pixel(image, (1, 1)) == (255, 255, 255)


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    values = np.array([[0, 65535, 257 * 100, 300]], dtype=np.uint16)
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    image = load_image(path)
    assert [pixel(image, (i, 0))[0] for i in range(4)] == [0, 255, 100, 1]  # convert("L") gives 0, 255, 255, 255


def test_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))  # no ink: white
    cmyk.putpixel((1, 1), (255, 0, 0, 0))  # full cyan
    cmyk.save(tmp_path / "cmyk.tif")
    image = load_image(tmp_path / "cmyk.tif")
    assert pixel(image, (0, 0)) == (255, 255, 255) and pixel(image, (1, 1)) == (0, 255, 255)
    # A CMYK JPEG (lossy; Pillow stores it Adobe-inverted) still comes back with the right colour.
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert all(abs(a - b) <= 8 for a, b in zip(pixel(load_image(tmp_path / "cmyk.jpg"), (8, 8)), (0, 255, 255)))


def test_exif_orientation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation tag: "rotate 90 degrees clockwise to display"
    Image.new("RGB", (40, 20), (10, 20, 30)).save(tmp_path / "rotated.jpg", exif=exif)
    Image.new("RGB", (40, 20), (10, 20, 30)).save(tmp_path / "plain.jpg")
    assert Image.open(tmp_path / "rotated.jpg").size == (40, 20)  # stored landscape
    assert load_image(tmp_path / "rotated.jpg").size == (20, 40)  # displayed portrait
    assert load_image(tmp_path / "plain.jpg").size == (40, 20)


# ----------------------------------------------------------------------------- load errors

def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError, match="not found") as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageLoadError, match="not a recognised image format") as info:
        load_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_truncated_file(tmp_path, suffix):
    path = tmp_path / f"truncated.{suffix}"
    make_image("RGB", 128, 96).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut the file in half
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # we never switch the global escape hatch on
