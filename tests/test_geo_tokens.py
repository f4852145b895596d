"""Kept tokens -> pixel boxes in the original image -> CRS / WGS84 polygons -> GeoJSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uhrbat.io.geo import (
    GeoRef,
    image_cells,
    join_rects,
    pixel_boxes,
    square_cells,
    token_pixel_boxes,
    token_regions,
    tokens_geojson,
    tokens_pixel_json,
    tokens_with_boxes,
    write_geojson,
)
from uhrbat.io.sources import open_image
from uhrbat.results import KeptToken

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
NEON = ASSETS / "aerial" / "neon_osbs_400.tif"
RMNP = ASSETS / "aerial" / "rmnp_rgb_geotiff.tif"


def tok(
    scale: int, tile: int, row: int, col: int, merged: bool = False, members=None, score: float = 0.5, group: int = 0
) -> KeptToken:
    flat = tile * 576 + row * 24 + col
    return KeptToken(scale, tile, row, col, score, merged, group, list(members) if members else [flat])


class PixelCRS:
    """A source whose CRS units are its pixels (identity transform): CRS rings == pixel boxes."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size
        self.georef = GeoRef("EPSG:32633", (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))


def expected_box(scale: int, tile: int, row: int, col: int, W: int, H: int):
    """The geometry of the brief, written out once more by hand."""
    L = max(W, H)
    g = scale // 336
    r, c = divmod(tile, g)
    x0, y0 = (c * 24 + col) * 14 * L / scale - (L - W) // 2, (r * 24 + row) * 14 * L / scale - (L - H) // 2
    x1, y1 = (c * 24 + col + 1) * 14 * L / scale - (L - W) // 2, (r * 24 + row + 1) * 14 * L / scale - (L - H) // 2
    x0, x1 = min(max(x0, 0), W), min(max(x1, 0), W)
    y0, y1 = min(max(y0, 0), H), min(max(y1, 0), H)
    return None if x1 <= x0 or y1 <= y0 else (x0, y0, x1, y1)


# ----------------------------------------------------------------------------- pixel geometry
def test_square_cells() -> None:
    cells = square_cells(1344, [0, 23, 24, 576, 4 * 576 + 25])
    assert cells.tolist() == [[0, 0, 14, 14], [322, 0, 336, 14], [0, 14, 14, 28], [336, 0, 350, 14], [14, 350, 28, 364]]
    with pytest.raises(ValueError, match="out of range"):
        square_cells(672, [4 * 576])


@pytest.mark.parametrize("W, H", [(800, 400), (400, 800), (1000, 1000), (1, 2000), (3000, 7)])
def test_boxes_match_hand_geometry(W, H) -> None:
    rng = np.random.default_rng(W * 7 + H)
    toks = []
    for scale in (672, 1344, 2688, 4032):
        g = scale // 336
        for _ in range(40):
            toks.append(tok(scale, int(rng.integers(g * g)), int(rng.integers(24)), int(rng.integers(24))))
    boxes = pixel_boxes(toks, (W, H))
    for t, box in zip(toks, boxes):
        exp = expected_box(t.scale, t.tile, t.row, t.col, W, H)
        if exp is None:
            assert box is None
        else:
            assert box == pytest.approx(exp, abs=1e-3)
    assert token_pixel_boxes is pixel_boxes


def test_padding_tokens_are_dropped_and_straddling_ones_clipped() -> None:
    W, H = 800, 400  # square 800, image rows 200..600 of it
    top = tok(672, 0, 0, 0)  # square y 0..16.7 -> all padding
    edge = tok(672, 0, 11, 0)  # square y 183.3..200 -> padding (ends exactly at the image)
    straddle = tok(672, 0, 12, 3)  # square y 200..216.7 -> image rows 0..16.7
    bottom = tok(672, 3, 23, 23)  # square y 783..800 -> padding
    boxes = pixel_boxes([top, edge, straddle, bottom], (W, H))
    assert boxes[0] is None and boxes[1] is None and boxes[3] is None
    k = 800 / 672
    assert boxes[2] == pytest.approx([3 * 14 * k, 0, 4 * 14 * k, 14 * k], abs=1e-3)
    regs = token_regions([top, straddle], (W, H))
    assert [r.index for r in regs] == [1]
    cells, keep = image_cells(672, [0, 12 * 24], (W, H))
    assert keep.tolist() == [False, True]


