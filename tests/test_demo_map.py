"""The demo's map view (issue 21): georeferenced uploads kept for a slippy map, Web-Mercator tiles
cut from the upload itself, questions about a kept scene and a box drawn on it.

HTTP tests use the deterministic fake pipeline (`serving_fake`); the last test drives the real
page in headless Chromium (the helpers of `test_demo_chromium`): upload a GeoTIFF, wait for the
map's tiles, draw a box with the mouse, and check that the answer's kept tokens lie in the box.
"""

from __future__ import annotations

import io
import json
import math
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the demo needs fastapi (pip install fastapi uvicorn python-multipart)")
pytest.importorskip("multipart", reason="the demo needs python-multipart")
rasterio = pytest.importorskip("rasterio")
pytest.importorskip("rio_tiler", reason="the map view needs rio-tiler (pip install 'uhrbat[serve]')")
from fastapi.testclient import TestClient
from rasterio.warp import transform as warp_transform
from rasterio.warp import transform_bounds

from serving_fake import FakePipeline, demo_app

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "aerial"
NEON = ASSETS / "neon_osbs_400.tif"  # 400x400, EPSG:32617 (UTM), uint8 RGB
RMNP = ASSETS / "rmnp_rgb_geotiff.tif"  # 485x373, EPSG:4326


def _tms():
    import morecantile

    return morecantile.tms.get("WebMercatorQuad")


@pytest.fixture()
def client():
    fake = FakePipeline()
    with TestClient(demo_app(fake, model_name="fake", overlay_max_side=300)) as c:
        yield c, fake


def _upload(c: TestClient, path: Path, name: str | None = None):
    return c.post("/api/map", files={"image": (name or path.name, path.read_bytes(), "image/tiff")})


def _png_of(r) -> Image.Image:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(r.content))


@pytest.mark.parametrize("path", [NEON, RMNP], ids=["utm", "wgs84"])
def test_upload_gives_wgs84_bounds_zooms_and_tiles(client, path) -> None:
    c, fake = client
    r = _upload(c, path)
    assert r.status_code == 200, r.text
    info = r.json()
    with rasterio.open(path) as ds:
        expected = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)
        size, crs = [ds.width, ds.height], ds.crs.to_string()
    assert info["georeferenced"] is True and info["name"] == path.name
    assert info["size"] == size and info["crs"] == crs
    assert np.allclose(info["bounds"], expected, rtol=0, atol=1e-9)
    assert info["minzoom"] < info["maxzoom"] and info["tile_size"] == 256
    assert info["tiles"] == f"api/map/{info['id']}/tiles/{{z}}/{{x}}/{{y}}.png" and len(info["id"]) == 32
    assert fake.calls == []  # opening a scene for the map runs no model

    # Every tile over the scene at its coarsest zoom is a 256-px RGBA PNG.
    z = info["minzoom"]
    tiles = list(_tms().tiles(*info["bounds"], zooms=[z]))
    assert tiles
    for t in tiles:
        im = _png_of(c.get(f"/api/map/{info['id']}/tiles/{z}/{t.x}/{t.y}.png"))
        assert im.size == (256, 256) and im.mode == "RGBA"


def test_a_tile_shows_the_scene_pixels_where_they_are(client) -> None:
    """The scene's centre pixel, found on the finest tile by its map position, has the raster's colour."""
    c, _ = client
    info = _upload(c, NEON).json()
    with rasterio.open(NEON) as ds:
        rgb = ds.read()  # (3, H, W) uint8: shown as it is (no stretch for 8-bit data)
        col, row = 211, 187
        X, Y = ds.xy(row, col)  # the pixel's centre in the raster CRS
        (lon,), (lat,) = warp_transform(ds.crs, "EPSG:4326", [X], [Y])
    tms, z = _tms(), info["maxzoom"]
    t = tms.tile(lon, lat, z)
    b = tms.xy_bounds(t)
    mx, my = tms.xy(lon, lat)
    px = int((mx - b.left) / (b.right - b.left) * 256)
    py = int((b.top - my) / (b.top - b.bottom) * 256)
    im = np.asarray(_png_of(c.get(f"/api/map/{info['id']}/tiles/{z}/{t.x}/{t.y}.png")))
    got = im[py, px]
    assert got[3] == 255  # inside the scene: opaque
    near = rgb[:, row - 2 : row + 3, col - 2 : col + 3].reshape(3, -1)  # resampling mixes neighbours
    assert np.all(got[:3] >= near.min(axis=1).astype(int) - 2) and np.all(got[:3] <= near.max(axis=1).astype(int) + 2)
    # off the scene's corner the same zoom is transparent (the mask), not black
    corner = tms.tile(info["bounds"][0], info["bounds"][3], z)
    im = np.asarray(_png_of(c.get(f"/api/map/{info['id']}/tiles/{z}/{corner.x}/{corner.y}.png")))
    assert im[0, 0, 3] == 0 and im[..., 3].max() == 255


