"""Issue 18, the reader's items: each input here used to raise a raw exception, produce invalid
JSON or decode garbage; now it opens with a defined result or fails with one typed line."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uhrbat.errors import GeoError, GeoTransformError, ImageLoadError, NotGeoreferencedError
from uhrbat.io.images import percentile_range, stretch_to_uint8
from uhrbat.io.sources import open_image, open_image_bytes
from untrusted_corpus import tiff_strip


# ----------------------------------------------------------------------------- item 2: NUL bytes
@pytest.mark.parametrize("trust", ["local", "untrusted"])
@pytest.mark.parametrize("path", ["a\x00b.png", "/vsimem/a\x00b.tif", Path("dir\x00/x.tif")])
def test_nul_byte_in_path_is_one_image_load_error(path, trust) -> None:
    with pytest.raises(ImageLoadError, match="NUL byte") as e:
        open_image(path, trust=trust)
    assert "\n" not in str(e.value) and type(e.value) is ImageLoadError


def test_nul_byte_reaches_neither_rasterio_nor_the_filesystem(monkeypatch) -> None:
    from uhrbat.io.raster import untrusted_driver

    with pytest.raises(ImageLoadError, match="NUL byte"):
        untrusted_driver("x\x00.tif")


# ----------------------------------------------------------------------------- item 3: float stretch
@pytest.mark.parametrize("value", [1e16, -3e17, 1e20, 3.0e38, 1e300, 5.0])
def test_constant_float_bands_of_any_magnitude_map_to_mid_grey(value) -> None:
    band = np.full((4, 5), value, np.float64 if abs(value) > 3.4e38 else np.float32)
    lo, hi = percentile_range(band.ravel(), (2, 98))
    assert hi > lo
    out = stretch_to_uint8(band, lo, hi)
    assert (out == 128).all()


def test_stretch_never_divides_by_zero_or_overflows() -> None:
    band = np.array([[np.nan, np.inf, -np.inf, 1.0]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning either
        assert stretch_to_uint8(band, 1.0, 1.0).tolist() == [[0, 255, 0, 128]]
        assert stretch_to_uint8(band, -np.inf, np.inf).tolist() == [[0, 255, 0, 128]]
        assert stretch_to_uint8(np.array([[-1e308, 1e308]]), -1e308, 1e308).tolist() == [[0, 255]]
    assert percentile_range(np.array([np.nan, np.inf], np.float32), (2, 98)) == (0.0, 1.0)


rasterio = pytest.importorskip("rasterio")
from rasterio.crs import CRS  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402


def _tif(path: Path, data: np.ndarray, **kw) -> Path:
    count, h, w = data.shape
    profile = dict(driver="GTiff", width=w, height=h, count=count, dtype=data.dtype.name)
    profile.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(data)
    return path


@pytest.mark.parametrize("fill", [1e20, -1e17, np.inf, np.nan])
@pytest.mark.parametrize("trust", ["local", "untrusted"])
def test_constant_float_raster_opens_with_a_defined_picture(tmp_path, fill, trust) -> None:
    p = _tif(tmp_path / "c.tif", np.full((1, 40, 60), fill, np.float32))
    sq = np.asarray(open_image(p, trust=trust).square(64))
    body = sq[12:52]  # the 60 x 40 image on the 60 x 60 square, resized to 64
    if np.isfinite(fill):
        assert (body[4:-4] == 128).all()  # mid-grey
    else:  # no finite sample: every pixel is invalid -> padding colour
        assert (body[4:-4] == (122, 116, 104)).all()


# ----------------------------------------------------------------------------- item 6: bad georeference
def _patch_doubles(path: Path, tag: int, values: tuple[float, ...]) -> None:
    """Overwrite the double values of a TIFF tag in place (little-endian classic TIFF)."""
    b = bytearray(path.read_bytes())
    (ifd,) = struct.unpack("<I", b[4:8])
    (n,) = struct.unpack("<H", b[ifd : ifd + 2])
    for i in range(n):
        e = ifd + 2 + 12 * i
        t, typ, cnt, off = struct.unpack("<HHII", b[e : e + 12])
        if t == tag:
            assert typ == 12 and cnt == len(values)
            b[off : off + 8 * cnt] = struct.pack(f"<{cnt}d", *values)
            path.write_bytes(bytes(b))
            return
    raise AssertionError(f"tag {tag} not found")


@pytest.mark.parametrize("scale", [(float("nan"), 10.0, 0.0), (float("inf"), 10.0, 0.0), (10.0, 0.0, 0.0)])
@pytest.mark.parametrize("trust", ["local", "untrusted"])
def test_non_finite_or_singular_pixel_scale_is_not_georeferenced_with_a_note(tmp_path, scale, trust) -> None:
    from uhrbat.io.geo import map_ready, tokens_with_boxes

    p = _tif(
        tmp_path / "g.tif",
        np.zeros((3, 30, 40), np.uint8) + 90,
        crs="EPSG:32633",
        transform=from_origin(500000, 6000000, 10, 10),
    )
    _patch_doubles(p, 33550, scale)  # ModelPixelScaleTag
    with pytest.warns(UserWarning, match="georeference of .* was ignored"):
        src = open_image(p, trust=trust)
    assert src.georef is None and "coordinates are image pixels" in src.georef_note
    tok = _Tok()
    json.dumps(tokens_with_boxes([tok], src), allow_nan=False)  # valid JSON: no NaN / Infinity
    with pytest.raises(NotGeoreferencedError, match="was ignored") as e:
        map_ready(src)
    assert "--json" in str(e.value) and "\n" not in str(e.value)


def test_ground_control_points_give_a_fitted_transform_or_a_note(tmp_path) -> None:
    from rasterio.control import GroundControlPoint as G

    data = np.zeros((1, 20, 30), np.uint8) + 50
    good = [G(0, 0, 500000, 6000000), G(0, 30, 500300, 6000000), G(20, 0, 500000, 5999800), G(20, 30, 500300, 5999800)]
    for name, gcps, ok in (("fit.tif", good, True), ("line.tif", [G(i, i, 5e5 + i, 6e6 - i) for i in range(4)], False)):
        p = tmp_path / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(p, "w", driver="GTiff", width=30, height=20, count=1, dtype="uint8") as ds:
                ds.write(data)
                ds.gcps = (gcps, CRS.from_epsg(32633))
            if ok:
                src = open_image(p)
                assert src.georef.coefficients == pytest.approx((10, 0, 500000, 0, -10, 6000000), abs=1e-6)
                continue
        with pytest.warns(UserWarning, match="collinear"):
            assert open_image(p).georef is None


def test_georef_refuses_non_finite_transforms_itself() -> None:
    from uhrbat.io.geo import GeoRef

    with pytest.raises(GeoError, match="non-finite"):
        GeoRef("EPSG:32633", (float("nan"), 0, 0, 0, -1, 0))
    with pytest.raises(GeoError, match="singular"):
        GeoRef("EPSG:32633", (0, 0, 0, 0, 0, 0))


# ----------------------------------------------------------------------------- item 1: untransformable CRS
LOCAL_CS = 'LOCAL_CS["arbitrary",UNIT["metre",1]]'


class _Tok:
    scale, tile, row, col, group, score, merged, members = 672, 0, 10, 10, 0, 0.5, False, []

    def to_dict(self) -> dict:
        return {"scale": self.scale, "tile": self.tile, "row": self.row, "col": self.col}


def test_crs_without_a_wgs84_transform_is_found_at_open_time_and_is_a_geo_error(tmp_path) -> None:
    from uhrbat.io.geo import map_ready, tokens_geojson, tokens_with_boxes

    p = _tif(
        tmp_path / "local.tif",
        np.zeros((3, 30, 40), np.uint8) + 90,
        crs=CRS.from_wkt(LOCAL_CS),
        transform=from_origin(1000, 2000, 1, 1),
    )
    for trust in ("local", "untrusted"):
        src = open_image(p, trust=trust)
        assert src.georef is not None and "cannot be transformed to WGS84" in src.georef.wgs84_error
        rows = tokens_with_boxes([_Tok()], src)  # CRS boxes still work
        assert rows[0]["box_crs"][0] == pytest.approx(1000 + rows[0]["box_px"][0])
        for call in (lambda s=src: map_ready(s), lambda s=src: tokens_geojson([_Tok()], s)):
            with pytest.raises(GeoTransformError, match="cannot be transformed to WGS84") as e:
                call()
            msg = str(e.value)
            assert "\n" not in msg and len(msg) < 400 and "$schema" not in msg and "CPLE" not in msg
        with pytest.raises(GeoTransformError):
            src.georef.pixel_to_wgs84([0], [0])
    # the CRS-coordinate GeoJSON (legacy `crs` member) is still possible
    fc = tokens_geojson([_Tok()], src, coordinates="crs")
    assert fc["coordinate_space"] == "crs"


def test_points_outside_a_projection_are_a_geo_error_not_infinity() -> None:
    from uhrbat.io.geo import GeoRef

    geo = GeoRef("+proj=ortho +lat_0=0 +lon_0=0", (1e5, 0, 0, 0, -1e5, 0))  # pixel 1000: off the globe
    geo.pixel_to_wgs84([0, 10], [0, 10])
    with pytest.raises(GeoTransformError, match="ortho") as e:
        geo.pixel_to_wgs84([0, 1000], [0, 1000])
    assert "\n" not in str(e.value)
    assert geo.checked_wgs84((1000, 1000)).wgs84_error and not geo.checked_wgs84((10, 10)).wgs84_error


# ----------------------------------------------------------------------------- item 8: TIFF tables
def _strip_tiff(
    w: int, h: int, *, offset: int | None = None, count: int | None = None, rps: int | None = None
) -> bytes:
    b = bytearray(tiff_strip(w, h))
    (n,) = struct.unpack("<H", b[8:10])
    for i in range(n):
        e = 10 + 12 * i
        (tag,) = struct.unpack("<H", b[e : e + 2])
        for t, v in ((273, offset), (279, count), (278, rps)):
            if tag == t and v is not None:
                b[e + 8 : e + 12] = struct.pack("<I", v)
    return bytes(b)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (dict(offset=0, count=100 * 1_000_000), "into its header"),
        (dict(offset=8, count=64), "into an IFD"),
        (dict(count=100 * 1_000_000), "past the end of the file"),
        (dict(rps=1, count=100), "declares 1 strip offset"),
        (dict(count=10), "uncompressed strip 0 .* need"),
    ],
)
@pytest.mark.parametrize("trust", ["local", "untrusted"])
def test_inconsistent_strip_tables_are_refused_at_once(tmp_path, case, message, trust) -> None:
    import time

    p = tmp_path / "t.tif"
    p.write_bytes(_strip_tiff(100, 1_000_000, **case) if case.get("count") != 10 else _strip_tiff(100, 64, **case))
    t = time.perf_counter()
    with pytest.raises(ImageLoadError, match=f"inconsistent TIFF structure: it .*{message}") as e:
        open_image(p, trust=trust)
    assert time.perf_counter() - t < 1.0 and "\n" not in str(e.value)


def test_valid_tiffs_pass_the_layout_check(tmp_path) -> None:
    from uhrbat.io.tiff import check_tiff_layout

    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (3, 300, 500)).astype(np.uint8)
    variants = {
        "strips.tif": {},
        "tiled.tif": dict(tiled=True, blockxsize=128, blockysize=64, compress="deflate"),
        "planar.tif": dict(interleave="band"),
        "big.tif": dict(BIGTIFF="YES", tiled=True, blockxsize=256, blockysize=256),
        "sparse.tif": dict(tiled=True, blockxsize=256, blockysize=256, SPARSE_OK="TRUE"),
        "masked.tif": dict(nodata=0, tiled=True, blockxsize=128, blockysize=128),
    }
    for name, kw in variants.items():
        p = _tif(tmp_path / name, data if name != "sparse.tif" else np.zeros_like(data), **kw)
        with rasterio.open(p, "r+") as ds:
            ds.build_overviews([2, 4])
        check_tiff_layout(p)
        open_image(p, trust="untrusted").square(64)
    Image.new("RGB", (70, 50), (1, 2, 3)).save(tmp_path / "pil.tif", compression="tiff_lzw")
    check_tiff_layout(tmp_path / "pil.tif")


def test_layout_check_refuses_ifd_loops_and_huge_tables(tmp_path) -> None:
    from uhrbat.io.tiff import MAX_BLOCKS, check_tiff_layout

    b = bytearray(tiff_strip(10, 10, data=b"\x00" * 100))
    (n,) = struct.unpack("<H", b[8:10])
    b[10 + 12 * n : 14 + 12 * n] = struct.pack("<I", 8)  # next IFD -> itself
    (tmp_path / "loop.tif").write_bytes(bytes(b))
    with pytest.raises(ImageLoadError, match="loops"):
        check_tiff_layout(tmp_path / "loop.tif")
    (tmp_path / "many.tif").write_bytes(_strip_tiff(1, MAX_BLOCKS + 5, rps=1))
    with pytest.raises(ImageLoadError, match="strips"):
        open_image(tmp_path / "many.tif", trust="untrusted")
    with pytest.raises(ImageLoadError, match="inconsistent TIFF"):
        open_image_bytes(_strip_tiff(100, 1_000_000, offset=0))


# ----------------------------------------------------------------------------- item 12: elongated images
@pytest.mark.parametrize("shape", [(1, 500), (500, 1), (3, 3000), (3000, 3), (400, 250), (700, 699)])
@pytest.mark.parametrize("side", [7, 336, 672])
def test_padded_resize_equals_the_two_pass_resize_of_the_canvas(shape, side, monkeypatch) -> None:
    from uhrbat.io import images

    w, h = shape
    rng = np.random.default_rng(w * 7 + h)
    small = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    L = max(w, h)
    g = min(1.0, 2 * side / L)
    small = small.resize((max(1, round(w * g)), max(1, round(h * g))))
    cw, ch, px0, py0, box = images.reduced_geometry((w, h), small.size)
    canvas = Image.new("RGB", (cw, ch), images.PAD_RGB)
    canvas.paste(small, (px0, py0))
    bicubic = Image.Resampling.BICUBIC
    two_pass = canvas.resize((side, ch), bicubic, box=(box[0], 0, box[2], ch))
    two_pass = np.asarray(two_pass.resize((side, side), bicubic, box=(0, box[1], side, box[3])))
    one_call = np.asarray(canvas.resize((side, side), bicubic, box=box)).astype(int)
    for band_bytes in (1 << 22, 4096, 64):  # many small bands give the same result
        monkeypatch.setattr(images, "BAND_BYTES", band_bytes)
        got = np.asarray(images.square_from_reduced(small, (w, h), side))
        assert np.array_equal(got, two_pass)
        assert np.abs(got.astype(int) - one_call).max() <= 2  # Pillow may run one call's passes the other way


def test_elongated_png_costs_about_what_a_normal_image_costs(tmp_path) -> None:
    """Issue 18 item 12: a 1 x 100,000 PNG (a few hundred bytes) used to cost ~+409 MB over a
    normal image for the 672..4032 pyramid (an ~8066^2 padded canvas and Pillow's intermediate)."""
    from untrusted_corpus import png_bytes, run_worker

    (tmp_path / "tall.png").write_bytes(png_bytes(1, 100_000))
    (tmp_path / "wide.png").write_bytes(png_bytes(100_000, 1))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), dtype=np.uint8)).save(
        tmp_path / "normal.png"
    )
    items = [(tmp_path / n, "untrusted") for n in ("normal.png", "tall.png", "wide.png")]
    normal, tall, wide = run_worker(items, side=(672, 1344, 2688, 4032), timeout=120)
    assert normal["status"] == tall["status"] == wide["status"] == "ok", (normal, tall, wide)
    assert tall["peak_mb"] < normal["peak_mb"] + 120 and wide["peak_mb"] < normal["peak_mb"] + 120, (
        normal["peak_mb"],
        tall["peak_mb"],
        wide["peak_mb"],
    )