def test_merged_tokens_keep_member_cells() -> None:
    members = [0 * 576 + 5 * 24 + 3, 0 * 576 + 5 * 24 + 4, 0 * 576 + 5 * 24 + 5, 3 * 576 + 20 * 24 + 20]
    t = tok(672, 0, 5, 3, merged=True, members=members, group=7)
    (reg,) = token_regions([t], (672, 672))
    assert reg.n_members == 4 and reg.merged
    assert reg.box == pytest.approx((3 * 14, 5 * 14, (24 + 21) * 14, (24 + 21) * 14))
    assert reg.rects == [(42.0, 70.0, 84.0, 84.0), (616.0, 616.0, 630.0, 630.0)]  # row run joined
    assert join_rects(np.array([[0, 0, 1, 1], [1, 0, 2, 1], [3, 0, 4, 1]], float)) == [(0, 0, 2, 1), (3, 0, 4, 1)]
    fc = tokens_geojson([t], PixelCRS((672, 672)), coordinates="crs")
    geom = fc["features"][0]["geometry"]
    assert geom["type"] == "MultiPolygon" and len(geom["coordinates"]) == 2
    assert fc["features"][0]["properties"]["status"] == "merged"
    bbox = tokens_geojson([t], PixelCRS((672, 672)), coordinates="crs", merged_geometry="bbox")
    assert bbox["features"][0]["geometry"]["type"] == "Polygon"
    doc = tokens_pixel_json([t], (672, 672))
    assert doc["tokens"][0]["rects_px"] == [list(r) for r in reg.rects]


def test_tokens_with_boxes_for_json() -> None:
    rows = tokens_with_boxes([tok(672, 0, 0, 0), tok(672, 1, 0, 0)], (336, 672))
    assert rows[0]["box_px"] is None  # over the left padding (ox = 168)
    assert rows[1]["box_px"] == pytest.approx([336 - 168, 0, 350 - 168, 14])
    assert rows[1]["scale"] == 672 and "members" in rows[1]


# ----------------------------------------------------------------------------- token geometry
def expected_box_geometry(scale: int, tile: int, row: int, col: int, W: int, H: int, tile_px: int, patch: int):
    """`expected_box` for any tile / patch side, written out by hand."""
    n = tile_px // patch
    L = max(W, H)
    g = scale // tile_px
    r, c = divmod(tile, g)
    ox, oy = (L - W) // 2, (L - H) // 2
    x0, y0 = (c * n + col) * patch * L / scale - ox, (r * n + row) * patch * L / scale - oy
    x1, y1 = x0 + patch * L / scale, y0 + patch * L / scale
    x0, x1 = min(max(x0, 0), W), min(max(x1, 0), W)
    y0, y1 = min(max(y0, 0), H), min(max(y1, 0), H)
    return None if x1 <= x0 or y1 <= y0 else (x0, y0, x1, y1)


@pytest.mark.parametrize("tile_px, patch", [(224, 14), (336, 16), (448, 32)])
def test_boxes_follow_a_non_default_token_geometry(tile_px, patch) -> None:
    """A 224/14 (16 tokens per side), 336/16 (21) or 448/32 (14) tower: boxes, flat positions,
    merged members and GeoJSON follow the tokens' geometry, never CLIP-336/14's."""
    from uhrbat.configuration import TokenGeometry

    geo = TokenGeometry(tile_px, patch)
    n = geo.tokens_per_side
    W, H = 1000, 700
    rng = np.random.default_rng(tile_px + patch)
    toks = []
    for scale in (tile_px * 2, tile_px * 3, tile_px * 5):
        g = scale // tile_px
        for _ in range(30):
            t, r, c = int(rng.integers(g * g)), int(rng.integers(n)), int(rng.integers(n))
            toks.append(
                KeptToken(scale, t, r, c, 0.5, False, 0, [geo.flat(t, r, c)], tile_size=tile_px, patch_size=patch)
            )
    for t, box in zip(toks, pixel_boxes(toks, (W, H))):
        exp = expected_box_geometry(t.scale, t.tile, t.row, t.col, W, H, tile_px, patch)
        assert (box is None) if exp is None else box == pytest.approx(exp, abs=1e-3)
    # Records without members use (tile, row, col) through the same geometry.
    bare = KeptToken(tile_px * 2, 3, n - 1, 0, 0.5, False, 0, [], tile_size=tile_px, patch_size=patch)
    assert pixel_boxes([bare], (W, H))[0] == pytest.approx(
        expected_box_geometry(tile_px * 2, 3, n - 1, 0, W, H, tile_px, patch), abs=1e-3
    )
    # GeoJSON rings (in a CRS whose units are pixels) are the same boxes.
    fc = tokens_geojson(toks, PixelCRS((W, H)), coordinates="crs")
    for feat in fc["features"]:
        t = toks[feat["properties"]["index"]]
        x0, y0, x1, y1 = expected_box_geometry(t.scale, t.tile, t.row, t.col, W, H, tile_px, patch)
        ring = feat["geometry"]["coordinates"][0]
        assert ring[0] == pytest.approx([x0, y0], abs=1e-3) and ring[2] == pytest.approx([x1, y1], abs=1e-3)
    # Positions past the scale's token count (with this geometry) are rejected.
    with pytest.raises(ValueError, match="out of range"):
        square_cells(tile_px * 2, [4 * geo.tokens_per_tile], geo)