def test_16_bit_tiles_use_the_models_percentile_stretch(client, tmp_path) -> None:
    """A 16-bit scene is shown as the model sees it: each band stretched between the reader's
    percentiles, not the dtype's range (which would show a black map)."""
    from rasterio.transform import from_origin

    from uhrbat.io.sources import open_image

    h = w = 300
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    bands = np.stack([1000 + 8 * xx, 1200 + 6 * yy, 900 + 3 * (xx + yy)]).astype(np.uint16)
    path = tmp_path / "sixteen.tif"
    transform = from_origin(500_000, 5_000_000, 0.5, 0.5)
    profile = dict(driver="GTiff", width=w, height=h, count=3, dtype="uint16", crs="EPSG:32633", transform=transform)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(bands)
    info = _upload(c := client[0], path).json()
    assert info["georeferenced"] is True
    seen = np.asarray(open_image(path, trust="untrusted").reduced(1.0).convert("RGB"))  # the model's pixels
    with rasterio.open(path) as ds:
        col, row = 120, 170
        (lon,), (lat,) = warp_transform(ds.crs, "EPSG:4326", *[[v] for v in ds.xy(row, col)])
    tms, z = _tms(), info["maxzoom"]
    t = tms.tile(lon, lat, z)
    b, (mx, my) = tms.xy_bounds(t), tms.xy(lon, lat)
    px = int((mx - b.left) / (b.right - b.left) * 256)
    py = int((b.top - my) / (b.top - b.bottom) * 256)
    got = np.asarray(_png_of(c.get(f"/api/map/{info['id']}/tiles/{z}/{t.x}/{t.y}.png")))[py, px]
    near = seen[row - 2 : row + 3, col - 2 : col + 3].reshape(-1, 3)
    assert got[3] == 255
    assert np.all(got[:3] >= near.min(axis=0).astype(int) - 2) and np.all(got[:3] <= near.max(axis=0).astype(int) + 2)
    assert 40 < int(got[:3].mean()) < 230  # stretched: neither black nor white


