"""Gated encoding resizes only the square's windows under the tiles a question needs
(`uhrbat.scene.pixels.SquareTiles`); every tile must be bit for bit the tile cut from the whole
canvas (`source.square(side)`), which is what full encoding and the reference use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ASSETS
from uhrbat.errors import ImageLoadError
from uhrbat.io.images import PILSource
from uhrbat.processing.image_processing_uhrbat import UhrBatImageProcessor
from uhrbat.scene.blocks import block_box, block_size
from uhrbat.scene.pixels import Canvases, SquareTiles, pixels_from_tensors, read_pyramid

AERIAL = ASSETS / "aerial" / "neon_yell_1249x1035.png"


def _random_image(w: int, h: int, seed: int) -> Image.Image:
    # Noise: any coefficient that differed would show in some pixel.
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _whole(ip: UhrBatImageProcessor, source: PILSource, side: int) -> torch.Tensor:
    return torch.from_numpy(ip.tiles_for_canvas(ip.canvas(source.square(side))))


@pytest.mark.parametrize(
    ("size", "scales"),
    [
        ((1249, 1035), (672, 1344, 2688, 4032)),  # wide, padded rows; side 1249 (not a multiple of 3)
        ((1035, 1249), (1344, 4032)),  # tall: padded columns
        ((2299, 2472), (2688, 4032)),  # 2472 = 12 x 206: single tiles at 4032
        ((400, 400), (672, 4032)),  # square, no padding, a 10x upscale
        ((1344, 1344), (1344, 4032)),  # the square is one scale exactly (Pillow crops instead)
        ((4500, 700), (1344, 4032)),  # a downscale, strongly elongated
        ((777, 1501), (1000, 2688)),  # a scale that is not a multiple of the tile (28 px dropped)
    ],
)
def test_square_tiles_equal_the_whole_canvas(size, scales) -> None:
    ip = UhrBatImageProcessor(scales=sorted({672, *scales}))
    source = PILSource(_random_image(*size, seed=sum(size)))
    tiles = SquareTiles(ip, source.padded_square())
    for side in scales:
        whole = _whole(ip, source, side)
        every = torch.arange(whole.shape[0])
        assert torch.equal(tiles.tiles(side, every), whole), (size, side)
        some = every[torch.randperm(every.numel(), generator=torch.Generator().manual_seed(side))][:7]
        assert torch.equal(tiles.tiles(side, some), whole[some])  # any order, any subset


def test_block_size_is_needed_where_the_box_is_not_a_float32() -> None:
    """At 4032 a tile spans L / 12 square pixels: not a float32 when L is not a multiple of 3,
    and Pillow's single-tile box resize then differs from the whole canvas - the guard takes
    3 x 3 blocks there (L / 4 per block); a multiple of 3 takes single tiles."""
    ip = UhrBatImageProcessor()
    assert [block_size(2472, s, 336) for s in ip.scales] == [1, 1, 1, 1]
    assert [block_size(1249, s, 336) for s in ip.scales] == [1, 1, 1, 3]
    source = PILSource(_random_image(1249, 1035, seed=3))
    whole = ip.canvas(source.square(4032))
    square = source.padded_square()
    differs = 0
    y0, y1 = block_box(6, 1, 336, 4032, 1249)
    for c in range(12):  # a middle row of tiles (image, not padding), each resized alone
        x0, x1 = block_box(c, 1, 336, 4032, 1249)
        alone = np.asarray(square.resize((336, 336), Image.Resampling.BICUBIC, box=(x0, y0, x1, y1)))
        differs += not np.array_equal(alone, whole[6 * 336 : 7 * 336, c * 336 : (c + 1) * 336])
    assert differs > 0  # the guard is not vacuous


def test_gated_reads_no_fine_canvas_and_full_and_gated_share_the_content() -> None:
    ip = UhrBatImageProcessor()
    gated = read_pyramid(PILSource(Image.open(AERIAL).convert("RGB")), ip, [672], [1344, 2688, 4032])
    full = read_pyramid(PILSource(Image.open(AERIAL).convert("RGB")), ip, ip.scales)
    assert isinstance(gated[1], SquareTiles) and gated[0].shape[0] == 4
    assert gated[2] == full[2] and full[0].shape[0] == 228 and full[1].nbytes == 0
    assert torch.equal(gated[1].tiles(4032, torch.tensor([5, 77])), full[0][4 + 16 + 64 + torch.tensor([5, 77])])
    stored = pixels_from_tensors(ip, gated[1].tensors())  # the store's item back (shares its pixels)
    assert torch.equal(stored.tiles(2688, torch.tensor([9, 40])), full[0][4 + 16 + torch.tensor([9, 40])])


class _NoSquare:
    """A source that only offers `square(side)` (reduced readers, other sources): canvases."""

    def __init__(self, inner: PILSource) -> None:
        self.inner = inner
        self.size = inner.size

    def square(self, side: int) -> Image.Image:
        return self.inner.square(side)


def test_sources_without_a_square_keep_canvases() -> None:
    ip = UhrBatImageProcessor()
    inner = PILSource(_random_image(500, 300, seed=1))
    tiles, pixels, content = read_pyramid(_NoSquare(inner), ip, [672], [1344])
    assert isinstance(pixels, Canvases) and sorted(pixels.squares) == [1344]
    assert torch.equal(pixels.tiles(1344, torch.tensor([3])), _whole(ip, inner, 1344)[[3]])
    assert content != read_pyramid(inner, ip, [672], [1344])[2]  # another derivation, another digest


def test_gated_answers_the_same_from_a_source_without_a_square(tiny_pipeline) -> None:
    image = PILSource(Image.open(AERIAL).convert("RGB"))
    kw = dict(selector="topk", max_new_tokens=3, min_new_tokens=3, budgets=[8, 40])
    square = tiny_pipeline.ask(image, "Where is the road?", encode="gated", **kw)
    canvases = tiny_pipeline.ask(_NoSquare(image), "Where is the road?", encode="gated", **kw)
    assert [t.to_dict() for t in square.tokens] == [t.to_dict() for t in canvases.tokens]
    assert square.generated_ids == canvases.generated_ids
    assert square.tiles[1344]["held"] < 16


def test_pixels_read_again_are_checked_to_be_the_same_image(tiny_pipeline, tmp_path) -> None:
    """After the store lost a partial scene's square, finer tiles come from the image read again,
    refused when the file changed meanwhile."""
    from uhrbat.scene.manager import SceneManager

    path = tmp_path / "scene.png"
    _random_image(640, 480, seed=5).save(path)
    manager = SceneManager(tiny_pipeline.model, tiny_pipeline.processor, None, tiny_pipeline._model_lock)
    opened = manager.open(path, "gated")
    again = manager._pixels(opened.content, path)()
    assert isinstance(again, SquareTiles)
    whole = _whole(tiny_pipeline.processor.image_processor, PILSource(Image.open(path).convert("RGB")), 1344)
    assert torch.equal(again.tiles(1344, torch.tensor([0, 9])), whole[[0, 9]])
    _random_image(640, 480, seed=6).save(path)
    with pytest.raises(ImageLoadError, match="changed since its scene was prepared"):
        manager._pixels(opened.content, path)()


@pytest.mark.parametrize("seed", range(12))
def test_square_tiles_at_random_sizes(seed) -> None:
    """Random image sizes (wide, tall, up- and downscaled) and random tiles of the fine scales."""
    rng = np.random.default_rng(100 + seed)
    w, h = (int(v) for v in rng.integers(200, 4400, 2))
    ip = UhrBatImageProcessor()
    source = PILSource(_random_image(w, h, seed))
    tiles = SquareTiles(ip, source.padded_square())
    for side in (1344, 2688, 4032):
        whole = _whole(ip, source, side)
        pick = torch.from_numpy(rng.choice(whole.shape[0], size=min(9, whole.shape[0]), replace=False))
        assert torch.equal(tiles.tiles(side, pick), whole[pick]), ((w, h), side, pick.tolist())


def test_a_window_read_again_gives_the_same_pyramid(tiny_pipeline, tmp_path) -> None:
    """A window found again by its alias (`WindowSource`) reads its pixels only when finer tiles
    are needed; read then, it is the same pyramid (same content digest, same tiles)."""
    from uhrbat.io.regions import parse_region
    from uhrbat.scene.manager import SceneManager
    from uhrbat.scene.origin import WindowSource
    from uhrbat.scene.store import SceneStore

    path = tmp_path / "scene.png"
    _random_image(900, 700, seed=7).save(path)
    model, processor, lock = tiny_pipeline.model, tiny_pipeline.processor, tiny_pipeline._model_lock
    manager = SceneManager(model, processor, SceneStore(), lock)
    request = parse_region([100, 50, 700, 650])
    first = manager.open_window(path, request, "gated")
    again = manager.open_window(path, request, "gated")
    assert isinstance(again.source, WindowSource) and again.content == first.content
    bare = SceneManager(model, processor, None, lock)  # nothing kept: the window is read again
    read = bare._pixels(first.content, again.source)()
    assert isinstance(read, SquareTiles)
    whole = _whole(processor.image_processor, first.source, 1344)
    assert torch.equal(read.tiles(1344, torch.tensor([2, 15])), whole[[2, 15]])
