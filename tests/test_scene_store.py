"""`SceneStore` bounds (memory, disk, aliases), `FileHasher`'s bounded memo, and `Scene` as a
store item that can grow. No model needed."""

from __future__ import annotations

import os
import time

import pytest
import torch

from uhrbat.configuration.geometry import TokenGeometry
from uhrbat.scene.keys import FileHasher
from uhrbat.scene.scene import ScaleFeatures, Scene, SceneGeometry
from uhrbat.scene.store import DEFAULT_DISK_MAX_BYTES, SceneStore


def _item(v: float, n: int = 256) -> dict:
    return {"x": torch.full((n,), float(v))}  # n * 4 bytes


def _files(d):
    return sorted(p for p in d.rglob("*.safetensors"))


def test_disk_layer_is_bounded_and_evicts_least_recently_used(tmp_path) -> None:
    probe = SceneStore(cache_dir=tmp_path / "probe")
    probe.put("probe", _item(0))
    size = probe.disk_bytes()  # one item's file
    store = SceneStore(max_bytes=0, cache_dir=tmp_path / "c", disk_max_bytes=3 * size)
    for i, k in enumerate("abc"):
        store.put(k, _item(i))
        os.utime(store._path(k), (time.time() - 100 + i, time.time() - 100 + i))  # a is the oldest
    assert store.disk_bytes() == 3 * size and len(_files(tmp_path / "c")) == 3
    assert store.get("a")[1] == "disk"  # reading a refreshes it: b is now the least recently used
    store.put("d", _item(3))
    assert store.disk_bytes() <= 3 * size and store.stats["disk_evictions"] == 1
    assert store.get("b") is None and store.get("a") is not None and store.get("d") is not None
    big = SceneStore(max_bytes=0, cache_dir=tmp_path / "c", disk_max_bytes=size)
    big.put("e", _item(4))  # a new item never evicts itself
    assert big.get("e") is not None and big.disk_bytes() == size
    assert DEFAULT_DISK_MAX_BYTES == 32 * 2**30
    with pytest.raises(ValueError, match="disk_max_bytes"):
        SceneStore(disk_max_bytes=-1)


def test_memory_only_items_never_reach_the_disk(tmp_path) -> None:
    store = SceneStore(cache_dir=tmp_path)
    store.put("canvas", _item(1), disk=False)
    assert "canvas" in store and not _files(tmp_path)


def test_aliases_and_file_hashes_are_bounded(tmp_path) -> None:
    store = SceneStore(max_aliases=3)
    for i in range(5):
        store.put_alias(f"fp{i}", f"content{i}", (10, 20))
    assert store.get_alias("fp0") is None and store.get_alias("fp4")["content"] == "content4"
    hasher = FileHasher(max_entries=2)
    paths = []
    for i in range(3):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(bytes([i]) * 10)
        paths.append(p)
        hasher(p)
    assert len(hasher) == 2
    before = hasher(paths[2])
    paths[2].write_bytes(b"changed")  # a changed file is hashed again
    assert hasher(paths[2]) != before


def _scene(tiles: dict[int, list[int]], hidden: int = 4) -> Scene:
    g = SceneGeometry((14, 28), 14, TokenGeometry(14, 7))  # 1 and 4 tiles of 2x2 tokens
    feats = {
        s: ScaleFeatures(
            torch.tensor(t, dtype=torch.int64), torch.stack([torch.full((4, hidden), float(i)) for i in t])
        )
        for s, t in tiles.items()
    }
    return Scene(g, feats, torch.zeros(4, hidden))


def test_scene_grows_and_round_trips_as_a_store_item() -> None:
    scene = _scene({14: [0], 28: [1, 3]})
    assert not scene.complete() and scene.missing(28).tolist() == [0, 2]
    new = ScaleFeatures(torch.tensor([2, 0]), torch.stack([torch.full((4, 4), 2.0), torch.zeros(4, 4)]))
    grown = scene.merge({28: new})
    assert grown.complete() and grown.encoded(28).tolist() == [0, 1, 2, 3]
    assert grown.features[28].embeds[:, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]  # rows follow the tiles
    with pytest.raises(ValueError, match="encoded twice"):
        grown.merge({28: ScaleFeatures(torch.tensor([1]), torch.zeros(1, 4, 4))})
    sub = grown.tokens(28, torch.tensor([1, 3]))
    assert sub.embeds.shape == (8, 4) and sub.positions().tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    assert sub.to_scale(torch.tensor([0, 5])).tolist() == [4, 13]
    again = Scene.from_tensors(grown.tensors(), grown.geometry, torch.float32)
    assert again is not None and torch.equal(again.features[28].embeds, grown.features[28].embeds)
    assert Scene.from_tensors(grown.tensors(), grown.geometry, torch.bfloat16) is None  # another dtype
    bad = dict(grown.tensors(), **{"tiles.28": torch.tensor([0, 1, 1, 3])})
    assert Scene.from_tensors(bad, grown.geometry, torch.float32) is None  # not strictly ascending
