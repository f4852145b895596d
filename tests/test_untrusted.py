"""Regression tests for issue 8 (findings 1-5, 8) and the reader items of issues 13 / 14."""

from __future__ import annotations

import ast
import http.server
import io
import json
import os
import struct
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image, ImageFile

from uhrbat.errors import ConfigError, DecodeBusyError, ImageLoadError
from uhrbat.io import (
    decode_section,
    open_image,
    open_image_bytes,
    set_decode_concurrency,
)
from uhrbat.io.images import REDUCED_CANVAS_PIXELS, PILSource, reduced_geometry
from untrusted_corpus import png_bytes, run_worker, vrt_raw, vrt_source

SRC = Path(__file__).resolve().parents[1] / "src" / "uhrbat"


def _png(w: int = 40, h: int = 30, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class _Counter(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Counter.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(_png())

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def loopback():
    _Counter.hits = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", _Counter.hits
    finally:
        srv.shutdown()
        srv.server_close()


# ----------------------------------------------------------------------------- finding 1: VRT / vsi / sidecars
def test_vrt_upload_is_refused_and_nothing_is_read_or_fetched(tmp_path, loopback) -> None:
    url, hits = loopback
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:secret\n" * 20)
    for data in (vrt_raw(str(secret)), vrt_source(f"/vsicurl/{url}/x.png"), vrt_source(str(secret))):
        with pytest.raises(ImageLoadError, match=r"'innocent\.png' is XML/text.*not accepted") as e:
            open_image_bytes(data, filename="innocent.png")
        assert "\n" not in str(e.value) and "secret" not in str(e.value)
        p = tmp_path / "innocent.png"
        p.write_bytes(data)
        with pytest.raises(ImageLoadError, match="not accepted from untrusted input"):
            open_image(p, trust="untrusted")
    assert hits == []


def test_untrusted_refuses_gdal_virtual_paths_and_urls(loopback) -> None:
    url, hits = loopback
    for raw in (f"/vsicurl/{url}/x.png", "/vsimem/x.tif", f"{url}/x.png", "/vsizip//tmp/a.zip/x.tif"):
        with pytest.raises(ImageLoadError, match="must be a local file path"):
            open_image(raw, trust="untrusted")
    assert hits == []


def test_local_trust_keeps_vrt_mosaics(tmp_path) -> None:
    pytest.importorskip("rasterio")
    Image.open(io.BytesIO(_png(40, 30))).save(tmp_path / "a.tif")
    (tmp_path / "m.vrt").write_bytes(vrt_source("a.tif", 40, 30).replace(b'relativeToVRT="0"', b'relativeToVRT="1"'))
    assert open_image(tmp_path / "m.vrt").size == (40, 30)  # the user's own mosaic: a feature
    import zipfile

    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("x.png", _png(30, 20))
    assert open_image(f"/vsizip/{tmp_path}/a.zip/x.png").size == (30, 20)  # GDAL virtual paths, locally
    with pytest.raises(ImageLoadError, match="not accepted"):
        open_image(tmp_path / "m.vrt", trust="untrusted")


def test_untrusted_gdal_reads_no_sidecar_and_only_the_sniffed_driver(tmp_path) -> None:
    rasterio = pytest.importorskip("rasterio")
    from uhrbat.io.raster import RasterSource

    with rasterio.open(tmp_path / "w16.tif", "w", driver="GTiff", width=40, height=30, count=1, dtype="uint16") as ds:
        ds.write(np.arange(1200, dtype=np.uint16).reshape(1, 30, 40))
    (tmp_path / "w16.tfw").write_text("10\n0\n0\n-10\n500000\n6000000\n")  # a world file beside it
    assert open_image(tmp_path / "w16.tif").georef is not None  # local: sidecars are a feature
    assert open_image(tmp_path / "w16.tif", trust="untrusted").georef is None
    (tmp_path / "fake.tif").write_bytes(vrt_source(str(tmp_path / "w16.tif"), 40, 30))
    with pytest.raises(ImageLoadError, match="not accepted"):  # the GDAL reader checks on its own, too
        RasterSource(tmp_path / "fake.tif", trust="untrusted")
    (tmp_path / "poly.tif").write_bytes(b"II*\x00" + vrt_source(str(tmp_path / "w16.tif"), 40, 30))
    with pytest.raises(ImageLoadError, match="corrupt or unreadable"):  # GTiff driver only: not a VRT
        RasterSource(tmp_path / "poly.tif", trust="untrusted")


@pytest.mark.parametrize(
    "name, data",
    [
        ("a.gif", b"GIF89a" + bytes(40)),
        ("a.bmp", b"BM" + bytes(60)),
        ("a.webp", b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(30)),
        ("a.jp2", b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(40)),
        ("a.png", b"\x00\x01binary junk"),
    ],
)
def test_untrusted_allow_list_is_decided_by_magic_bytes(name, data) -> None:
    with pytest.raises(ImageLoadError, match="not accepted from untrusted input; send a PNG, JPEG or TIFF"):
        open_image_bytes(data, filename=name)


def test_open_image_bytes_works_and_leaves_no_temp_file(tmp_path, monkeypatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = _png(50, 20)
    src = open_image_bytes(data, filename="../../etc/x.png")
    assert isinstance(src, PILSource) and src.size == (50, 20)
    assert np.array_equal(np.asarray(src.square(50)), np.asarray(open_image(Image.open(io.BytesIO(data))).square(50)))
    assert list(tmp_path.iterdir()) == []  # decoded in memory: the private copy is gone
    with pytest.raises(ImageLoadError, match=r"'up\.png'") as e:
        open_image_bytes(data[:100], filename="up.png")
    assert str(tmp_path) not in str(e.value) and list(tmp_path.iterdir()) == []
    with pytest.raises(ImageLoadError, match="empty"):
        open_image_bytes(b"", filename="e.png")


# ----------------------------------------------------------------------------- finding 2: elongated images
@pytest.mark.parametrize(
    "full, reduced",
    [((1, 100_000), (1, 8064)), ((100_000, 1), (8064, 1)), ((1, 1_000_000), (1, 8064)), ((3, 60_000), (1, 8064))],
)
def test_reduced_canvas_never_exceeds_the_4032_level(full, reduced) -> None:
    cw, ch, _, _, box = reduced_geometry(full, reduced)
    assert cw * ch <= (2 * 4032 + 2) ** 2 and box[2] <= cw and box[3] <= ch


def test_elongated_and_pad_heavy_pngs_cost_what_the_pyramid_needs(tmp_path) -> None:
    files = {
        "tall.png": png_bytes(1, 100_000),
        "wide.png": png_bytes(200_000, 1),
        "thin.png": png_bytes(100, 16_000),
        "tall1m.png": png_bytes(1, 1_000_000),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    results = run_worker([(tmp_path / n, "untrusted") for n in files], timeout=60, side=4032)
    for r in results:
        assert r["status"] == "ok", r
        # (2 x 4032)^2 canvas (4 bytes / px) + Pillow's intermediate + the 4032^2 square: ~0.5 GB.
        assert r["peak_mb"] < 600, r
    assert REDUCED_CANVAS_PIXELS == (2 * 4032) ** 2


def test_pad_heavy_image_is_not_padded_in_full() -> None:
    src = PILSource(Image.new("RGB", (100, 16000), (255, 0, 0)))  # exact would pad to 16000^2 (1 GB)
    assert not src._exact()
    a = np.asarray(src.square(800)).astype(int)
    assert a[400, 400, 0] > 200 and tuple(a[400, 100]) == (122, 116, 104)
    assert PILSource(Image.new("RGB", (3000, 2000)))._exact()  # ordinary photos stay bit-exact


# ----------------------------------------------------------------------------- finding 3: header before decode
def test_png_header_claiming_two_billion_pixels_gets_the_limit_message(tmp_path) -> None:
    p = tmp_path / "claim.png"
    p.write_bytes(png_bytes(1, 2_147_483_647, rows=1))
    with pytest.raises(ImageLoadError, match=r"1x2147483647 = 2,147,483,647 pixels, above the limit") as e:
        open_image(p)
    assert "\n" not in str(e.value)


def test_png_exif_orientation_is_read_without_decoding(tmp_path, monkeypatch) -> None:
    img = Image.new("RGB", (60, 20), (10, 20, 30))
    img.paste((250, 250, 250), (0, 0, 10, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "rot.png"
    img.save(p, exif=exif)
    data = p.read_bytes()
    # Move the eXIf chunk after IDAT, where only a decode finds it with Pillow's getexif().
    i = data.index(b"eXIf") - 4
    n = struct.unpack(">I", data[i : i + 4])[0]
    chunk = data[i : i + 12 + n]
    rest = data[:i] + data[i + 12 + n :]
    j = rest.index(b"IEND") - 4
    p.write_bytes(rest[:j] + chunk + rest[j:])
    calls = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append(1) or real_load(self))
    with pytest.raises(ImageLoadError, match="limit of 100"):
        open_image(p, max_pixels=100)
    assert calls == []  # refused from the header: no pixel was decoded
    src = open_image(p)
    assert src.size == (20, 60)  # the rotation is applied, as Pillow's decode + exif_transpose does
    a = np.asarray(src.square(60)).astype(int)
    assert a[3, 30].mean() > 200 and a[56, 30].mean() < 60


def test_big_png_over_the_limit_is_refused_without_decoding(tmp_path) -> None:
    p = tmp_path / "big.png"
    p.write_bytes(png_bytes(20000, 20000, color=0))  # a valid 20000^2 grey PNG, ~0.4 MB
    t = time.perf_counter()
    with pytest.raises(ImageLoadError, match="pixel limit of 100,000,000"):
        open_image(p, max_pixels=100_000_000)
    assert time.perf_counter() - t < 2.0


# ----------------------------------------------------------------------------- finding 4: hangs
def test_fifo_and_devices_never_block(tmp_path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for trust in ("local", "untrusted"):
        t = time.perf_counter()
        with pytest.raises(ImageLoadError, match="FIFO"):
            open_image(fifo, trust=trust)
        with pytest.raises(ImageLoadError, match="device"):
            open_image("/dev/zero", trust=trust)
        assert time.perf_counter() - t < 1.0


def test_big_png_is_streamed_once_in_bounded_time(tmp_path) -> None:
    pytest.importorskip("rasterio")
    from uhrbat.io.raster import RasterSource

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (3000, 1500, 3), dtype=np.uint8)
    arr[:, :750] = (250, 10, 10)
    p = tmp_path / "big.png"
    Image.fromarray(arr).save(p, compress_level=1)
    t = time.perf_counter()
    src = open_image(p, trust="untrusted", exact_max_pixels=1_000_000)  # force the huge-image path
    assert isinstance(src, RasterSource) and src._cache is not None
    a = np.asarray(src.square(200)).astype(int)
    assert time.perf_counter() - t < 15
    assert tuple(a[100, 20]) == (122, 116, 104) and a[100, 60, 0] > 200 and a[100, 60, 1] < 60  # red left half
    ref = np.asarray(open_image(p).square(200)).astype(int)  # the exact path
    assert np.abs(a - ref).mean() < 3


@pytest.mark.slow
def test_valid_20000_square_png_finishes_in_bounded_time_and_memory(tmp_path) -> None:
    pytest.importorskip("rasterio")
    p = tmp_path / "z.png"
    p.write_bytes(png_bytes(20000, 20000, color=0))  # ~0.4 MB, 400 MP
    (r,) = run_worker([(p, "untrusted")], timeout=120, side=4032)
    assert r["status"] == "ok" and r["seconds"] < 120 and r["peak_mb"] < 900, r


def test_interlaced_huge_png_is_refused_with_the_reason(tmp_path) -> None:
    p = tmp_path / "i.png"
    p.write_bytes(png_bytes(17000, 17000, interlace=1, rows=1))
    with pytest.raises(ImageLoadError, match="interlaced PNG.*exact_max_pixels=None"):
        open_image(p)


def test_gdal_failure_on_a_huge_png_is_an_error_not_a_full_decode(tmp_path, monkeypatch) -> None:
    pytest.importorskip("rasterio")
    p = tmp_path / "claim.png"
    p.write_bytes(png_bytes(20000, 20000, rows=3))  # header says 400 MP, data stops after 3 rows
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("full Pillow decode"))
    with pytest.raises(ImageLoadError, match="corrupt or unreadable raster"):
        open_image(p)


def test_huge_png_without_rasterio_says_the_geo_extra_is_needed(tmp_path, monkeypatch) -> None:
    from uhrbat.io import sources

    monkeypatch.setattr(sources, "rasterio_available", lambda: False)
    p = tmp_path / "z.png"
    p.write_bytes(png_bytes(17000, 17000, color=0, rows=2))
    with pytest.raises(ImageLoadError, match=r"pip install 'uhrbat\[geo\]'.*exact_max_pixels=None"):
        open_image(p)


def test_geotiff_without_rasterio_says_the_geo_extra_is_needed(monkeypatch) -> None:
    from uhrbat.io import sources
    from uhrbat.io.geo import map_ready, tokens_pixel_json

    tif = Path(__file__).resolve().parents[2] / "shared" / "assets" / "aerial" / "neon_osbs_400.tif"
    monkeypatch.setattr(sources, "rasterio_available", lambda: False)
    with pytest.warns(UserWarning, match=r"GeoTIFF, but rasterio is not installed.*uhrbat\[geo\]"):
        src = open_image(tif)
    assert src.georef is None and "uhrbat[geo]" in src.georef_note
    doc = tokens_pixel_json([], src)
    assert "uhrbat[geo]" in doc["coordinate_note"] and "has no georeference" not in doc["coordinate_note"]
    from uhrbat.errors import NotGeoreferencedError

    with pytest.raises(NotGeoreferencedError, match=r"uhrbat\[geo\]"):  # the reason, not a guess
        map_ready(src)


def test_untrusted_progressive_jpeg_above_the_limit_is_refused(tmp_path) -> None:
    from untrusted_corpus import jpeg_with_size

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buf, format="JPEG", progressive=True)
    p = tmp_path / "p.jpg"
    p.write_bytes(jpeg_with_size(buf.getvalue(), 10000, 10000))
    with pytest.raises(ImageLoadError, match="progressive JPEG of 10000x10000"):
        open_image(p, trust="untrusted")


# ----------------------------------------------------------------------------- finding 5: decode section
def test_decode_section_bounds_concurrency_and_is_reentrant() -> None:
    inside, peak, lock = [0], [0], threading.Lock()

    def work() -> None:
        with decode_section(), decode_section():  # re-entrant in the same thread: no deadlock, no extra slot
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.05)
            with lock:
                inside[0] -= 1

    try:
        for limit in (1, 2):
            set_decode_concurrency(limit)
            peak[0] = 0
            threads = [threading.Thread(target=work) for _ in range(5)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert peak[0] == limit
        set_decode_concurrency(1)
        with decode_section():
            errors = []
            t = threading.Thread(target=lambda: errors.append(_try_enter(0.05)))
            t.start()
            t.join()
            assert errors and isinstance(errors[0], DecodeBusyError) and "busy" in str(errors[0])
    finally:
        set_decode_concurrency(1)


def _try_enter(timeout: float) -> BaseException | None:
    try:
        with decode_section(timeout=timeout):
            return None
    except DecodeBusyError as e:
        return e


# ----------------------------------------------------------------------------- finding 8: prepare-sft
def _conv(image: str, q: str = "What is it?") -> dict:
    return {
        "image": image,
        "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "A field."}],
    }


def test_prepare_sft_non_utf8_byte_is_one_bad_row_and_no_tmp_is_left(tmp_path) -> None:
    from uhrbat.training.data import prepare_sft

    (tmp_path / "a.png").write_bytes(_png())
    lines = [
        json.dumps(_conv("a.png")).encode(),
        json.dumps(_conv("a.png", "Caf\u00e9?"), ensure_ascii=False).encode("latin-1"),
        json.dumps(_conv("a.png", "Ok?")).encode(),
    ]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    rep = prepare_sft([tmp_path / "d.jsonl"], tmp_path / "out.jsonl", bad_rows=tmp_path / "bad.jsonl")
    assert rep.written == 2 and len(rep.bad) == 1 and "UTF-8" in rep.bad[0].reason
    assert json.loads((tmp_path / "bad.jsonl").read_text())["row"] == "d.jsonl:2"  # the 2nd line, 1-based
    arr = b"[" + b",".join(lines) + b"]"
    (tmp_path / "d.json").write_bytes(arr)
    rep = prepare_sft([tmp_path / "d.json"], tmp_path / "out2.jsonl")
    assert rep.written == 2 and len(rep.bad) == 1
    with pytest.raises(ConfigError, match="input not found"):
        prepare_sft([tmp_path / "d.jsonl", tmp_path / "missing.json"], tmp_path / "out3.jsonl")
    assert not (tmp_path / "out3.jsonl.tmp").exists() and not (tmp_path / "out3.jsonl").exists()


def test_prepare_sft_header_check_skips_truncated_png_and_jpeg(tmp_path) -> None:
    from uhrbat.training.data import VERIFY_LEVELS, prepare_sft

    png = _png(200, 100)
    (tmp_path / "ok.png").write_bytes(png)
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:-200])
    rows = [_conv("ok.png"), _conv("cut.png"), _conv("cut.jpg")]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    rep = prepare_sft([tmp_path / "d.json"], tmp_path / "out.jsonl")
    reasons = sorted(b.reason for b in rep.bad)
    assert rep.written == 1 and len(reasons) == 2
    assert "cut.png" in reasons[0] and "truncated PNG (no IEND chunk)" in reasons[0] and "cut.jpg" in reasons[1]
    assert "IEND" in VERIFY_LEVELS["header"] and "full" in VERIFY_LEVELS["header"]


# ----------------------------------------------------------------------------- issue 13: no import cycles
def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("uhrbat.io"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("uhrbat.io"))
    return out


def test_io_modules_have_no_import_cycles() -> None:
    """Every import (module level or inside functions) between uhrbat.io modules, as a graph: acyclic."""
    graph = {
        f"uhrbat.io.{p.stem}": {m for m in _imports(p) if m != "uhrbat.io"}
        for p in (SRC / "io").glob("*.py")
        if p.stem != "__init__"
    }

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, f"import cycle: {' -> '.join(stack + (node,))}"
        for nxt in graph.get(node, ()):
            visit(nxt, stack + (node,))

    for node in graph:
        visit(node, ())
    assert "uhrbat.io.sources" not in graph["uhrbat.io.images"] | graph["uhrbat.io.raster"]


def test_uploaded_tiff_copy_lives_as_long_as_its_lazy_source(tmp_path, monkeypatch) -> None:
    rasterio = pytest.importorskip("rasterio")
    import gc
    import tempfile

    from rasterio.transform import from_origin

    from uhrbat.io.raster import RasterSource

    with rasterio.open(
        tmp_path / "g.tif",
        "w",
        driver="GTiff",
        width=64,
        height=48,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=from_origin(500000, 6000000, 10, 10),
    ) as ds:
        ds.write(np.full((3, 48, 64), 90, np.uint8))
    data = (tmp_path / "g.tif").read_bytes()
    up = tmp_path / "uploads"
    up.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(up))
    src = open_image_bytes(data, filename="scene.tif")
    assert isinstance(src, RasterSource) and src.georef is not None and src.trust == "untrusted"
    assert len(list(up.iterdir())) == 1  # the private copy the lazy source reads from
    assert src.square(32).size == (32, 32)
    del src
    gc.collect()
    assert list(up.iterdir()) == []


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "I;16"])
def test_streamed_png_matches_the_exact_path_for_every_png_kind(tmp_path, mode) -> None:
    pytest.importorskip("rasterio")
    rng = np.random.default_rng(1)
    if mode == "I;16":
        img = Image.fromarray(np.tile(np.linspace(1000, 5000, 900).astype(np.uint16), (600, 1)))
    else:
        img = Image.fromarray(rng.integers(0, 256, (600, 900, 3), dtype=np.uint8)).convert(mode)
        if mode == "RGBA":
            img.putalpha(Image.fromarray(np.where(np.arange(900) < 450, 0, 255).astype(np.uint8)[None].repeat(600, 0)))
    p = tmp_path / "k.png"
    img.save(p)
    streamed = open_image(p, trust="untrusted", exact_max_pixels=100_000)
    assert streamed._cache is not None  # the forward-only stream, not a decimated GDAL read
    a = np.asarray(streamed.square(300)).astype(int)
    b = np.asarray(open_image(p).square(300)).astype(int)
    assert np.abs(a - b).mean() < 4, np.abs(a - b).mean()
