"""Scene handles in `uhrbat serve` (issue 22) with real clients (`openai`, `httpx`, `curl`) against
the real (tiny, random) model: upload once and ask by id (every question reuses the prepared
scene), API keys as tenants (another key's id is a 404, the scene cache is per key), DELETE,
limits with one-line errors, and handles that survive a restart with a cache folder."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package itself runs on

from conftest import ASSETS, ROOT
from uhrbat.pipeline import UhrBatPipeline
from uhrbat.serving import ChatService, ServeOptions, create_app, serve_in_thread

MODEL = "tiny"
GEN = {"max_tokens": 5}
KEY_A, KEY_B = "key-for-alice", "key-for-bob"


def png(seed: int = 0, w: int = 150, h: int = 110) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


@pytest.fixture()
def fresh(tiny_pipeline):
    """A pipeline over the session's tiny model with its own scene store (hits and misses in a
    test are its own)."""
    return UhrBatPipeline(
        tiny_pipeline.model, tiny_pipeline.processor, budgets=[8, 16], kmeans_clusters=8, kmeans_iters=5
    )


class Server:
    def __init__(self, url: str, service: ChatService) -> None:
        self.url, self.service = url, service

    def http(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url + "v1", headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def openai(self, key: str):
        return openai.OpenAI(base_url=self.url + "v1", api_key=key, max_retries=0, timeout=120)

    def upload(self, key: str, data: bytes, media: str = "image/png", **fields) -> dict:
        with self.http(key) as c:
            r = c.post("/scenes", json={"image": data_url(data, media), **fields})
        assert r.status_code == 200, r.text
        return r.json()


@contextlib.contextmanager
def server(pipe, keys=(KEY_A, KEY_B), **options):
    opts = ServeOptions(model_name=MODEL, api_keys=tuple(keys), batch_wait_s=0.01, **options)
    service = ChatService(pipe, opts)
    with serve_in_thread(create_app(service), opts) as url:
        yield Server(url, service)


def ask(client, scene_id: str, question: str, history: tuple = (), **extra) -> object:
    return client.chat.completions.create(
        model=MODEL,
        messages=[*history, {"role": "user", "content": question}],
        extra_body={"scene_id": scene_id, **extra},
        **GEN,
    )


def ext(r) -> dict:
    return r.model_extra["uhrbat"]


def direct(pipe, data: bytes, question: str) -> str:
    from uhrbat.io import open_image_bytes

    return pipe.ask(open_image_bytes(data, filename="x.png"), question, max_new_tokens=GEN["max_tokens"]).answer


def test_upload_once_then_questions_by_id_reuse_the_scene(fresh, tiny_pipeline) -> None:
    data = png(1)
    with server(fresh) as s:
        scene = s.upload(KEY_A, data, filename="plot.png")
        assert scene["object"] == "scene" and len(scene["id"]) == 22
        assert (scene["width"], scene["height"], scene["crs"], scene["bounds"]) == (150, 110, None, None)
        assert scene["filename"] == "plot.png" and scene["features"] == "miss" and scene["prepared"] is True
        client = s.openai(KEY_A)
        first = ask(client, scene["id"], "What is in the image?")
        follow = [ask(client, scene["id"], q) for q in ("Is there water?", "How many roads?")]
        r = ask(
            client,
            scene["id"],
            "And buildings?",
            ({"role": "user", "content": "Is there water?"}, {"role": "assistant", "content": "no"}),
        )
        with s.http(KEY_A) as c:
            after = c.get(f"/scenes/{scene['id']}").json()
            health = c.get(s.url + "health").json()
    # Every question found the scene prepared: no tile read or encoded, features reused.
    for q in (first, *follow, r):
        e = ext(q)
        assert e["cache"] == "hit" and e["reuse"]["features"] == "hit", e
        assert all(t["encoded"] == 0 for t in e["tiles"].values()), e["tiles"]
        assert e["timings"]["tiles"] == 0 and e["timings"]["encode"] == 0
    # The follow-ups cost less than the upload (preparation) plus the first question.
    cost = [sum(ext(q)["timings"].values()) for q in (first, *follow)]
    assert max(cost[1:]) < scene["prepare_seconds"] + cost[0]
    # The answer is the model's answer about that image.
    assert first.choices[0].message.content == direct(tiny_pipeline, data, "What is in the image?")
    assert after["questions"] == 4 and health["status"] == "ok"


def test_other_keys_get_404_and_their_own_cache(fresh) -> None:
    data = png(2)
    with server(fresh) as s:
        mine = s.upload(KEY_A, data)
        sid = mine["id"]
        with s.http(KEY_B) as bob:
            for r in (bob.get(f"/scenes/{sid}"), bob.delete(f"/scenes/{sid}")):
                assert r.status_code == 404
                err = r.json()["error"]
                assert err["code"] == "scene_not_found" and err["param"] == "scene_id"
                assert "\n" not in err["message"] and sid[:8] in err["message"]
            assert bob.get("/scenes").json() == {"object": "list", "data": []}
            # an unknown id reads exactly like another key's id
            unknown = bob.get("/scenes/" + "A" * 22).json()["error"]["message"]
            assert unknown == r.json()["error"]["message"].replace(sid, "A" * 22)
        with pytest.raises(openai.NotFoundError) as e:
            ask(s.openai(KEY_B), sid, "What is here?")
        assert e.value.body["code"] == "scene_not_found"
        # Bob uploading the same bytes prepares them again (no hit on Alice's cache); Alice again hits.
        theirs = s.upload(KEY_B, data)
        again = s.upload(KEY_A, data)
        assert theirs["features"] == "miss" and again["features"] == "hit"
        assert len({sid, theirs["id"], again["id"]}) == 3
        # Alice's scene is untouched by Bob's attempts
        assert ext(ask(s.openai(KEY_A), sid, "What is here?"))["cache"] == "hit"
        with s.http(KEY_A) as alice:
            listed = [x["id"] for x in alice.get("/scenes").json()["data"]]
        assert listed == [sid, again["id"]]
        # no key, a wrong key: 401
        assert httpx.get(s.url + "v1/scenes").status_code == 401
        with s.http("wrong") as c:
            assert c.post("/scenes", json={"image": data_url(data)}).status_code == 401


def test_delete_makes_it_404_and_the_server_stays_up(fresh) -> None:
    with server(fresh) as s:
        sid = s.upload(KEY_A, png(3))["id"]
        with s.http(KEY_A) as c:
            assert c.delete(f"/scenes/{sid}").json() == {"id": sid, "object": "scene.deleted", "deleted": True}
            assert c.get(f"/scenes/{sid}").status_code == 404
            assert c.delete(f"/scenes/{sid}").status_code == 404
        with pytest.raises(openai.NotFoundError):
            ask(s.openai(KEY_A), sid, "Still there?")
        sid2 = s.upload(KEY_A, png(3))["id"]
        plain = ask(s.openai(KEY_A), sid2, "Still there?")
        assert ext(plain)["cache"] == "hit"  # the tenant's store kept it
        chunks = list(
            s.openai(KEY_A).chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Still there?"}],
                extra_body={"scene_id": sid2},
                stream=True,
                **GEN,
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == plain.choices[0].message.content and chunks[-1].model_extra["uhrbat"]["cache"] == "hit"


def test_multipart_upload(fresh, tmp_path) -> None:
    path = tmp_path / "scene.png"
    path.write_bytes(png(4, 90, 70))
    with server(fresh) as s, s.http(KEY_A) as c:
        with open(path, "rb") as f:
            r = c.post("/scenes", files={"file": ("scene.png", f, "image/png")}, data={"bands": "1,2,3"})
        assert r.status_code == 200, r.text
        assert r.json()["filename"] == "scene.png" and r.json()["width"] == 90 and r.json()["bands"] == [1, 2, 3]
        r = c.post("/scenes", data={"bands": "1,2,3"}, files={"other": ("x.png", b"x", "image/png")})
        assert r.status_code == 400 and r.json()["error"]["param"] == "file"


def readme_examples() -> tuple[str, str]:
    """The Python and shell blocks of README *Serve* > *Scene handles*."""
    text = (ROOT / "README.md").read_text()
    part = text.split("### Scene handles", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", part, re.S)[1], re.search(r"```bash\n(.*?)```", part, re.S)[1]


def test_readme_examples_run_as_written(fresh, tmp_path, monkeypatch, capsys) -> None:
    """The README's openai-client and curl examples, run as written against a server (its URL,
    a key, and a real GeoTIFF as scene.tif substituted)."""
    python, shell = readme_examples()
    shutil.copy(ASSETS / "aerial" / "neon_osbs_400.tif", tmp_path / "scene.tif")
    monkeypatch.chdir(tmp_path)
    with server(fresh) as s:
        base = s.url + "v1"
        code = python.replace("http://127.0.0.1:8000/v1", base).replace('api_key="KEY"', f"api_key={KEY_A!r}")
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102  (our own README)
        out = capsys.readouterr().out
        lines = out.splitlines()  # the tiny random model's answers may hold line breaks
        sid, w, h, crs = lines[0].split()[:4]
        assert (w, h) == ("400", "400") and crs.startswith("EPSG:") and lines[0].endswith("miss")
        assert out.count(" hit\n") == 3 and lines[-1] == repr([sid])
        with s.http(KEY_A) as c:
            assert c.get(f"/scenes/{sid}").status_code == 404  # the example deleted it
        if shutil.which("curl") is None:
            pytest.skip("curl is not installed")
        commands = shell.replace("\\\n", " ").replace("http://127.0.0.1:8000/v1", base).splitlines()
        outputs, scene_id = [], None
        for command in commands:
            if scene_id is not None:
                command = command.replace("ID", scene_id).replace("MODEL", MODEL)
            run = subprocess.run(["bash", "-c", command], capture_output=True, env={**os.environ, "KEY": KEY_A})
            assert run.returncode == 0, run.stderr
            outputs.append(json.loads(run.stdout))
            scene_id = scene_id or outputs[0]["id"]
    created, answer, got, deleted = outputs
    assert created["filename"] == "scene.tif" and created["crs"] == crs
    assert answer["object"] == "chat.completion" and answer["uhrbat"]["cache"] == "hit"
    assert got["id"] == scene_id and got["questions"] == 1 and deleted["deleted"] is True


def test_bad_uploads_and_requests_get_one_line_400s(fresh) -> None:
    with server(fresh) as s, s.http(KEY_A) as c:
        cases = [
            ({"image": "data:text/plain;base64,aGVsbG8="}, "image", "not an accepted image type"),
            (
                {"image": "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()},
                None,
                "not accepted",
            ),
            ({"image": "https://example.com/x.png"}, "image", "data: URL"),
            ({"image": data_url(png(5)), "budgets": [1, 2]}, "budgets", "unknown field"),
            ({"image": data_url(png(5)), "bands": "9,9"}, "bands", "1 band (grey) or 3 bands"),
        ]
        for body, param, words in cases:
            r = c.post("/scenes", json=body)
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert words in err["message"] and "\n" not in err["message"], err
            if param:
                assert err["param"] == param
        sid = s.upload(KEY_A, png(5))["id"]
        client = s.openai(KEY_A)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model=MODEL,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": data_url(png(5))}},
                            {"type": "text", "text": "q"},
                        ],
                    }
                ],
                extra_body={"scene_id": sid},
                **GEN,
            )
        assert "scene_id and sends an image too" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}], **GEN)
        assert "POST /v1/scenes" in e.value.body["message"]
        assert c.get(s.url + "health").json()["status"] == "ok"


def test_limits_per_key_memory_and_ttl(fresh) -> None:
    with server(fresh, max_scenes=2, scene_ttl_s=600) as s:
        a1 = s.upload(KEY_A, png(6))["id"]
        s.upload(KEY_A, png(7))
        with s.http(KEY_A) as c:
            r = c.post("/scenes", json={"image": data_url(png(8))})
        assert r.status_code == 429 and r.headers["x-should-retry"] == "false"
        err = r.json()["error"]
        assert err["code"] == "scene_limit" and "--max-scenes 2" in err["message"] and "DELETE" in err["message"]
        s.upload(KEY_B, png(8))  # another key has its own quota
        # idle past the TTL: gone (404), and the key has room again
        handles = s.service.scenes
        now = handles.clock()
        handles.clock = lambda: now + 601
        with s.http(KEY_A) as c:
            assert c.get(f"/scenes/{a1}").status_code == 404
            assert c.get("/scenes").json()["data"] == []
        s.upload(KEY_A, png(6))
    with server(fresh, max_scene_bytes=1) as s:
        with s.http(KEY_A) as c:
            r = c.post("/scenes", json={"image": data_url(png(9))})
        assert r.status_code == 429 and "--max-scene-mb" in r.json()["error"]["message"]
        assert list(s.service.scenes.root.rglob("*.png")) == []  # the refused upload left no file


def test_handles_survive_a_restart_with_a_cache_dir(tiny_pipeline, tmp_path) -> None:
    data = (ASSETS / "aerial" / "neon_osbs_400.tif").read_bytes()  # georeferenced: the GeoJSON survives too

    def pipe():  # a new store over the same folder, as a new server process would have
        return UhrBatPipeline(
            tiny_pipeline.model,
            tiny_pipeline.processor,
            cache_dir=tmp_path,
            budgets=[8, 16],
            kmeans_clusters=8,
            kmeans_iters=5,
        )

    with server(pipe(), cache_dir=str(tmp_path)) as s:
        sid = s.upload(KEY_A, data, "image/tiff", filename="field.tif")["id"]
        before = ask(s.openai(KEY_A), sid, "What grows here?", return_tokens=True)
    with server(pipe(), cache_dir=str(tmp_path)) as s:
        with s.http(KEY_A) as c:
            got = c.get(f"/scenes/{sid}").json()
        assert got["filename"] == "field.tif" and got["width"] == 400 and got["prepared"] is False
        with s.http(KEY_B) as c:
            assert c.get(f"/scenes/{sid}").status_code == 404
        after = ask(s.openai(KEY_A), sid, "What grows here?", return_tokens=True)
        again = ask(s.openai(KEY_A), sid, "What grows here?")
        with s.http(KEY_A) as c:
            assert c.get(f"/scenes/{sid}").json()["questions"] == 3
    assert after.choices[0].message.content == before.choices[0].message.content
    assert ext(after)["geojson"] == ext(before)["geojson"] and ext(after)["geojson"]["image"]["path"] == "field.tif"
    assert ext(after)["cache"] == "disk" and ext(again)["cache"] == "hit"
    assert all(t["encoded"] == 0 for t in ext(after)["tiles"].values())


def test_without_api_keys_handles_work_for_the_one_open_tenant(fresh) -> None:
    with server(fresh, keys=()) as s:
        with httpx.Client(base_url=s.url + "v1", timeout=120) as c:
            sid = c.post("/scenes", json={"image": data_url(png(11))}).json()["id"]
            assert [x["id"] for x in c.get("/scenes").json()["data"]] == [sid]
        assert ext(ask(s.openai("none"), sid, "Anything?"))["cache"] == "hit"


def test_the_scene_cache_is_per_key_for_images_sent_inline_too(fresh) -> None:
    """The same bytes sent as a data: URL by two keys: each key prepares its own scene (no hit,
    no timing signal from the other key's upload)."""
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(png(12))}},
                {"type": "text", "text": "What is here?"},
            ],
        }
    ]
    with server(fresh) as s:
        caches = [
            ext(s.openai(key).chat.completions.create(model=MODEL, messages=msgs, **GEN))["cache"]
            for key in (KEY_A, KEY_B, KEY_A, KEY_B)
        ]
    assert caches == ["miss", "miss", "hit", "hit"]


