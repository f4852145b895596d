"""Map files (issue 23): the relevance map as a COG in the scene's CRS and a world file + CRS
sidecar for the overlay PNG, read back with rasterio and checked against the scene."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from uhrbat.errors import NotGeoreferencedError
from uhrbat.io.sources import open_image
from uhrbat.results import KeptToken

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import from_origin  # noqa: E402

from uhrbat.io.mapfiles import relevance_grid, write_overlay_georef, write_relevance_geotiff  # noqa: E402
from uhrbat.io.overlay import render_overlay  # noqa: E402


def scene(tmp_path, w=900, h=600):
    rng = np.random.default_rng(0)
    p = tmp_path / "scene.tif"
    with rasterio.open(
        p,
        "w",
        driver="GTiff",
        width=w,
        height=h,
        count=3,
        dtype="uint8",
        crs="EPSG:32617",
        transform=from_origin(404000.0, 3290000.0, 0.25, 0.25),
    ) as ds:
        ds.write(rng.integers(0, 255, (3, h, w)).astype(np.uint8))
    return p


def relevance(seed=1):
    rng = np.random.default_rng(seed)
    return {672: rng.random((4, 24, 24)).astype(np.float32), 1344: rng.random((16, 24, 24)).astype(np.float32)}


def test_relevance_geotiff_lands_on_the_scene(tmp_path) -> None:
    src = open_image(scene(tmp_path))
    rel = relevance()
    out = tmp_path / "rel.tif"
    info = write_relevance_geotiff(out, rel, src, tags={"question": "where?"})
    with rasterio.open(out) as ds:
        assert ds.crs.to_epsg() == 32617 and ds.count == 1 and ds.dtypes == ("float32",)
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.tags()["uhrbat_question"] == "where?" and ds.tags()["uhrbat_relevance_scale"] == "672"
        data = ds.read(1)
        b = ds.bounds
        t = ds.transform
    # 900 x 600 on a 900 square at 672: cells of 900 * 14 / 672 = 18.75 px, 48 x 48 over the square;
    # rows of the padding (oy = 150 px = 8 cells) are dropped.
    cell = 900 * 14 / 672
    assert t.a == pytest.approx(0.25 * cell) and t.e == pytest.approx(-0.25 * cell)
    assert data.shape == (32, 48) and info["shape"] == [32, 48]
    grid = rel[672].reshape(2, 2, 24, 24).transpose(0, 2, 1, 3).reshape(48, 48)
    assert np.array_equal(data, grid[8:40])
    # The raster covers the scene (404000..404225, 3289850..3290000) to within one cell.
    sb = (404000.0, 3290000.0 - 0.25 * 600, 404000.0 + 0.25 * 900, 3290000.0)
    assert b.left <= sb[0] + 1e-6 and b.right >= sb[2] - 1e-6 and b.bottom <= sb[1] + 1e-6 and b.top >= sb[3] - 1e-6
    for got, want in zip(b, sb):
        assert abs(got - want) < 0.25 * cell + 1e-6
    # Same cell grid as the token boxes: cell (row 8, col 0) of the square is the scene's top-left.
    assert (t.c, t.f) == pytest.approx((404000.0, 3290000.0 - 0.25 * (8 * cell - 150)))


def test_relevance_geotiff_of_a_region_is_in_the_scene_crs(tmp_path) -> None:
    p = scene(tmp_path)
    src = open_image(p, region=[300, 100, 636, 436])  # a 336-px window: one cell = 7 px at 672
    write_relevance_geotiff(tmp_path / "r.tif", relevance(), src)
    with rasterio.open(tmp_path / "r.tif") as ds:
        assert ds.shape == (48, 48)
        b = ds.bounds
    assert (b.left, b.top, b.right, b.bottom) == pytest.approx(
        (404000 + 0.25 * 300, 3290000 - 0.25 * 100, 404000 + 0.25 * 636, 3290000 - 0.25 * 436)
    )


def test_relevance_grid_rejects_bad_maps() -> None:
    with pytest.raises(ValueError, match="return_relevance"):
        relevance_grid({}, (10, 10))
    with pytest.raises(ValueError, match="no relevance at scale 999"):
        relevance_grid(relevance(), (10, 10), scale=999)
    with pytest.raises(ValueError, match="square grid"):
        relevance_grid({672: np.zeros((3, 24, 24))}, (10, 10))


def test_overlay_world_file_places_the_view_on_the_scene(tmp_path) -> None:
    p = scene(tmp_path)
    src = open_image(p)
    toks = [KeptToken(672, 0, 12, 12, 0.9, False, 0, [12 * 24 + 12])]
    png = tmp_path / "overlay.png"
    ov = render_overlay(src, toks, relevance(), "q?", "a", png, max_side=450)
    world, aux = write_overlay_georef(png, ov, src)
    assert world.name == "overlay.pgw" and aux.name == "overlay.png.aux.xml"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(png) as ds:
            t, crs = ds.transform, ds.crs
    assert crs.to_epsg() == 32617
    # 450 px for 900 scene px: 0.5 m per overlay pixel; the view box spans the scene.
    assert t.a == pytest.approx(0.5) and t.e == pytest.approx(-0.5) and t.b == 0 and t.d == 0
    x0, y0, x1, y1 = ov.view_box
    left, top = t * (x0, y0)
    right, bottom = t * (x1, y1)
    assert (left, top, right, bottom) == pytest.approx((404000.0, 3290000.0, 404225.0, 3289850.0), abs=0.5)
    # A token box drawn in the overlay sits where its box_crs says.
    from uhrbat.io.geo import tokens_with_boxes

    bx = tokens_with_boxes(toks, src)[0]["box_crs"]
    col = (bx[0] - t.c) / t.a
    assert x0 <= col < x1


def test_map_files_need_a_georeference(tmp_path) -> None:
    Image.new("RGB", (64, 48), (9, 9, 9)).save(tmp_path / "a.png")
    src = open_image(tmp_path / "a.png")
    with pytest.raises(NotGeoreferencedError, match="relevance GeoTIFF: it has no georeference"):
        write_relevance_geotiff(tmp_path / "r.tif", relevance(), src)
    ov = render_overlay(src, [], None, "q", "a", None)
    with pytest.raises(NotGeoreferencedError, match="georeferenced overlay"):
        write_overlay_georef(tmp_path / "o.png", ov, src)
    assert not (tmp_path / "r.tif").exists() and not (tmp_path / "o.pgw").exists()