def test_pipeline_tokens_carry_the_config_geometry(tmp_path) -> None:
    """End to end with a 224-px / 14-px tower (16 x 16 tokens per tile): the pipeline's kept
    tokens carry the config's geometry, so their GeoJSON boxes are right."""
    from uhrbat.pipeline import UhrBatPipeline
    from uhrbat.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(
        tmp_path / "ck",
        scales=[448, 896],
        base_scale=448,
        budgets=[6, 12],
        tile_size=224,
        clip_image_size=224,
        clip_layers=2,
    )
    pipe = UhrBatPipeline.from_pretrained(ckpt, selector="topk")
    assert pipe.processor.image_processor.tokens_per_side == 16 and pipe.model.config.tokens_per_side == 16
    image = Image.new("RGB", (500, 300), (10, 120, 40))
    res = pipe.ask(image, "Where is the field?", max_new_tokens=2)
    assert len(res.tokens) == 18
    assert all((t.tile_size, t.patch_size) == (224, 14) and t.row < 16 and t.col < 16 for t in res.tokens)
    assert all(t.members == [t.tile * 256 + t.row * 16 + t.col] for t in res.tokens)
    doc = tokens_pixel_json(res.tokens, res.image_size)
    for entry in doc["tokens"]:
        t = res.tokens[entry["index"]]
        exp = expected_box_geometry(t.scale, t.tile, t.row, t.col, 500, 300, 224, 14)
        assert entry["box_px"] == pytest.approx(list(exp), abs=1e-3)
    assert len(doc["tokens"]) + doc["tokens_in_padding_dropped"] == 18


# ----------------------------------------------------------------------------- georeference
def _ring_ok(ring) -> None:
    assert ring[0] == ring[-1] and len(ring) >= 4
    xs, ys = np.array(ring).T
    assert np.sum(xs[:-1] * ys[1:] - xs[1:] * ys[:-1]) > 0  # counter-clockwise (RFC 7946)


def test_geojson_on_geographic_raster_lands_on_the_transform(tmp_path) -> None:
    rasterio = pytest.importorskip("rasterio")
    src = open_image(RMNP)
    with rasterio.open(RMNP) as ds:
        a, c, e, f = ds.transform.a, ds.transform.c, ds.transform.e, ds.transform.f
        assert ds.transform.b == 0 and ds.transform.d == 0  # north-up
        W, H = ds.width, ds.height
    toks = [tok(672, 0, 12, 5), tok(1344, 5, 3, 20), tok(4032, 77, 23, 0), tok(672, 0, 0, 0)]
    out = tmp_path / "kept.geojson"
    fc = write_geojson(out, toks, src, properties={"question": "where?"})
    on_disk = json.loads(out.read_text())
    assert on_disk == fc and on_disk["type"] == "FeatureCollection" and "crs" not in on_disk
    assert fc["coordinate_space"] == "wgs84" and fc["question"] == "where?"
    assert fc["tokens_in_padding_dropped"] == 1 and len(fc["features"]) == 3
    for feat in fc["features"]:
        t = toks[feat["properties"]["index"]]
        x0, y0, x1, y1 = expected_box(t.scale, t.tile, t.row, t.col, W, H)
        ring = feat["geometry"]["coordinates"][0]
        _ring_ok(ring)
        lon = sorted({round(p[0], 7) for p in ring})
        lat = sorted({round(p[1], 7) for p in ring})
        assert lon == pytest.approx(sorted([c + a * x0, c + a * x1]), abs=1e-7)
        assert lat == pytest.approx(sorted([f + e * y0, f + e * y1]), abs=1e-7)
        assert -107 < lon[0] < -105 and 40 < lat[0] < 41  # Rocky Mountain NP
        p = feat["properties"]
        assert set(p) >= {"scale", "score", "kept", "merged", "group", "tile", "row", "col", "box_px", "box_crs"}