def test_serve_flags_for_keys_and_scene_handles(monkeypatch, tmp_path, capsys) -> None:
    from typer.testing import CliRunner

    import uhrbat.pipeline
    import uhrbat.serving.http_server as http_server
    from serving_fake import FakePipeline, route_paths
    from uhrbat.cli import serve_cmd
    from uhrbat.cli.main import app, main
    from uhrbat.serving.limits import DEFAULT_MAX_SCENE_MB

    assert serve_cmd.DEFAULT_MAX_SCENE_MB == DEFAULT_MAX_SCENE_MB
    served = {}
    monkeypatch.setattr(uhrbat.pipeline.UhrBatPipeline, "from_pretrained", staticmethod(lambda m, **kw: FakePipeline()))
    monkeypatch.setattr(http_server, "serve", lambda app, options, host, port: served.update(app=app, options=options))
    monkeypatch.delenv("UHRBAT_API_KEY", raising=False)
    keys = tmp_path / "keys.txt"
    keys.write_text("# tenants\nkey-two\n\nkey-three\nkey-one\n")
    cache = tmp_path / "cache"
    args = ["serve", "--model", "m", "--api-key", "key-one", "--api-key", "key-x", "--api-keys-file", str(keys)]
    args += ["--max-scenes", "3", "--max-scene-mb", "100", "--scene-ttl", "60", "--cache-dir", str(cache)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    o = served["options"]
    assert o.api_keys == ("key-one", "key-x", "key-two", "key-three")
    assert (o.max_scenes, o.max_scene_bytes, o.scene_ttl_s, o.cache_dir) == (3, 100 * 2**20, 60, str(cache))
    assert f"scene handles: <= 3 per API key, <= 100 MiB of features, idle TTL 60 s, kept under {cache}" in r.output
    assert {"/v1/scenes", "/v1/scenes/{scene_id}"} <= route_paths(served["app"])
    keys.write_text("# nothing here\n")
    monkeypatch.setattr(
        uhrbat.pipeline.UhrBatPipeline, "from_pretrained", staticmethod(lambda *a, **k: pytest.fail("loaded"))
    )
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "m", "--api-keys-file", str(keys)])
    assert e.value.code == 2 and "holds no key; put one key per line" in capsys.readouterr().err


