"""Progress of one request: `progress(stage, info)` is called when a stage begins.

Stages, in order (some are skipped when their work is reused): `load` (decode the image),
`tiles` (pyramid), `encode` (CLIP + projector; `info["tiles"]`: scale -> tiles), `score`
(relevance pass), `group` (the selector's grouping, e.g. K-Means), `select`, `prefill`,
`decode`, and `done`; a `zoom` question runs them twice, with `zoom` (`info["windows"]`: how many
windows pass 2 reads) between its passes. The callback may raise to cancel the request (a deadline, Ctrl-C): the
exception propagates and nothing is returned. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["STAGES", "Progress"]

Progress = Callable[[str, dict[str, Any]], None]
STAGES = ("load", "tiles", "encode", "score", "group", "select", "prefill", "decode", "zoom", "done")
