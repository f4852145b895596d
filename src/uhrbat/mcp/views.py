"""`look`: a bounded PNG of a scene, plain or with the last question's relevance overlay."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

#: Longest side of a `look` PNG, in pixels (overlay legend and caption included).
LOOK_MAX_SIDE = 1024


def plain_view(source: Any, max_side: int = LOOK_MAX_SIDE) -> Image.Image:
    """The scene without padding, its longest side `min(max_side, the scene's)`."""
    from uhrbat.io.images import pad_offsets

    w, h = (int(v) for v in source.size)
    side, ox, oy = pad_offsets((w, h))
    k = min(max_side, side) / side
    view_side = max(1, round(side * k))
    vw, vh = max(1, round(w * k)), max(1, round(h * k))
    x0, y0 = min(round(ox * k), view_side - vw), min(round(oy * k), view_side - vh)
    return source.square(view_side).convert("RGB").crop((x0, y0, x0 + vw, y0 + vh))


def overlay_view(
    source: Any, result: Any, question: str, max_side: int = LOOK_MAX_SIDE
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """`uhrbat.io.overlay.render_overlay` of an `AskResult` (relevance heatmap, kept tokens,
    legend, caption), sized so the whole picture's longest side is at most `max_side`; and the
    box `(x0, y0, x1, y1)` of the picture the scene fills."""
    from uhrbat.io.overlay import render_overlay

    def render(view_side: int) -> Any:
        return render_overlay(
            source, result.tokens, result.relevance, question, result.answer, None, view_side, min_width=max_side
        )  # a full-width legend: narrower ones crowd the colour bar's labels

    out = render(max_side)
    excess = max(out.size) - max_side
    if excess > 0:  # the legend and caption add height: shrink the view by as much
        out = render(max(64, max_side - excess))
    image, box = out.image, out.view_box
    if max(image.size) > max_side:  # a caption taller than the view itself: scale the whole picture
        k = max_side / max(image.size)
        size = (max(1, round(image.width * k)), max(1, round(image.height * k)))
        image = image.resize(size, Image.Resampling.LANCZOS)
        box = tuple(round(v * k) for v in box)
    return image, box


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