def test_a_handles_scene_gives_regions_in_its_tenants_namespace(fresh) -> None:
    """What chat's region options will run on (the pipeline's `region=` with the handle's
    `SceneOrigin`): a window read from the stored file, prepared in the key's namespace, and
    found again by the same key only."""
    import hashlib

    with server(fresh) as s:
        sid = s.upload(KEY_A, png(13))["id"]
        tenant = "key-" + hashlib.sha256(KEY_A.encode()).hexdigest()[:12]  # `ApiKeys`' tenant name
        origin = s.service.scenes.prepare(s.service.scenes.get(tenant, sid))
        mine = s.service.engine.pipeline_for(tenant)
        first = mine.ask(origin, "What is here?", max_new_tokens=3, region=[10, 20, 90, 80])
        again = mine.ask(origin, "And here?", max_new_tokens=3, region=[10, 20, 90, 80])
        other = s.service.engine.pipeline_for("key-" + hashlib.sha256(KEY_B.encode()).hexdigest()[:12])
        theirs = other.ask(origin, "What is here?", max_new_tokens=3, region=[10, 20, 90, 80])
    assert first.image_size == (80, 60) and first.region["pixels"] == [10, 20, 90, 80]
    assert (first.cache, again.cache, theirs.cache) == ("miss", "hit", "miss")


