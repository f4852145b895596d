"""`uhrbat.io.open_image` on ordinary images: exactness, every input kind, limits and bad files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uhrbat.errors import ImageLoadError
from uhrbat.io.images import (
    PAD_RGB,
    JPEGDraftSource,
    PILSource,
    load_pil,
    pad_to_square,
    reduced_geometry,
    to_rgb,
)
from uhrbat.io.sources import open_image

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


def reference_square(img: Image.Image, side: int) -> Image.Image:
    """§2.2 written out independently: expand2square with the CLIP mean, default-filter resize."""
    img = img.convert("RGB")
    w, h = img.size
    L = max(w, h)
    canvas = Image.new("RGB", (L, L), (122, 116, 104))
    canvas.paste(img, ((L - w) // 2, (L - h) // 2))
    return canvas.resize((side, side))


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("size", [(37, 23), (23, 37), (40, 40), (101, 3)])
@pytest.mark.parametrize("side", [16, 64, 336])
def test_pil_source_is_bit_exact_with_reference(size, side) -> None:
    img = _noise(*size)
    assert np.array_equal(np.asarray(open_image(img).square(side)), np.asarray(reference_square(img, side)))


def test_png_file_is_bit_exact_with_reference(tmp_path) -> None:
    img = _noise(120, 70, seed=3)
    img.save(tmp_path / "a.png")
    src = open_image(tmp_path / "a.png")
    assert isinstance(src, PILSource) and src.georef is None
    for side in (56, 336, 672):
        assert np.array_equal(np.asarray(src.square(side)), np.asarray(reference_square(img, side)))


def test_real_aerial_png_is_exact() -> None:
    path = ASSETS / "aerial" / "neon_yell_1249x1035.png"
    src = open_image(path)
    assert src.size == (1249, 1035)
    with Image.open(path) as im:
        ref = reference_square(im.convert("RGB"), 672)
    assert np.array_equal(np.asarray(src.square(672)), np.asarray(ref))


def test_public_names_kept() -> None:
    img = Image.new("RGB", (10, 4), (1, 2, 3))
    assert pad_to_square(img).size == (10, 10) and PAD_RGB == (122, 116, 104)
    assert to_rgb(Image.new("LA", (2, 2))).mode == "RGB"


# ----------------------------------------------------------------------------- input kinds
def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


KINDS = {
    "rgb.png": lambda: Image.new("RGB", (50, 30), (200, 30, 10)),
    "rgba.png": lambda: Image.new("RGBA", (50, 30), (200, 30, 10, 255)),
    "palette.png": lambda: Image.new("RGB", (50, 30), (200, 30, 10)).convert("P", palette=Image.Palette.ADAPTIVE),
    "gray.png": lambda: Image.new("L", (50, 30), 90),
    "gray16.png": lambda: Image.fromarray(np.tile(np.arange(50, dtype=np.uint16) * 1000, (30, 1))),
    "cmyk.jpg": lambda: Image.new("CMYK", (50, 30), (0, 200, 230, 20)),
    "cmyk.tif": lambda: Image.new("CMYK", (50, 30), (0, 200, 230, 20)),
    "tiny.png": lambda: Image.new("RGB", (1, 1), (200, 30, 10)),
    "tall.png": lambda: Image.new("RGB", (1, 20000), (200, 30, 10)),
    "wide.png": lambda: Image.new("RGB", (20000, 1), (200, 30, 10)),
    "rgb.webp": lambda: Image.new("RGB", (50, 30), (200, 30, 10)),
    "rgb.bmp": lambda: Image.new("RGB", (50, 30), (200, 30, 10)),
}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_input_kind_opens(name, tmp_path) -> None:
    img = KINDS[name]()
    path = _save(img, tmp_path / name)
    src = open_image(path)
    assert src.size == img.size
    for side in (336, 672):
        sq = src.square(side)
        assert sq.size == (side, side) and sq.mode == "RGB"
    a = np.asarray(src.square(336))
    if img.size[0] > 1 and img.size[1] > 1 and img.size[0] * 3 > img.size[1]:
        centre = a[168, 168].astype(int)
        assert tuple(centre) != PAD_RGB  # the image, not the padding, is in the middle
    if img.size in ((50, 30),):  # landscape: pad above and below
        assert tuple(a[0, 168]) == PAD_RGB and tuple(a[-1, 168]) == PAD_RGB


def test_rgba_transparent_pixels_become_pad_colour(tmp_path) -> None:
    img = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    img.paste((0, 0, 255, 0), (0, 0, 20, 40))
    src = open_image(_save(img, tmp_path / "a.png"))
    a = np.asarray(src.square(40))
    assert tuple(a[20, 5]) == PAD_RGB and tuple(a[20, 35]) == (255, 0, 0)


def test_16bit_percentile_stretch(tmp_path) -> None:
    arr = np.tile(np.linspace(1000, 5000, 101).astype(np.uint16), (10, 1))
    path = _save(Image.fromarray(arr), tmp_path / "a.png")
    a = np.asarray(open_image(path).square(101))[50, :, 0]  # 101x10 -> padded to 101
    # 2nd..98th percentile -> 0..255: the ends saturate, the middle is mid-grey.
    assert a[0] == 0 and a[100] == 255 and abs(int(a[50]) - 128) <= 3
    b = np.asarray(open_image(path, stretch=None).square(101))[50, :, 0]  # full 16-bit range: dark
    assert b.max() <= 5000 / 65535 * 255 + 2
    c = np.asarray(open_image(path, stretch=(0, 100)).square(101))[50, :, 0]
    assert c[0] == 0 and c[100] == 255


def test_constant_16bit_is_not_black(tmp_path) -> None:
    path = _save(Image.fromarray(np.full((30, 50), 40000, dtype=np.uint16)), tmp_path / "a.png")
    a = np.asarray(open_image(path).square(50))
    assert abs(int(a[25, 25, 0]) - round(40000 / 65535 * 255)) <= 1


def test_exif_rotation(tmp_path) -> None:
    img = Image.new("RGB", (60, 20), (10, 20, 30))
    img.paste((250, 250, 250), (0, 0, 10, 20))  # white marker at the left
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise: the left edge goes to the top
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    src = open_image(path)
    assert src.size == (20, 60)
    a = np.asarray(src.square(60)).astype(int)
    assert a[3, 30].mean() > 200 and a[56, 30].mean() < 60


def test_bands_on_ordinary_images(tmp_path) -> None:
    path = _save(Image.new("RGB", (8, 8), (10, 100, 200)), tmp_path / "a.png")
    assert tuple(np.asarray(open_image(path, bands=(3, 2, 1)).square(8))[4, 4]) == (200, 100, 10)
    assert tuple(np.asarray(open_image(path, bands="2").square(8))[4, 4]) == (100, 100, 100)
    with pytest.raises(ImageLoadError, match=r"band list \[4\].*3 band"):
        open_image(path, bands=[4])
    with pytest.raises(ImageLoadError, match=r"band list \[1, 2\]"):
        open_image(path, bands=(1, 2))


# ----------------------------------------------------------------------------- big-image paths
def test_jpeg_reduced_decode_keeps_geometry(tmp_path) -> None:
    img = Image.new("RGB", (1200, 800), (30, 160, 60))
    img.paste((240, 240, 240), (0, 0, 300, 800))  # bright left quarter
    path = _save(img, tmp_path / "big.jpg", quality=95)
    src = open_image(path, exact_max_pixels=100_000)  # force the big-image path
    assert isinstance(src, JPEGDraftSource) and src.size == (1200, 800)
    got = np.asarray(src.square(128)).astype(int)
    with Image.open(path) as im:
        ref = np.asarray(reference_square(im.convert("RGB"), 128)).astype(int)
    assert np.abs(got - ref).mean() < 2.0
    assert src.reduced(256 / 1200).size[0] < 1200  # decoded with a DCT reduction, not in full
    # The pad rows and the bright/green boundary are where the reference puts them.
    assert tuple(got[5, 64]) == PAD_RGB and tuple(got[-5, 64]) == PAD_RGB
    assert got[64, 20].mean() > 200 and got[64, 40][1] > got[64, 40][0] + 60


def test_elongated_image_uses_reduced_square_with_same_geometry() -> None:
    img = _noise(12, 900, seed=5)
    src = PILSource(img, exact_max_pixels=10_000)  # 900^2 > limit -> no 900x900 canvas
    got = np.asarray(src.square(300)).astype(int)
    ref = np.asarray(reference_square(img, 300)).astype(int)
    pad_cols = np.all(ref == PAD_RGB, axis=(0, 2))
    assert np.array_equal(pad_cols[:140], np.all(got == PAD_RGB, axis=(0, 2))[:140])
    assert np.abs(got - ref).mean() < 1.0


def test_reduced_geometry_box_maps_square() -> None:
    cw, ch, px0, py0, box = reduced_geometry((1000, 400), (500, 200))
    # The original square (1000 x 1000) spans 500 x 500 canvas px; the image sits at oy = 300 -> 150.
    assert box[2] - box[0] == pytest.approx(500) and box[3] - box[1] == pytest.approx(500)
    assert py0 - box[1] == pytest.approx(150) and px0 - box[0] == pytest.approx(0)
    assert cw >= box[2] and ch >= box[3] and px0 + 500 <= cw


def test_one_by_twenty_thousand_is_cheap_and_centred(tmp_path) -> None:
    path = _save(Image.new("RGB", (1, 20000), (255, 0, 0)), tmp_path / "tall.png")
    src = open_image(path)
    a = np.asarray(src.square(2016)).astype(int)
    redness = a[:, :, 0] - a[:, :, 1]
    col = int(np.argmax(redness.sum(0)))
    assert abs(col - 1008) <= 1 and redness[:, col].min() > 0  # a faint full-height line in the middle


# ----------------------------------------------------------------------------- limits
def test_pixel_limit_is_explicit_and_per_open(tmp_path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    path = _save(Image.new("RGB", (50, 30)), tmp_path / "a.png")
    with pytest.raises(ImageLoadError, match=r"50x30 = 1,500 pixels.*limit of 1,000") as e:
        open_image(path, max_pixels=1000)
    assert str(path) in str(e.value)
    with pytest.raises(ImageLoadError, match=r"pixel limit") as e:
        open_image(path, max_pixels=100)  # far above: Pillow's own guard (set for this open) fires
    assert str(path) in str(e.value)
    assert Image.MAX_IMAGE_PIXELS == before  # the global guard is untouched
    assert open_image(path, max_pixels=None).size == (50, 30)
    assert Image.MAX_IMAGE_PIXELS == before


def test_pixel_limit_above_pillows_default(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a strict global guard elsewhere
    path = _save(Image.new("RGB", (50, 30)), tmp_path / "a.png")
    assert open_image(path, max_pixels=10_000).size == (50, 30)  # ours applies for this open
    assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)  # and the global one is still in force


# ----------------------------------------------------------------------------- bad inputs
def _png_bytes() -> bytes:
    buf = io.BytesIO()
    _noise(64, 64).save(buf, format="PNG")
    return buf.getvalue()


def _jpg_bytes() -> bytes:
    buf = io.BytesIO()
    _noise(64, 64).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, setup, message",
    [
        ("missing.png", lambda p: None, "image not found"),
        ("folder", lambda p: p.mkdir(), "directory"),
        ("notes.txt", lambda p: p.write_text("hello, not an image"), "not an image"),
        ("notes.png", lambda p: p.write_text("hello, not an image"), "not an image"),
        ("fake.tif", lambda p: p.write_text("hello"), "not an image"),
        ("empty.png", lambda p: p.write_bytes(b""), "not an image"),
        ("trunc.png", lambda p: p.write_bytes(_png_bytes()[:300]), "corrupt or unreadable"),
        ("trunc.jpg", lambda p: p.write_bytes(_jpg_bytes()[:400]), "corrupt or unreadable"),
        ("header.png", lambda p: p.write_bytes(_png_bytes()[:60]), "corrupt or unreadable"),
    ],
)
def test_bad_inputs_give_one_line_errors_naming_the_file(name, setup, message, tmp_path) -> None:
    p = tmp_path / name
    setup(p)
    with pytest.raises(ImageLoadError, match=message) as e:
        open_image(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_load_pil_and_unsupported_object() -> None:
    with pytest.raises(ImageLoadError, match="unsupported image input"):
        open_image(12345)  # type: ignore[arg-type]
    assert load_pil(ASSETS / "aerial" / "neon_yell_1249x1035.png").size == (1249, 1035)