def test_palette_tiles_show_the_palette_colours(client, tmp_path) -> None:
    """A class map keeps its classes: tiles show only the palette colours of classes present
    (nearest resampling: no blend of class 0 and 3 may turn into class 1 or 2)."""
    from rasterio.transform import from_origin

    palette = {0: (0, 0, 0, 255), 1: (230, 30, 30, 255), 2: (20, 200, 60, 255), 3: (30, 60, 220, 255)}
    yy, xx = np.mgrid[0:200, 0:200]
    classes = np.where((yy // 25 + xx // 25) % 2 == 0, 0, 3).astype(np.uint8)  # a checkerboard of 0 and 3
    path = tmp_path / "classes.tif"
    transform = from_origin(600_000, 4_000_000, 1.0, 1.0)
    with rasterio.open(path, "w", driver="GTiff", width=200, height=200, count=1, dtype="uint8", crs="EPSG:32633",
                       transform=transform) as ds:  # fmt: skip
        ds.write(classes, 1)
        ds.write_colormap(1, palette)
    c = client[0]
    info = _upload(c, path).json()
    assert info["georeferenced"] is True
    tms = _tms()
    for z in range(info["minzoom"], info["maxzoom"] + 1):
        for t in tms.tiles(*info["bounds"], zooms=[z]):
            px = np.asarray(_png_of(c.get(f"/api/map/{info['id']}/tiles/{z}/{t.x}/{t.y}.png")).convert("RGBA"))
            colours = {tuple(int(v) for v in p) for p in px[px[..., 3] == 255]}
            assert colours <= {palette[0], palette[3]}, (z, colours - {palette[0], palette[3]})
    with rasterio.open(path) as ds:  # and a known pixel has its class's colour
        (lon,), (lat,) = warp_transform(ds.crs, "EPSG:4326", *[[v] for v in ds.xy(37, 62)])  # class 3
    t = tms.tile(lon, lat, z)
    b, (mx, my) = tms.xy_bounds(t), tms.xy(lon, lat)
    px = np.asarray(_png_of(c.get(f"/api/map/{info['id']}/tiles/{z}/{t.x}/{t.y}.png")).convert("RGBA"))
    assert (
        tuple(px[int((b.top - my) / (b.top - b.bottom) * 256), int((mx - b.left) / (b.right - b.left) * 256)])
        == (palette[3])
    )


def test_tile_requests_the_scene_cannot_answer_are_404(client) -> None:
    c, _ = client
    info = _upload(c, NEON).json()
    sid, lo, hi = info["id"], info["minzoom"], info["maxzoom"]
    tms = _tms()
    inside = tms.tile((info["bounds"][0] + info["bounds"][2]) / 2, (info["bounds"][1] + info["bounds"][3]) / 2, hi)
    assert c.get(f"/api/map/{sid}/tiles/{hi}/{inside.x}/{inside.y}.png").status_code == 200
    cases = {
        "unknown scene": f"/api/map/{'0' * 32}/tiles/{hi}/{inside.x}/{inside.y}.png",
        "finer than the scene": f"/api/map/{sid}/tiles/{hi + 1}/{inside.x * 2}/{inside.y * 2}.png",
        "coarser than the zoom range": f"/api/map/{sid}/tiles/{lo - 1}/{inside.x >> (hi - lo + 1)}/"
        f"{inside.y >> (hi - lo + 1)}.png",
        "off the scene": f"/api/map/{sid}/tiles/{hi}/{inside.x + 40}/{inside.y}.png",
        "off the grid": f"/api/map/{sid}/tiles/{hi}/{2**hi}/{inside.y}.png",
        "negative": f"/api/map/{sid}/tiles/{hi}/-1/{inside.y}.png",
    }
    for what, url in cases.items():
        r = c.get(url)
        assert r.status_code == 404, (what, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] == "not_found" and err["message"], what
    assert c.get(f"/api/map/..%2F{sid}/tiles/{hi}/{inside.x}/{inside.y}.png").status_code == 404  # no route
    r = c.get(f"/api/map/{sid}/tiles/{hi}/x/{inside.y}.png")
    assert r.status_code == 400 and "error" in r.json()  # not a number: the app's one error format
    assert "zooms 19 to 20" in c.get(cases["finer than the scene"]).json()["error"]["message"]


def test_uploads_the_map_cannot_show_keep_the_image_view(client, tmp_path) -> None:
    c, _ = client
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, format="PNG")
    r = c.post("/api/map", files={"image": ("field.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["georeferenced"] is False and "'field.png' is not georeferenced" in body["reason"]
    assert "id" not in body and "/tmp" not in body["reason"]
    # a plain TIFF without georeference: the same answer
    plain = tmp_path / "plain.tif"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(plain)
    body = _upload(c, plain).json()
    assert body["georeferenced"] is False and "not georeferenced" in body["reason"]
    # bytes the untrusted reader refuses are the same 400 a question gets, naming the file
    r = c.post("/api/map", files={"image": ("notes.tif", b"not an image at all", "image/tiff")})
    assert r.status_code == 400 and "'notes.tif'" in r.json()["error"]["message"]
    r = c.post("/api/map", files={"image": ("empty.tif", b"", "image/tiff")})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]


def test_the_store_keeps_a_bounded_number_of_scenes() -> None:
    from uhrbat.serving.tiles import MapScenes

    maps = MapScenes(max_scenes=2)
    fake = FakePipeline()
    with TestClient(demo_app(fake, model_name="fake", map_scenes=maps)) as c:
        ids = [_upload(c, NEON).json()["id"] for _ in range(3)]
        assert len(set(ids)) == 3  # the same bytes twice are two scenes, with their own ids
        z = _upload(c, NEON).json()["maxzoom"]  # a fourth: the two oldest are gone
        t = _tms().tile(-81.98989, 29.6925, z)
        codes = [c.get(f"/api/map/{sid}/tiles/{z}/{t.x}/{t.y}.png").status_code for sid in ids]
        assert codes == [404, 404, 200]
        files = sorted(p.name for p in Path(maps._root).iterdir())
        assert len(files) == 2 and ids[2] + ".tif" in files  # evicted scenes' files are removed too
        r = c.post("/api/ask", data={"scene": ids[0], "question": "q"})
        assert r.status_code == 404 and "upload the image again" in r.json()["error"]["message"]
    maps.close()
    assert not Path(maps._root).exists()


def test_a_question_about_a_kept_scene_needs_no_second_upload(client) -> None:
    c, fake = client
    info = _upload(c, NEON).json()
    r = c.post("/api/ask", data={"scene": info["id"], "question": "How many trees?", "budgets": "4,5,6,7"})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["answer"] == FakePipeline.answer_for("How many trees?") and data["georeferenced"] is True
    assert fake.calls[-1]["size"] == (400, 400)
    assert data["scale_colours"] == {"672": "#0072b2", "1344": "#009e73", "2688": "#56b4e9", "4032": "#cc79a7"}
    doc = c.get("/" + data["geojson_url"]).json()
    assert doc["image"]["path"] == NEON.name and doc["features"]  # the upload's name, never the private path
    # a second question reads the same bytes: the scene cache recognises them
    r = c.post("/api/ask", data={"scene": info["id"], "question": "And now?", "budgets": "4,5,6,7"})
    assert r.json()["cache"] == "hit" and r.json()["reuse"] == {"features": "hit", "groups": "hit"}
    # the kept scene outlives its questions: tiles still load
    t = _tms().tile(-81.98989, 29.6925, info["maxzoom"])
    assert c.get(f"/api/map/{info['id']}/tiles/{info['maxzoom']}/{t.x}/{t.y}.png").status_code == 200
    both = c.post(
        "/api/ask",
        data={"scene": info["id"], "question": "q"},
        files={"image": ("x.tif", NEON.read_bytes(), "image/tiff")},
    )
    assert both.status_code == 400 and "not both" in both.json()["error"]["message"]


def test_a_box_outside_the_scene_is_one_clear_error(client) -> None:
    c, fake = client
    info = _upload(c, NEON).json()
    w, s, e, n = info["bounds"]
    r = c.post(
        "/api/ask",
        data={
            "scene": info["id"],
            "question": "q",
            "region": f"{e + 0.01},{s},{e + 0.02},{n}",
            "region_crs": "EPSG:4326",
        },
    )
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "outside" in message and "\n" not in message and fake.calls == []


def test_the_page_loads_its_map_scripts_from_the_package(client) -> None:
    c, _ = client
    page = c.get("/").text
    import re

    refs = re.findall(r'(?:src|href)="([^"#]+)"', page)
    assert refs and all(not r.startswith(("http:", "https:", "//")) for r in refs), refs
    for ref in refs:
        r = c.get("/" + ref)
        assert r.status_code == 200 and len(r.content) > 1000, ref
    assert "L.version" not in page  # Leaflet itself is the vendored file, not inlined
    js = c.get("/static/vendor/leaflet-1.9.4/leaflet.js").text
    assert '"1.9.4"' in js or 'version = "1.9.4"' in js or "1.9.4" in js[:200]
    assert c.get("/static/vendor/leaflet-1.9.4/LICENSE").status_code == 200
    assert c.get("/static/vendor/leaflet-geoman-free-2.20.2/LICENSE").status_code == 200
    assert c.get("/static/../tiles.py").status_code == 404
    assert c.get("/static/%2e%2e/tiles.py").status_code == 404


def test_vendored_files_ship_in_the_wheel() -> None:
    """pyproject's package-data names every file under serving/static (a file missing from the
    wheel would be a blank map for pip users)."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["uhrbat"]
    static = root / "src" / "uhrbat" / "serving" / "static"
    files = [p.relative_to(root / "src" / "uhrbat").as_posix() for p in static.rglob("*") if p.is_file()]
    assert len(files) >= 10
    missing = [
        f for f in files if not any(fnmatch.fnmatchcase(f, pat) and f.count("/") == pat.count("/") for pat in patterns)
    ]
    assert missing == []


# ----------------------------------------------------------------------------- headless Chromium
def _drag_box(cdp, a: tuple[float, float], b: tuple[float, float]) -> None:
    """Geoman's rectangle: click a corner, move, click the opposite corner (real mouse events)."""
    mouse = lambda kind, x, y, **kw: cdp.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, **kw)  # noqa: E731
    mouse("mouseMoved", *a)
    mouse("mousePressed", *a, button="left", clickCount=1)
    mouse("mouseReleased", *a, button="left", clickCount=1)
    for k in range(1, 9):
        mouse("mouseMoved", a[0] + (b[0] - a[0]) * k / 8, a[1] + (b[1] - a[1]) * k / 8)
        time.sleep(0.02)
    mouse("mousePressed", *b, button="left", clickCount=1)
    mouse("mouseReleased", *b, button="left", clickCount=1)


def _ring_points(doc: dict) -> np.ndarray:
    pts = []
    for f in doc["features"]:
        g = f["geometry"]
        polys = [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]
        pts += [p for poly in polys for ring in poly for p in ring]
    return np.asarray(pts, dtype=np.float64)


def test_map_view_draw_a_box_and_ask_in_chromium(tmp_path) -> None:
    pytest.importorskip("websockets", reason="the CDP client needs the websockets package")
    from test_demo_chromium import CHROMIUM, _click, _set_file, launch_chromium

    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium (/usr/bin/chromium)")
    from uhrbat.serving import serve_in_thread

    fake = FakePipeline()
    app = demo_app(fake, model_name="fake", overlay_max_side=300)
    question = "How many trees are in the box?"
    with serve_in_thread(app) as url, launch_chromium(tmp_path / "profile") as cdp:
        cdp.call("Page.navigate", url=url)
        cdp.wait_for("document.readyState === 'complete' && document.body.dataset.map === 'none'", timeout=30)
        cdp.js(f"document.getElementById('question').value = {json.dumps(question)}")
        upload = tmp_path / "scene <b>bold.tif"  # the file's name is shown on the page: as text
        upload.write_bytes(NEON.read_bytes())
        _set_file(cdp, "#image", upload)
        assert cdp.wait_for("document.body.dataset.map !== 'loading' && document.body.dataset.map", 60) == "ready"
        shown = cdp.js(
            "[document.querySelector('.leaflet-control-attribution').textContent,"
            " document.querySelectorAll('#result b').length, document.getElementById('mapnote').textContent]"
        )
        assert f"tiles: {upload.name} (EPSG:32617)" in shown[0] and shown[1] == 0, shown
        assert shown[2] == f"{upload.name}: 400\u00d7400 px, EPSG:32617"
        # the map shows the scene's own tiles (no basemap: every tile URL is ours)
        cdp.wait_for("document.querySelectorAll('#map img.leaflet-tile-loaded').length > 0", timeout=60)
        srcs = cdp.js("[...document.querySelectorAll('#map img.leaflet-tile')].map(i => i.src)")
        assert srcs and all(s.startswith(url.rstrip("/") + "/api/map/") for s in srcs), srcs
        assert fake.calls == []

        rect = cdp.js("(() => { const r = document.getElementById('map').getBoundingClientRect();"
                      " return [r.left, r.top, r.width, r.height]; })()")  # fmt: skip
        left, top, w, h = rect
        a, b = (left + 0.35 * w, top + 0.30 * h), (left + 0.62 * w, top + 0.58 * h)
        _click(cdp, "#draw-box")
        _drag_box(cdp, a, b)
        state = cdp.wait_for(
            "['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state", timeout=120
        )
        out = cdp.js(
            "({box: document.body.dataset.box, tokens: document.body.dataset.tokens,"
            " error: document.getElementById('error').textContent,"
            " answer: document.getElementById('answer').textContent,"
            " meta: document.getElementById('meta').textContent,"
            " region: document.getElementById('region-label').textContent,"
            " paths: document.querySelectorAll('#map path.token').length,"
            " geojson: document.getElementById('geojson').href})"
        )
        assert state == "done", out
        assert out["answer"] == FakePipeline.answer_for(question)
        # the box is where the mouse drew it: the map's own screen -> lon/lat at the two clicks
        box = [float(v) for v in out["box"].split(",")]
        ll = cdp.js(
            "(() => { const m = window.uhrbatMap.map, r = m.getContainer().getBoundingClientRect();"
            f" const p = (x, y) => m.containerPointToLatLng([x - r.left, y - r.top]);"
            f" const a = p({a[0]}, {a[1]}), b = p({b[0]}, {b[1]}), c = p({a[0]} + 2, {a[1]} + 2);"
            " return [a.lng, b.lat, b.lng, a.lat, Math.abs(c.lng - a.lng), Math.abs(c.lat - a.lat)]; })()"
        )
        two_px = ll[4:]
        for k in range(4):
            assert abs(box[k] - ll[k]) <= two_px[k % 2], (box, ll)
        with urllib.request.urlopen(out["geojson"], timeout=10) as r:
            doc = json.load(r)

        # offline: everything the page loaded (scripts, styles, marker images, tiles, API calls) is ours
        loaded = cdp.js("performance.getEntriesByType('resource').map(e => e.name)")
        assert len(loaded) > 5 and all(u.startswith(url.rstrip("/") + "/") for u in loaded), loaded

        # a TIFF without georeference: the map goes away, the page says why, the image view asks
        plain = tmp_path / "plain.tif"
        Image.new("RGB", (96, 64), (60, 90, 40)).save(plain)
        _set_file(cdp, "#image", plain)
        cdp.wait_for("document.getElementById('mapnote').textContent.startsWith('Image view')", timeout=60)
        assert cdp.js("[document.body.dataset.map, document.getElementById('mapview').hidden]") == ["none", True]
        assert "'plain.tif' is not georeferenced" in cdp.js("document.getElementById('mapnote').textContent")
        _click(cdp, "#ask")
        assert cdp.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state",
                            timeout=120) == "done"  # fmt: skip
        assert fake.calls[-1]["size"] == (96, 64) and "96\u00d764" in cdp.js(
            "document.getElementById('meta').textContent"
        )

    # the question was about the box: the window read is the box's bounding box in the raster's
    # CRS, snapped outwards to whole pixels (computed here independently of uhrbat.io.regions)
    assert fake.calls[-1]["question"] == question
    w, s, e, n = box
    assert w < e and s < n
    region = doc["image"]["region"]
    assert region["request"]["crs"] == "EPSG:4326"
    assert np.allclose(region["request"]["bounds"], box, rtol=0, atol=1e-12)
    with rasterio.open(NEON) as ds:
        t = np.linspace(0, 1, 21)
        lon = np.concatenate([w + (e - w) * t, np.full(21, e), e - (e - w) * t, np.full(21, w)])
        lat = np.concatenate([np.full(21, s), s + (n - s) * t, np.full(21, n), n - (n - s) * t])
        X, Y = warp_transform("EPSG:4326", ds.crs, lon.tolist(), lat.tolist())
        inv = ~ds.transform
        X, Y = np.asarray(X), np.asarray(Y)
        cols, rows = inv.a * X + inv.b * Y + inv.c, inv.d * X + inv.e * Y + inv.f
    window = [math.floor(cols.min()), math.floor(rows.min()), math.ceil(cols.max()), math.ceil(rows.max())]
    assert region["pixels"] == window and doc["image"]["size"] == [400, 400]
    assert f"window {','.join(map(str, window))} of the scene" in out["meta"]
    assert 0 < window[0] < window[2] < 400 and 0 < window[1] < window[3] < 400
    # every token drawn on the map lies inside the box: in scene pixels exactly ...
    assert int(out["tokens"]) == len(doc["features"]) == out["paths"] > 0
    for f in doc["features"]:
        x0, y0, x1, y1 = f["properties"]["box_px"]
        assert window[0] <= x0 < x1 <= window[2] and window[1] <= y0 < y1 <= window[3], f["properties"]
    # ... and in lon/lat, up to the pixel snapping and the UTM grid's rotation against the box
    pts = _ring_points(doc)
    tol_x, tol_y = 0.02 * (e - w), 0.02 * (n - s)
    assert pts[:, 0].min() >= w - tol_x and pts[:, 0].max() <= e + tol_x
    assert pts[:, 1].min() >= s - tol_y and pts[:, 1].max() <= n + tol_y


def test_a_box_with_the_tiny_model_reads_only_the_window(tiny_pipeline) -> None:
    """The real (tiny, random) pipeline behind the page: a question about a box of a kept scene
    is answered from the box's window, its tokens in the scene's coordinates inside the window."""
    with TestClient(demo_app(tiny_pipeline, model_name="tiny", overlay_max_side=300, max_new_tokens=4)) as c:
        info = _upload(c, NEON).json()
        w, s, e, n = info["bounds"]
        box = [w + 0.2 * (e - w), s + 0.3 * (n - s), w + 0.6 * (e - w), s + 0.7 * (n - s)]
        r = c.post(
            "/api/ask",
            data={"scene": info["id"], "question": "How many trees?", "budgets": "8,16",
                  "region": ",".join(map(repr, box)), "region_crs": "EPSG:4326"},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        data = r.json()
        doc = c.get("/" + data["geojson_url"]).json()
    x0, y0, x1, y1 = doc["image"]["region"]["pixels"]
    assert data["image_size"] == [x1 - x0, y1 - y0] and 0 < x0 < x1 < 400 and 0 < y0 < y1 < 400
    assert len(doc["features"]) > 0
    for f in doc["features"]:
        bx0, by0, bx1, by1 = f["properties"]["box_px"]
        assert x0 <= bx0 < bx1 <= x1 and y0 <= by0 < by1 <= y1