def test_region_and_zoom_options_compose_with_scene_id(fresh) -> None:
    """extra_body region / zoom with a scene_id: the window is read from the stored upload and
    prepared once in the key's namespace; a region outside the image is a one-line 400."""
    with server(fresh) as s:
        sid = s.upload(KEY_A, png(14))["id"]
        a, b = s.openai(KEY_A), s.openai(KEY_B)
        first = ask(a, sid, "What is here?", region=[10, 20, 90, 80])
        again = ask(a, sid, "And here?", region=[10, 20, 90, 80])
        whole = ask(a, sid, "And the whole scene?")
        zoomed = ask(a, sid, "Where is the road?", zoom=1)
        with pytest.raises(openai.BadRequestError) as e:
            ask(a, sid, "Outside?", region=[500, 500, 600, 600])
        with pytest.raises(openai.NotFoundError):
            ask(b, sid, "What is here?", region=[10, 20, 90, 80])
    assert ext(first)["region"]["pixels"] == [10, 20, 90, 80] and ext(first)["image_size"] == [80, 60]
    assert (ext(first)["cache"], ext(again)["cache"], ext(whole)["cache"]) == ("miss", "hit", "hit")
    assert "windows" in ext(zoomed) and "zoom" in ext(zoomed)
    msg = e.value.body["message"]
    assert "\n" not in msg and "uhrbat-scenes" not in msg and "/handles/" not in msg
