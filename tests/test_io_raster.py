"""GeoTIFF / COG / JPEG2000 through `open_image` (rasterio): real and generated rasters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

rasterio = pytest.importorskip("rasterio", reason="GeoTIFF input needs rasterio (pip install rasterio)")
from rasterio.enums import Resampling  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402

from uhrbat.errors import ImageLoadError  # noqa: E402
from uhrbat.io.images import PAD_RGB, PILSource  # noqa: E402
from uhrbat.io.raster import RasterSource  # noqa: E402
from uhrbat.io.sources import open_image  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
NEON = ASSETS / "aerial" / "neon_osbs_400.tif"
RMNP = ASSETS / "aerial" / "rmnp_rgb_geotiff.tif"


def reference_square(img: Image.Image, side: int) -> Image.Image:
    w, h = img.size
    L = max(w, h)
    canvas = Image.new("RGB", (L, L), (122, 116, 104))
    canvas.paste(img.convert("RGB"), ((L - w) // 2, (L - h) // 2))
    return canvas.resize((side, side))


def write(path: Path, data: np.ndarray, **kw) -> Path:
    count, h, w = data.shape
    profile = dict(
        driver="GTiff",
        width=w,
        height=h,
        count=count,
        dtype=data.dtype.name,
        crs="EPSG:32633",
        transform=from_origin(500000, 6000000, 10, 10),
    )
    profile.update(kw)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


# ----------------------------------------------------------------------------- real rasters
def test_real_utm_geotiff() -> None:
    src = open_image(NEON)
    assert isinstance(src, RasterSource)
    assert src.size == (400, 400) and src.count == 3 and src.bands == (1, 2, 3)
    assert src.georef is not None and src.georef.crs_name == "EPSG:32617"
    a, b, c, d, e, f = src.georef.coefficients
    assert (a, b, d, e) == pytest.approx((0.1, 0.0, 0.0, -0.1)) and (c, f) == pytest.approx((404211.9, 3285142.9))
    sq = src.square(672)
    assert sq.size == (672, 672) and sq.mode == "RGB"


def test_real_geographic_geotiff_matches_pil_on_same_pixels() -> None:
    src = open_image(RMNP)
    assert src.size == (485, 373) and src.georef.crs_name == "EPSG:4326"
    with rasterio.open(RMNP) as ds:
        arr = ds.read()
        nodata = ds.nodata
    rgb = np.ascontiguousarray(arr.transpose(1, 2, 0))
    valid = np.any(arr != nodata, axis=0)  # GDAL: a pixel is nodata only if every band is
    rgb[~valid] = PAD_RGB
    ref = reference_square(Image.fromarray(rgb), 672)
    assert np.array_equal(np.asarray(src.square(672)), np.asarray(ref))  # small rasters are exact


def test_decimated_read_close_to_exact() -> None:
    exact = np.asarray(open_image(RMNP).square(336)).astype(int)
    reduced = np.asarray(open_image(RMNP, exact_max_pixels=1000).square(120))
    ref = np.asarray(Image.fromarray(exact.astype(np.uint8)).resize((120, 120))).astype(int)
    assert np.abs(reduced.astype(int) - ref).mean() < 4


# ----------------------------------------------------------------------------- generated rasters
def test_multispectral_16bit_band_selection_and_stretch(tmp_path) -> None:
    h, w = 120, 160
    rng = np.random.default_rng(0)
    data = (rng.integers(0, 200, (5, h, w)) + 1000).astype(np.uint16)
    data[3, :, : w // 2] += 3000  # band 4 bright on the left
    data[1, : h // 2, :] += 3000  # band 2 bright at the top
    path = write(tmp_path / "ms.tif", data)
    src = open_image(path, bands=(4, 3, 2))
    assert src.bands == (4, 3, 2) and src.dtype == np.uint16 and len(src.stretch_ranges) == 3
    a = np.asarray(src.square(160)).astype(int)  # image rows 20..139
    assert a[80, 20, 0] > 200 and a[80, 140, 0] < 60  # R = band 4: left bright
    assert a[30, 80, 2] > 200 and a[130, 80, 2] < 60  # B = band 2: top bright
    lo, hi = src.stretch_ranges[0]
    assert 1000 <= lo < 1100 and 4000 <= hi <= 4200
    default = open_image(path)  # 5 bands without colour interpretation -> 1, 2, 3
    assert default.bands == (1, 2, 3)
    grey = np.asarray(open_image(path, bands="4").square(160))[20:140]  # rows 20..139: the image
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0], grey[..., 2])


def test_stretch_and_squares_come_from_overviews(tmp_path) -> None:
    """Overviews hold one value, full resolution another: what we read proves which was used."""
    n = 1024
    path = tmp_path / "ov.tif"
    data = np.full((3, n, n), 1000, np.uint16)
    data[:, :, n // 2 :] = 3000
    write(path, data, tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "r+") as ds:
        ds.build_overviews([2, 4, 8], Resampling.average)
        ds.write(np.full((3, n, n), 60000, np.uint16))  # full-res now differs from the overviews
    src = RasterSource(path, exact_max_pixels=10_000, stats_side=128)
    assert src.overview_factors == [2, 4, 8]
    lo, hi = src.stretch_ranges[0]
    assert (lo, hi) == (1000.0, 3000.0)  # computed from an overview, not the 60000 full res
    a = np.asarray(src.square(128)).astype(int)
    assert a[64, 10, 0] == 0 and a[64, 118, 0] == 255  # left dark / right bright: overview data


def test_nodata_becomes_pad_colour(tmp_path) -> None:
    data = np.full((3, 64, 64), 180, np.uint8)
    data[:, :, :32] = 0
    path = write(tmp_path / "nd.tif", data, nodata=0)
    a = np.asarray(open_image(path).square(64))
    assert tuple(a[32, 10]) == PAD_RGB and tuple(a[32, 50]) == (180, 180, 180)
    b = np.asarray(open_image(path, exact_max_pixels=100).square(32))  # decimated path too
    assert tuple(b[16, 4]) == PAD_RGB and tuple(b[16, 28]) == (180, 180, 180)


def test_float_nan_and_alpha_become_pad_colour(tmp_path) -> None:
    f = np.random.default_rng(1).random((1, 40, 40)).astype(np.float32)
    f[:, :20, :] = np.nan
    a = np.asarray(open_image(write(tmp_path / "f.tif", f)).square(40))
    assert tuple(a[5, 20]) == PAD_RGB and tuple(a[30, 20]) != PAD_RGB
    rgba = np.full((4, 40, 40), 200, np.uint8)
    rgba[3] = 255
    rgba[3, :, 20:] = 0
    p = write(tmp_path / "rgba.tif", rgba, photometric="RGB", alpha="YES")
    b = np.asarray(open_image(p).square(40))
    assert tuple(b[20, 5]) == (200, 200, 200) and tuple(b[20, 35]) == PAD_RGB


def test_cog_with_overviews_and_pixel_limit(tmp_path) -> None:
    data = np.random.default_rng(2).integers(0, 255, (3, 600, 400)).astype(np.uint8)
    path = tmp_path / "cog.tif"
    with rasterio.open(
        path,
        "w",
        driver="COG",
        width=400,
        height=600,
        count=3,
        dtype="uint8",
        crs="EPSG:3857",
        transform=from_origin(0, 0, 1, 1),
        blocksize=128,
        overview_resampling="average",
    ) as ds:
        ds.write(data)
    src = open_image(path, exact_max_pixels=1000)
    assert isinstance(src, RasterSource) and src.overview_factors and src.size == (400, 600)
    assert src.square(100).size == (100, 100)
    # Rasters with overviews are read decimated: the pixel limit does not apply to them ...
    assert open_image(path, max_pixels=1000).size == (400, 600)
    # ... but it does to rasters that must be decoded in full.
    plain = write(tmp_path / "plain.tif", data)
    with pytest.raises(ImageLoadError, match=r"400x600 = 240,000 pixels.*limit of 1,000") as e:
        open_image(plain, max_pixels=1000)
    assert str(plain) in str(e.value)


def test_jpeg2000(tmp_path) -> None:
    data = np.random.default_rng(3).integers(0, 255, (3, 96, 128)).astype(np.uint8)
    path = write(tmp_path / "a.jp2", data, driver="JP2OpenJPEG", QUALITY=100, REVERSIBLE="YES")
    src = open_image(path)
    assert isinstance(src, RasterSource) and src.size == (128, 96) and src.georef.crs_name == "EPSG:32633"
    ref = reference_square(Image.fromarray(np.ascontiguousarray(data.transpose(1, 2, 0))), 64)
    assert np.array_equal(np.asarray(src.square(64)), np.asarray(ref))  # lossless round trip


def test_palette_raster(tmp_path) -> None:
    idx = np.zeros((1, 20, 20), np.uint8)
    idx[0, :, 10:] = 1
    path = write(tmp_path / "pal.tif", idx, photometric="palette")
    with rasterio.open(path, "r+") as ds:
        ds.write_colormap(1, {0: (255, 0, 0, 255), 1: (0, 0, 255, 255)})
    a = np.asarray(open_image(path).square(20))
    assert tuple(a[10, 2]) == (255, 0, 0) and tuple(a[10, 17]) == (0, 0, 255)


def test_plain_8bit_tiff_goes_to_pillow_exactly(tmp_path) -> None:
    img = Image.fromarray(np.random.default_rng(4).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    img.save(tmp_path / "p.tif")
    src = open_image(tmp_path / "p.tif")
    assert isinstance(src, PILSource)
    assert np.array_equal(np.asarray(src.square(64)), np.asarray(reference_square(img, 64)))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "bands, needle",
    [
        ((4, 3, 2), r"\[4, 3, 2\] .* 3 band"),
        ((1, 2), r"\[1, 2\] .* 3 band"),
        ((0, 1, 2), r"\[0, 1, 2\]"),
        ("a,b", "comma-separated"),
    ],
)
def test_unsupported_band_lists(bands, needle) -> None:
    with pytest.raises(ImageLoadError, match=needle) as e:
        open_image(NEON, bands=bands)
    assert "\n" not in str(e.value)


def test_non_raster_and_corrupt_files(tmp_path) -> None:
    vec = tmp_path / "roads.geojson"
    vec.write_text(
        '{"type":"FeatureCollection","features":[{"type":"Feature","properties":{},'
        '"geometry":{"type":"Point","coordinates":[1,2]}}]}'
    )
    with pytest.raises(ImageLoadError, match="not an image") as e:
        open_image(vec)
    assert str(vec) in str(e.value)
    data = NEON.read_bytes()
    trunc = tmp_path / "trunc.tif"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="corrupt or unreadable") as e:
        open_image(trunc)
    assert str(trunc) in str(e.value) and "\n" not in str(e.value)
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(data[:8] + b"\x00" * 200)
    with pytest.raises(ImageLoadError, match=str(garbage)):
        open_image(garbage)


def test_big_raster_without_overviews_is_probed_not_scanned(tmp_path) -> None:
    path = write(tmp_path / "big.tif", np.zeros((1, 2000, 2000), np.uint8), tiled=True, blockxsize=256, blockysize=256)
    src = RasterSource(path, exact_max_pixels=1000)
    assert src.square(64).size == (64, 64)


def test_elongated_and_large_rasters_read_decimated(tmp_path) -> None:
    strip = np.zeros((3, 3, 9000), np.uint8)
    strip[0] = 255
    src = open_image(write(tmp_path / "strip.tif", strip))
    assert src.size == (9000, 3) and src._full is None  # 9000^2 padded: never materialised
    a = np.asarray(src.square(900)).astype(int)
    red_rows = np.where(np.any(a[:, 450] != PAD_RGB, axis=-1))[0]
    assert red_rows.min() >= 448 and red_rows.max() <= 451  # a thin centred line
    big = RasterSource(write(tmp_path / "big.tif", np.zeros((1, 300, 300), np.uint8)), raster_exact_max_pixels=10_000)
    assert big._full is None and big.square(50).size == (50, 50)