def test_geojson_on_utm_raster_matches_pyproj() -> None:
    rasterio = pytest.importorskip("rasterio")
    pyproj = pytest.importorskip("pyproj")
    src = open_image(NEON)
    with rasterio.open(NEON) as ds:
        T = ds.transform
        epsg = ds.crs.to_epsg()
    to_wgs = pyproj.Transformer.from_crs(epsg, 4326, always_xy=True)
    t = tok(2688, 9, 4, 17)  # g = 8: tile row 1, col 1
    fc = tokens_geojson([t], src)
    ring = fc["features"][0]["geometry"]["coordinates"][0]
    x0, y0, x1, y1 = expected_box(2688, 9, 4, 17, 400, 400)
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    expected = [to_wgs.transform(*(T * corner)) for corner in corners]
    for lon, lat in expected:
        assert min(abs(lon - p[0]) + abs(lat - p[1]) for p in ring) < 1e-9
    _ring_ok(ring)
    # The image-CRS polygon is the affine transform of the pixel box.
    crs_fc = tokens_geojson([t], src, coordinates="crs")
    crs_ring = crs_fc["features"][0]["geometry"]["coordinates"][0]
    for X, Y in (T * corner for corner in corners):
        assert min(abs(X - p[0]) + abs(Y - p[1]) for p in crs_ring) < 1e-3
    assert crs_fc["coordinate_space"] == "crs" and "EPSG:32617" in crs_fc["coordinate_note"]


def test_images_without_georeference_never_get_a_geojson_file(tmp_path) -> None:
    """Issue 23: pixel coordinates in a .geojson are read as lon/lat by GIS tools. Refused with a
    pointer to --json; the pixel file is a different, clearly named format."""
    from uhrbat.errors import NotGeoreferencedError
    from uhrbat.io.geo import PIXEL_JSON_SUFFIX, kept_tokens_document, map_ready, write_pixel_json

    Image.new("RGB", (300, 200), (1, 2, 3)).save(tmp_path / "a.png")
    src = open_image(tmp_path / "a.png")
    for call in (
        lambda: map_ready(src),
        lambda: write_geojson(tmp_path / "k.geojson", [tok(672, 2, 0, 0)], src),
        lambda: tokens_geojson([tok(672, 0, 0, 0)], src, coordinates="wgs84"),
        lambda: tokens_geojson([tok(672, 0, 0, 0)], src, coordinates="crs"),
    ):
        with pytest.raises(NotGeoreferencedError, match="no georeference.*--json") as e:
            call()
        assert "\n" not in str(e.value) and str(tmp_path / "a.png") in str(e.value)
    assert not (tmp_path / "k.geojson").exists()
    with pytest.raises(ValueError, match="pixel coordinates are written by tokens_pixel_json"):
        tokens_geojson([tok(672, 0, 0, 0)], src, coordinates="pixel")
    out = tmp_path / ("k" + PIXEL_JSON_SUFFIX)
    doc = write_pixel_json(out, [tok(672, 2, 0, 0)], src, properties={"question": "q?"})
    assert json.loads(out.read_text()) == doc
    assert doc["format"] == "uhrbat.pixel-boxes/1" and "type" not in doc and "features" not in doc
    assert doc["coordinate_space"] == "pixel" and "NOT longitude/latitude" in doc["coordinate_note"]
    assert doc["question"] == "q?" and doc["image"]["size"] == [300, 200]
    assert doc["tokens"][0]["box_px"] == pytest.approx(list(expected_box(672, 2, 0, 0, 300, 200)), abs=1e-3)
    got, suffix = kept_tokens_document([tok(672, 2, 0, 0)], src)
    assert suffix == PIXEL_JSON_SUFFIX and got["format"] == doc["format"]
    gj, suffix = kept_tokens_document([tok(672, 2, 0, 0)], open_image(NEON))
    assert suffix == ".geojson" and gj["type"] == "FeatureCollection" and gj["coordinate_space"] == "wgs84"


def test_crs_geojson_names_its_crs_and_box_crs_keeps_full_precision(tmp_path) -> None:
    pytest.importorskip("rasterio")
    src = open_image(NEON)
    t = tok(2688, 9, 4, 17)
    fc = write_geojson(tmp_path / "crs.geojson", [t], src, coordinates="crs")
    assert fc["crs"] == {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32617"}}
    box = fc["features"][0]["properties"]["box_crs"]
    T = src.georef.coefficients
    x0, y0, x1, y1 = expected_box(2688, 9, 4, 17, 400, 400)
    assert box == [T[2] + T[0] * x0, T[5] + T[4] * y1, T[2] + T[0] * x1, T[5] + T[4] * y0]  # not rounded
    assert any(round(v, 4) != v for v in box)


def test_rotated_transform_polygon() -> None:
    from affine import Affine

    geo = GeoRef(
        crs="EPSG:32633", transform=Affine.translation(500000, 6000000) * Affine.rotation(30) * Affine.scale(2, -2)
    )
    X, Y = geo.pixel_to_crs([0, 10], [0, 0])
    assert np.hypot(X[1] - X[0], Y[1] - Y[0]) == pytest.approx(20)
    lon, lat = geo.pixel_to_wgs84([0], [0])
    assert 14 < lon[0] < 16 and 54 < lat[0] < 55
