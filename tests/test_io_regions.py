"""Regions (issue 21, the reader): parsing and errors, windowed reads at native resolution that
equal the same window cut into its own file (pixels, stretch, pyramid tiles), map coordinates,
GeoJSON polygons, and outputs in the scene's coordinates."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uhrbat.errors import RegionError
from uhrbat.io.images import PAD_RGB
from uhrbat.io.regions import parse_region
from uhrbat.io.sources import open_image, open_image_bytes
from uhrbat.processing.image_processing_uhrbat import UhrBatImageProcessor
from uhrbat.results import KeptToken

PROC = UhrBatImageProcessor(scales=[672, 1344])


def same_tiles(a, b) -> bool:
    ta, sa = PROC.pyramid(a)
    tb, sb = PROC.pyramid(b)
    return sa == sb and torch.equal(ta, tb)


# ----------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"region": "1,2,3"}, "four comma-separated numbers"),
        ({"region": [0, 0, 10]}, r"four numbers \[x0, y0, x1, y1\]"),
        ({"region": "0,0,nan,5"}, "four comma-separated numbers"),
        ({"region": [0, 0, float("inf"), 5]}, "finite"),
        ({"region": "5,0,5,9"}, "is empty: x1 == x0"),
        ({"region": "0,9,5,2"}, r"is inverted: y1 \(2\) < y0 \(9\)"),
        ({"region": "0.5,0,5,9"}, "whole pixels"),
        ({"region": [True, 0, 5, 9]}, "four numbers"),
        ({"region": "0,0,5,5", "region_crs": "EPSG:99999999"}, "unknown CRS 'EPSG:99999999'"),
        ({"region": "0,0,5,5", "region_crs": "not a crs"}, "unknown CRS"),
        ({"region_crs": "EPSG:4326"}, "applies to region"),
        ({"region": "0,0,5,5", "region_geojson": "{}"}, "give one region, not region and region_geojson"),
        ({"region_geojson": "{not json"}, "not valid JSON"),
        ({"region_geojson": '{"type": "Point", "coordinates": [1, 2]}'}, "no Polygon or MultiPolygon"),
        ({"region_geojson": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}, "needs >= 4"),
        ({"region_geojson": '{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,NaN],[0,0]]]}'}, "not valid JSON"),
        ({"region_geojson": {"type": "Blob"}}, "unknown GeoJSON type"),
        ({"region_geojson": [1, 2]}, "must be a GeoJSON object"),
        ({"region_file": "/nonexistent/aoi.geojson"}, "cannot read region file"),
    ],
)
def test_malformed_regions_are_one_line_errors(kwargs, message) -> None:
    with pytest.raises(RegionError, match=message) as e:
        parse_region(**kwargs)
    assert "\n" not in str(e.value)


def test_region_forms() -> None:
    assert parse_region() is None
    r = parse_region(" 10, 20 ,30,40 ")
    assert (r.kind, r.bounds) == ("pixels", (10.0, 20.0, 30.0, 40.0))
    assert parse_region([10, 20, 30, 40]).bounds == r.bounds == parse_region("[10,20,30,40]").bounds
    m = parse_region([500000.5, 6e6, 500100, 6000100.25], region_crs="EPSG:32633")
    assert m.kind == "map" and m.crs.to_epsg() == 32633 and "EPSG:32633" in m.label


# ----------------------------------------------------------------------------- PNG / JPEG (Pillow)
@pytest.mark.parametrize("mode", ["RGB", "I;16", "L", "RGBA"])
def test_png_region_equals_the_cut_file(tmp_path, mode) -> None:
    rng = np.random.default_rng(1)
    if mode == "I;16":
        arr = (rng.integers(0, 3000, (300, 500)) + np.linspace(0, 40000, 500)[None, :]).astype(np.uint16)
        img = Image.fromarray(arr)
    else:
        img = Image.fromarray(rng.integers(0, 255, (300, 500, 4), dtype=np.uint8), "RGBA").convert(mode)
    img.save(tmp_path / "scene.png")
    box = (130, 40, 471, 266)
    img.crop(box).save(tmp_path / "cut.png")
    src = open_image(tmp_path / "scene.png", region=",".join(map(str, box)))
    cut = open_image(tmp_path / "cut.png")
    assert src.size == (341, 226) and src.region.pixels == box and src.region.scene_size == (500, 300)
    assert np.array_equal(np.asarray(src.image), np.asarray(cut.image))  # incl. the window's own stretch
    assert same_tiles(src, cut)
    if mode == "I;16":  # the stretch is the window's, not the scene's
        assert not np.array_equal(np.asarray(src.image), np.asarray(open_image(tmp_path / "scene.png").image.crop(box)))


def test_region_of_uploaded_bytes_and_pil_images(tmp_path) -> None:
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 255, (120, 200, 3), dtype=np.uint8))
    buf = tmp_path / "a.jpg"
    img.save(buf, quality=90)
    up = open_image_bytes(buf.read_bytes(), filename="a.jpg", region=[10, 10, 110, 90])
    assert up.size == (100, 80) and up.region.pixels == (10, 10, 110, 90)
    with Image.open(buf) as im:
        cut = im.convert("RGB").crop((10, 10, 110, 90))
    assert np.array_equal(np.asarray(up.image), np.asarray(cut))
    mem = open_image(img, region=[10, 10, 110, 90])
    assert np.array_equal(np.asarray(mem.image), np.asarray(img.crop((10, 10, 110, 90))))
    with pytest.raises(RegionError, match="not from an already opened source"):
        open_image(mem, region=[0, 0, 5, 5])


def test_region_errors_against_the_image(tmp_path) -> None:
    Image.new("RGB", (300, 200), (1, 2, 3)).save(tmp_path / "a.png")
    p = tmp_path / "a.png"
    with pytest.raises(RegionError, match=r"lies outside image .*a.png \(pixels 0,0,300,200\)"):
        open_image(p, region=[300, 0, 400, 100])
    with pytest.raises(RegionError, match="lies outside"):
        open_image(p, region=[-50, -50, 0, 10])
    with pytest.raises(RegionError, match="in map coordinates, but image .* is not georeferenced.*in pixels"):
        open_image(p, region=[0, 0, 10, 10], region_crs="EPSG:4326")
    square = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]}
    with pytest.raises(RegionError, match="not georeferenced"):
        open_image(p, region_geojson=square)
    src = open_image(p, region=[250, -10, 350, 50])  # partly outside: clipped, and said
    assert src.size == (50, 50) and src.region.pixels == (250, 0, 300, 50)
    assert "extends past" in src.region.note and "clipped to pixels 250,0,300,50" in src.region.note


# ----------------------------------------------------------------------------- GeoTIFF (GDAL)
rasterio = pytest.importorskip("rasterio")
from rasterio.enums import Resampling  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402
from rasterio.windows import Window  # noqa: E402

T = from_origin(500000.0, 6000000.0, 0.5, 0.5)


def write_tif(path: Path, data: np.ndarray, overviews=(), **kw) -> Path:
    count, h, w = data.shape
    profile = dict(driver="GTiff", width=w, height=h, count=count, dtype=data.dtype.name, crs="EPSG:32633", transform=T)
    profile.update(kw)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
        if overviews:
            ds.build_overviews(list(overviews), Resampling.average)
    return path


def cut_tif(src: Path, dst: Path, win: tuple[int, int, int, int]) -> Path:
    """The window written to its own plain GeoTIFF (what gdal_translate -srcwin makes)."""
    x0, y0, x1, y1 = win
    with rasterio.open(src) as ds:
        w = Window(x0, y0, x1 - x0, y1 - y0)
        data = ds.read(window=w)
        profile = dict(ds.profile, width=x1 - x0, height=y1 - y0, transform=ds.window_transform(w))
    for k in ("tiled", "blockxsize", "blockysize", "compress"):
        profile.pop(k, None)
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)
    return dst


def scene_16bit(tmp_path: Path, w: int = 2600, h: int = 2200) -> Path:
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:h, 0:w]
    base = 1000 + 30 * x / w * 1000 + 5 * y / h * 1000
    data = np.stack([base + rng.integers(0, 500, (h, w)), base[::-1] + 200, base * 0.5 + 7000]).astype(np.uint16)
    return write_tif(tmp_path / "s16.tif", data, overviews=(2, 4, 8), tiled=True, blockxsize=256, blockysize=256)


def test_geotiff_8bit_region_equals_the_cut_file_and_map_coordinates(tmp_path) -> None:
    rng = np.random.default_rng(4)
    data = rng.integers(0, 255, (3, 900, 1300)).astype(np.uint8)
    scene = write_tif(tmp_path / "s8.tif", data, overviews=(2, 4), tiled=True, blockxsize=128, blockysize=128)
    win = (211, 97, 1011, 804)
    cut = cut_tif(scene, tmp_path / "cut8.tif", win)
    src = open_image(scene, region=list(win))
    ref = open_image(cut)
    assert src.size == ref.size == (800, 707)
    assert src.georef.coefficients == pytest.approx(ref.georef.coefficients, abs=1e-9)
    assert same_tiles(src, ref)
    # The same window in the raster's CRS (its corners on pixel edges) gives the same pixels.
    X0, Y1 = T * (win[0], win[3])
    X1, Y0 = T * (win[2], win[1])
    by_map = open_image(scene, region=[X0, Y1, X1, Y0], region_crs="EPSG:32633")
    assert by_map.region.pixels == win and same_tiles(by_map, ref)
    # ... and in WGS84: the bounding box of the transformed box covers it, a pixel or so larger.
    lon, lat = src.georef.pixel_to_wgs84([0, 800, 800, 0], [0, 0, 707, 707])
    wgs = open_image(scene, region=[lon.min(), lat.min(), lon.max(), lat.max()], region_crs="EPSG:4326")
    px = wgs.region.pixels
    assert px[0] <= win[0] and px[1] <= win[1] and px[2] >= win[2] and px[3] >= win[3]
    assert max(win[0] - px[0], win[1] - px[1], px[2] - win[2], px[3] - win[3]) <= 12


def test_geotiff_16bit_region_stretch_is_the_windows_own(tmp_path) -> None:
    scene = scene_16bit(tmp_path)
    win = (350, 100, 2550, 2200)  # 2200 px: statistics from a 1024-px read, where GDAL would use overviews
    cut = cut_tif(scene, tmp_path / "cut16.tif", win)
    src = open_image(scene, region=win)
    ref = open_image(cut)
    assert src.stretch_ranges == ref.stretch_ranges
    assert src.stretch_ranges != open_image(scene).stretch_ranges
    assert same_tiles(src, ref)


def test_region_outputs_are_in_the_scene_coordinates(tmp_path) -> None:
    from uhrbat.io.geo import pixel_boxes, tokens_geojson, tokens_pixel_json, tokens_with_boxes

    rng = np.random.default_rng(5)
    scene = write_tif(tmp_path / "s.tif", rng.integers(0, 255, (3, 600, 800)).astype(np.uint8))
    full = open_image(scene)
    src = open_image(scene, region=[300, 200, 636, 536])  # a 336-px window: 672 = 2x its side
    t = KeptToken(672, 1, 3, 5, 0.9, False, 0, [1 * 576 + 3 * 24 + 5])
    (box,) = pixel_boxes([t], src)
    local = (336 / 2 + 5 * 7, 3 * 7, 336 / 2 + 6 * 7, 4 * 7)  # tile 1 = top right; 7 px per cell
    assert box == pytest.approx([300 + local[0], 200 + local[1], 300 + local[2], 200 + local[3]])
    row = tokens_with_boxes([t], src)[0]
    assert row["box_crs"] == pytest.approx(
        [500000 + 0.5 * box[0], 6000000 - 0.5 * box[3], 500000 + 0.5 * box[2], 6000000 - 0.5 * box[1]]
    )
    fc = tokens_geojson([t], src)
    ring = np.array(fc["features"][0]["geometry"]["coordinates"][0])
    lon, lat = full.georef.pixel_to_wgs84([box[0], box[2], box[2], box[0]], [box[1], box[1], box[3], box[3]])
    for x, y in zip(lon, lat):  # the corners the scene's own georeference gives
        assert np.hypot(ring[:, 0] - x, ring[:, 1] - y).min() < 1e-8
    assert fc["image"]["size"] == [800, 600] and fc["image"]["region"]["pixels"] == [300, 200, 636, 536]
    assert fc["image"]["transform"] == pytest.approx(list(full.georef.coefficients))
    doc = tokens_pixel_json([t], src)
    assert doc["tokens"][0]["box_px"] == pytest.approx(box)


def test_geojson_region_in_wgs84_with_polygon_mask(tmp_path) -> None:
    rng = np.random.default_rng(6)
    scene = write_tif(tmp_path / "s.tif", rng.integers(0, 200, (3, 500, 700)).astype(np.uint8))
    full = open_image(scene)
    # A triangle over scene pixels (100, 100), (400, 100), (100, 300), given in lon/lat.
    lon, lat = full.georef.pixel_to_wgs84([100, 400, 100, 100], [100, 100, 300, 100])
    tri = {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [list(zip(lon, lat))]}}
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(json.dumps({"type": "FeatureCollection", "features": [tri]}))
    src = open_image(scene, region_file=aoi)
    assert src.region.pixels == (100, 100, 400, 300) and src.region.masked
    a = np.asarray(src.square(300))  # 300 x 200 window on a 300 square: rows 50..249
    assert tuple(a[240, 290]) == PAD_RGB  # bottom right of the window: outside the triangle
    assert tuple(a[60, 10]) != PAD_RGB  # top left corner: inside
    same = open_image(scene, region_geojson=json.dumps(tri))
    assert same.region.pixels == src.region.pixels
    # A legacy `crs` member: the polygon in the raster's UTM coordinates.
    X, Y = full.georef.pixel_to_crs([100, 400, 400, 100, 100], [100, 100, 300, 300, 100])
    utm = {
        "type": "Polygon",
        "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}},
        "coordinates": [list(zip(X, Y))],
    }
    rect = open_image(scene, region_geojson=utm)
    assert rect.region.pixels == (100, 100, 400, 300)
    cut = cut_tif(scene, tmp_path / "c.tif", (100, 100, 400, 300))
    assert same_tiles(rect, open_image(cut))  # a rectangle masks nothing


def test_raster_region_errors(tmp_path) -> None:
    scene = write_tif(tmp_path / "s.tif", np.zeros((1, 100, 200), np.uint8))
    with pytest.raises(
        RegionError, match=r"lies outside .*pixels 0,0,200,100; EPSG:32633 500000,5999950,500100,6000000"
    ):
        open_image(scene, region=[0, 0, 10, 10], region_crs="EPSG:32633")
    with pytest.raises(RegionError, match="cannot be transformed to the image CRS"):
        open_image(scene, region=[0, 0, 1e30, 1e30], region_crs="+proj=ortho +lat_0=0 +lon_0=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = write_tif(tmp_path / "p.tif", np.zeros((1, 50, 50), np.uint16), crs=None, transform=None)
    with pytest.raises(RegionError, match="is not georeferenced"):
        open_image(plain, region=[0, 0, 10, 10], region_crs="EPSG:4326")


def test_huge_png_region_is_streamed_through_gdal(tmp_path) -> None:
    from untrusted_corpus import png_bytes

    p = tmp_path / "big.png"
    p.write_bytes(png_bytes(20000, 20000, color=0, fill=0x40))  # 400 MP of one grey, 400 KB
    src = open_image(p, region=[15000, 12000, 15400, 12300], trust="untrusted")
    assert src.size == (400, 300) and src.region.pixels == (15000, 12000, 15400, 12300)
    a = np.asarray(src.square(400))
    assert (a[50:350] == 0x40).all() and (a[:50] == PAD_RGB).all()


@pytest.mark.slow
def test_region_of_a_20000_px_cog_reads_only_the_window(tmp_path) -> None:
    """Issue 21: a 2,000-px window of a generated 20,000^2 COG with overviews, read and tiled
    (672..4032, 228 tiles) in a fresh process, peaks well under 1.5 GB and gives the cut file's
    tiles; the same window in map coordinates gives the same pixels (benchmarks/region_memory.py)."""
    import subprocess
    import sys

    from big_scene import ORIGIN, PIXEL

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "region_memory.py"), "--keep", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert "tiles equal to the cut file: True" in out.stdout and "region peak < 1500 MB" in out.stdout
    scene = next(tmp_path.glob("scene_*_cog.tif"))
    x0, y0 = 9123, 9123
    box = [
        ORIGIN[0] + PIXEL * x0,
        ORIGIN[1] - PIXEL * (y0 + 2000),
        ORIGIN[0] + PIXEL * (x0 + 2000),
        ORIGIN[1] - PIXEL * y0,
    ]
    src = open_image(scene, region=box, region_crs="EPSG:32617")
    assert src.region.pixels == (x0, y0, x0 + 2000, y0 + 2000)


def test_region_of_a_jpeg_above_exact_max_pixels_is_read_through_gdal(tmp_path) -> None:
    """Above `exact_max_pixels` a PNG / JPEG region is a GDAL windowed read (forced here with a
    small limit): same window, same geometry; JPEG decoders may differ by a level or two."""
    from uhrbat.io.raster import RasterSource

    y, x = np.mgrid[0:600, 0:800]
    img = Image.fromarray(np.stack([x % 256, y % 256, (x // 4 + y // 4) % 256], -1).astype(np.uint8))
    img.save(tmp_path / "a.jpg", quality=95)
    src = open_image(tmp_path / "a.jpg", region=[100, 50, 500, 350], exact_max_pixels=10_000)
    assert isinstance(src, RasterSource) and src.size == (400, 300) and src.region.pixels == (100, 50, 500, 350)
    with Image.open(tmp_path / "a.jpg") as im:
        ref = np.asarray(im.convert("RGB").crop((100, 50, 500, 350))).astype(int)
    got = np.asarray(src.square(400))[50:350].astype(int)
    assert np.abs(got - ref).mean() < 1.0
