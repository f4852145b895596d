"""The one options vocabulary: selection, generation and reading, as immutable pydantic models.

Every entry point speaks these names - Python keywords (`pipe.ask(..., kmeans_clusters=0)`),
`generate`/`forward` keywords, CLI flags (the same names with dashes, `--kmeans-clusters`; the
old `--clusters`/`--iters`/`--kmeans` stay as aliases), chat `/` commands, HTTP `extra_body`,
batch and eval configs. A request's options are validated once (construction), resolved once
against the model's config (`SelectionOptions.resolve`), and then travel typed.

`None` means "not given": the checkpoint's value applies at resolution. Bad values raise one
`UhrBatError` line naming the option and the fix (`SelectionOptions.of(...)`; the plain
constructor raises pydantic's `ValidationError`, which FastAPI turns into a 4xx).

This module must not import torch: the CLI builds `--help` from it. The selector names come
from the registry's module table (`uhrbat.selectors`), which imports nothing heavy either.
"""

from __future__ import annotations

import difflib
import math
import operator
import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from uhrbat.errors import BudgetError, ConfigError, UhrBatError
from uhrbat.selectors import check_selector_name, selector_names

__all__ = [
    "COMPAT_MODES",
    "DEFAULT_GATE_MARGIN",
    "ENCODE_MODES",
    "KMEANS_MODES",
    "MAX_ZOOM",
    "GenerationOptions",
    "REGION_FIELDS",
    "ReadOptions",
    "ResolvedSelection",
    "SelectionOptions",
    "options_table",
    "parse_budgets",
]

KMEANS_MODES = ("fast", "exact")
ENCODE_MODES = ("full", "gated")
COMPAT_MODES = ("none", "reference")
#: `encode="gated"`: at each finer scale, encode the most relevant tiles until they hold at least
#: this many times the scale's budget in tokens (see README "Gated encoding").
DEFAULT_GATE_MARGIN = 16.0
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_STRETCH = (2.0, 98.0)  # == uhrbat.io.images.DEFAULT_STRETCH (checked in tests)
DEFAULT_MAX_PIXELS = 1_500_000_000  # == uhrbat.io.images.DEFAULT_MAX_PIXELS (checked in tests)
#: Most windows one `zoom` question may look at (each is a full pass: read, encode, answer).
MAX_ZOOM = 8


# ----------------------------------------------------------------------------- value parsers
def parse_budgets(budgets: Any, num_scales: int | None = None) -> list[int]:
    """The one budget parser: per-scale visual-token budgets from a "80,320,600,2000" string or
    a sequence of integers, for every path (CLI, chat, demo, server, training recipes, the API).

    Rule: integers >= 0 only (`"80.0"`, `2.5`, `True`, empty items are errors), not all zero,
    and exactly `num_scales` of them when `num_scales` is given. Raises `BudgetError` (one line).
    """
    if isinstance(budgets, str):
        items: list[Any] = [b.strip() for b in budgets.split(",")]
        if items == [""]:
            raise BudgetError("budgets are empty; give one integer per scale, e.g. 80,320,600,2000")
    else:
        try:
            items = list(budgets)
        except TypeError:
            raise BudgetError(
                f"budgets must be a list of integers or a string like '80,320,600,2000', got {budgets!r}"
            ) from None
    out: list[int] = []
    for b in items:
        if isinstance(b, str):
            if re.fullmatch(r"-\d+", b):
                raise BudgetError(f"budget {int(b)} is negative; budgets must be >= 0")
            if not re.fullmatch(r"\d+", b):
                what = "an empty budget" if b == "" else f"budget {b!r} is not an integer"
                raise BudgetError(f"{what} in {budgets!r}; budgets are comma-separated integers, e.g. 80,320,600,2000")
            v = int(b)
        else:
            if isinstance(b, (bool, float)):
                raise BudgetError(f"budget {b!r} is not an integer; budgets are integers, e.g. [80, 320, 600, 2000]")
            try:
                v = operator.index(b)  # int, numpy / 0-d torch integers
            except TypeError:
                raise BudgetError(
                    f"budget {b!r} is not an integer; budgets are integers, e.g. [80, 320, 600, 2000]"
                ) from None
            if v < 0:
                raise BudgetError(f"budget {v} is negative; budgets must be >= 0")
        out.append(v)
    if num_scales is not None and len(out) != num_scales:
        raise BudgetError(
            f"got {len(out)} budgets {out} but the model has {num_scales} scales; give one budget per scale"
        )
    if out and not any(out):
        raise BudgetError(
            f"budgets {out} are all 0, so the model would see no image; keep at least one token, e.g. 80,320,600,2000"
        )
    return out


def _integer(name: str, value: Any, minimum: int | None = None, why: str = "", error: type = ConfigError) -> int:
    """`value` as a Python int (ints, numpy / 0-d torch integers; never bool or float)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise error(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and v < minimum:
        raise error(f"{name} must be >= {minimum}{why}, got {v}")
    return v


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- models
def _cli(*flags: str, metavar: str | None = None, chat: tuple[str, ...] = ()) -> dict[str, Any]:
    """Field metadata for the CLI and chat: flag names (the first is canonical) and aliases."""
    return {"flags": list(flags), "metavar": metavar, "chat": list(chat)}


class _Options(BaseModel):
    """Frozen, validated once; unknown names are refused (a typo never silently does nothing)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def of(cls, **given: Any):
        """Construct from keywords with one-line `UhrBatError`s (unknown names included)."""
        unknown = [k for k in given if k not in cls.model_fields]
        if unknown and cls.model_config.get("extra") == "forbid":
            raise ConfigError(_unknown(unknown[0], cls.model_fields))
        try:
            return cls(**given)
        except ValidationError as e:
            raise _one_line(e) from None

    def given(self) -> dict[str, Any]:
        """The options that were given (not None), as keyword arguments."""
        out = {k: getattr(self, k) for k in type(self).model_fields if getattr(self, k) is not None}
        out.update(self.model_extra or {})
        return {k: list(v) if isinstance(v, tuple) and k == "budgets" else v for k, v in out.items()}

    def updated(self, **overrides: Any):
        """A copy with the given (non-None) `overrides`, validated."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return type(self).of(**{**self.given(), **overrides}) if overrides else self


def _unknown(name: str, fields: dict[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(fields), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known options: {', '.join(fields)}"
    return f"unknown option {name!r}{hint}"


def _one_line(error: ValidationError) -> UhrBatError:
    """The first problem of a pydantic `ValidationError` as one of our one-line errors."""
    first = error.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, UhrBatError):
        return cause
    where = ".".join(str(p) for p in first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        return ConfigError(f"unknown option {where!r}")
    return ConfigError(f"{where}: {first.get('msg')}, got {first.get('input')!r}")


class SelectionOptions(_Options):
    """Which visual tokens the LLM sees (every field optional: None = the checkpoint's value)."""

    budgets: tuple[int, ...] | None = Field(
        None,
        description="visual tokens kept per scale: one integer >= 0 per scale, not all 0 (e.g. 80,320,600,2000)",
        json_schema_extra=_cli("--budgets", metavar="B1,B2,..."),
    )
    selector: str | None = Field(
        None,
        description="how tokens are grouped and chosen: a registered selector (" + ", ".join(selector_names()) + ")",
        json_schema_extra=_cli("--selector", metavar="NAME"),
    )
    kmeans_clusters: int | None = Field(
        None,
        description="K-Means clusters per scale; 0 = the scale's budget",
        json_schema_extra=_cli("--kmeans-clusters", "--clusters", metavar="K", chat=("clusters",)),
    )
    kmeans_iters: int | None = Field(
        None,
        description="maximum K-Means (Lloyd) iterations, >= 1",
        json_schema_extra=_cli("--kmeans-iters", "--iters", metavar="N", chat=("iters",)),
    )
    kmeans_mode: Literal["fast", "exact"] | None = Field(
        None,
        description="fast: same clustering, less work; exact: the reference's loop order, bit for bit",
        json_schema_extra=_cli("--kmeans-mode", "--kmeans", metavar="MODE", chat=("kmeans",)),
    )
    seed: int | None = Field(
        None, description="seed of the K-Means initialisation", json_schema_extra=_cli("--seed", metavar="S")
    )
    encode: Literal["full", "gated"] | None = Field(
        None,
        description="full: encode every tile; gated: at finer scales only the tiles that can matter",
        json_schema_extra=_cli("--encode", metavar="MODE"),
    )
    gate_margin: float | None = Field(
        None,
        description="gated: encode the most relevant tiles until they hold >= m x the scale's budget in tokens "
        f"(default {DEFAULT_GATE_MARGIN:g})",
        json_schema_extra=_cli("--gate-margin", metavar="M"),
    )
    zoom: int | None = Field(
        None,
        description="look closer (our training-free addition, not the paper's): pass 1 over the scene proposes up to "
        f"N high-relevance windows (0..{MAX_ZOOM}), pass 2 answers from them at native resolution; 0 = off",
        json_schema_extra=_cli("--zoom", metavar="N"),
    )

    # ------------------------------------------------------------------ validation
    @field_validator("budgets", mode="before")
    @classmethod
    def _budgets(cls, v: Any) -> tuple[int, ...] | None:
        return None if v is None else tuple(parse_budgets(v))

    @field_validator("selector", mode="before")
    @classmethod
    def _selector(cls, v: Any) -> str | None:
        return None if v is None else check_selector_name(v)

    @field_validator("kmeans_clusters", mode="before")
    @classmethod
    def _clusters(cls, v: Any) -> int | None:
        return None if v is None else _integer("kmeans_clusters", v, 0, " (0 = the scale's budget)")

    @field_validator("kmeans_iters", mode="before")
    @classmethod
    def _iters(cls, v: Any) -> int | None:
        return None if v is None else _integer("kmeans_iters", v, 1, " (Lloyd iterations)")

    @field_validator("kmeans_mode", mode="before")
    @classmethod
    def _mode(cls, v: Any) -> str | None:
        return None if v is None else _choice("kmeans_mode", v, KMEANS_MODES)

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, v: Any) -> int | None:
        return None if v is None else _integer("seed", v)

    @field_validator("encode", mode="before")
    @classmethod
    def _encode(cls, v: Any) -> str | None:
        return None if v is None else _choice("encode", v, ENCODE_MODES)

    @field_validator("gate_margin", mode="before")
    @classmethod
    def _margin(cls, v: Any) -> float | None:
        if v is None:
            return None
        ok = not isinstance(v, (bool, str)) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0
        if not ok:
            raise ConfigError(f"gate_margin must be a number > 0 (e.g. {DEFAULT_GATE_MARGIN:g}), got {v!r}")
        return float(v)

    @field_validator("zoom", mode="before")
    @classmethod
    def _zoom(cls, v: Any) -> int | None:
        return None if v is None else _integer("zoom", v, 0, " (0 = off)")

    @field_validator("zoom")
    @classmethod
    def _zoom_max(cls, v: int | None) -> int | None:
        if v is not None and v > MAX_ZOOM:
            raise ConfigError(f"zoom must be <= {MAX_ZOOM} windows (each is a full pass over its window), got {v}")
        return v

    # ------------------------------------------------------------------ resolution
    def resolve(self, config: Any) -> ResolvedSelection:
        """Every option filled in from `config` (a `UhrBatConfig`) and checked against it
        (one budget per scale). Called once per request."""
        if isinstance(self, ResolvedSelection):
            parse_budgets(self.budgets, len(config.scales))
            return self

        def pick(name: str, default: Any) -> Any:
            value = getattr(self, name)
            return default if value is None else value

        return ResolvedSelection(
            budgets=tuple(parse_budgets(pick("budgets", config.budgets), len(config.scales))),
            selector=pick("selector", config.selector),
            kmeans_clusters=pick("kmeans_clusters", config.kmeans_clusters),
            kmeans_iters=pick("kmeans_iters", config.kmeans_iters),
            kmeans_mode=pick("kmeans_mode", config.kmeans_mode),
            seed=pick("seed", config.seed),
            encode=pick("encode", "full"),
            gate_margin=pick("gate_margin", DEFAULT_GATE_MARGIN),
            zoom=pick("zoom", 0),
        )


class ResolvedSelection(SelectionOptions):
    """`SelectionOptions` with every value filled in for one model (`SelectionOptions.resolve`).

    `kmeans_clusters` stays None when the checkpoint leaves K to the budgets (None or 0: K = the
    scale's budget)."""

    budgets: tuple[int, ...]
    selector: str
    kmeans_iters: int
    kmeans_mode: Literal["fast", "exact"]
    seed: int
    encode: Literal["full", "gated"]
    gate_margin: float
    zoom: int

    def clusters(self, budget: int) -> int:
        """K requested for a scale with `budget` (before clamping to the scale's tokens)."""
        return self.kmeans_clusters if self.kmeans_clusters else budget


class GenerationOptions(_Options):
    """How the answer is generated; other keywords (`streamer`, `logits_processor`, ...) pass
    through to transformers' `generate` unchanged."""

    model_config = ConfigDict(frozen=True, extra="allow", arbitrary_types_allowed=True)

    max_new_tokens: int = Field(
        DEFAULT_MAX_NEW_TOKENS,
        description="longest answer, in tokens",
        json_schema_extra=_cli("--max-new-tokens", metavar="N"),
    )
    min_new_tokens: int | None = Field(None, description="shortest answer, in tokens")
    do_sample: bool | None = Field(None, description="sample instead of greedy decoding")
    temperature: float | None = Field(None, description="sampling temperature")
    top_p: float | None = Field(None, description="nucleus sampling mass")
    top_k: int | None = Field(None, description="sample among the k most likely tokens")
    num_beams: int | None = Field(None, description="beam search width")
    repetition_penalty: float | None = Field(None, description="penalty on repeated tokens")
    stop_strings: str | list[str] | None = Field(None, description="stop when the answer ends with one of these")

    @field_validator("max_new_tokens", mode="before")
    @classmethod
    def _max_new(cls, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BudgetError(f"max_new_tokens must be an integer >= 1, got {v!r}")
        return v

    @classmethod
    def of(cls, **given: Any) -> GenerationOptions:
        """As `_Options.of`; an unknown keyword that looks like a selection option (`kmeans_cluster`)
        is refused here instead of reaching transformers' `generate`."""
        for name in given:
            if name not in cls.model_fields and name not in SelectionOptions.model_fields:
                close = difflib.get_close_matches(name, list(SelectionOptions.model_fields), n=1, cutoff=0.85)
                if close:
                    raise ConfigError(f"unknown option {name!r}; did you mean {close[0]!r}?")
        return super().of(**given)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' `generate` (unset ones left out)."""
        return self.given()


#: The region fields of `ReadOptions` (one window of the scene, `uhrbat.io.regions`).
REGION_FIELDS = ("region", "region_crs", "region_file", "region_geojson")


class ReadOptions(_Options):
    """How an image file becomes RGB pixels (`uhrbat.io.open_image`), and which window of it:
    `region` (pixels, or map coordinates with `region_crs`), `region_file` (a GeoJSON file; local
    callers only) or `region_geojson` (the same GeoJSON inline). A region is parsed and checked
    once, at construction (`region_request()`); placing it on an image (outside the raster,
    map coordinates without georeference) happens when the image is opened."""

    bands: tuple[int, ...] | None = Field(
        None,
        description="raster bands used as R,G,B (or one grey band), 1-based, e.g. 4,3,2",
        json_schema_extra=_cli("--bands", metavar="R,G,B"),
    )
    stretch: tuple[float, float] | None = Field(
        DEFAULT_STRETCH,
        description="percentiles that map 16-bit / float bands to 8-bit (None: the full range)",
        json_schema_extra=_cli("--stretch", metavar="LOW,HIGH"),
    )
    max_pixels: int | None = Field(
        DEFAULT_MAX_PIXELS,
        description="refuse images with more full-resolution pixels (None or 0: no limit)",
        json_schema_extra=_cli("--max-pixels", metavar="N"),
    )
    region: tuple[int | float, int | float, int | float, int | float] | None = Field(
        None,
        description="ask about one window of the scene, read at native resolution: x0,y0,x1,y1 in pixels of the "
        "full image (x right, y down; x1, y1 exclusive), or map coordinates with region_crs",
        json_schema_extra=_cli("--region", metavar="X0,Y0,X1,Y1"),
    )
    region_crs: str | None = Field(
        None,
        description="CRS of region's four numbers, e.g. EPSG:4326 (any CRS pyproj knows; unset: pixels)",
        json_schema_extra=_cli("--region-crs", metavar="CRS"),
    )
    region_file: str | None = Field(
        None,
        description="a GeoJSON file: the window is the bounding box of its polygons, pixels outside them are padding "
        "(local paths: CLI, batch, eval)",
        json_schema_extra=_cli("--region-file", metavar="FILE"),
    )
    region_geojson: dict[str, Any] | str | None = Field(
        None,
        description="region_file's GeoJSON given inline, an object or its text (Python, HTTP, MCP)",
        json_schema_extra={"flags": [], "table": True},
    )
    _request: Any = PrivateAttr(default=None)

    @field_validator("bands", mode="before")
    @classmethod
    def _bands(cls, v: Any) -> tuple[int, ...] | None:
        if v is None:
            return None
        items = [p for p in v.replace(" ", "").split(",") if p] if isinstance(v, str) else v
        try:
            bands = tuple(int(b) if isinstance(b, str) and b.isdigit() else _integer("band", b) for b in items)
        except (UhrBatError, TypeError):
            raise ConfigError(f"bands must be 1-based band numbers, e.g. 4,3,2; got {v!r}") from None
        if len(bands) not in (1, 3) or any(b < 1 for b in bands):
            raise ConfigError(f"give 1 band (grey) or 3 bands (R,G,B), 1-based, e.g. 4,3,2; got {v!r}")
        return bands

    @field_validator("stretch", mode="before")
    @classmethod
    def _stretch(cls, v: Any) -> tuple[float, float] | None:
        if v is None:
            return None
        parts = v.split(",") if isinstance(v, str) else list(v)
        try:
            lo, hi = (float(p) for p in parts)
        except (TypeError, ValueError):
            raise ConfigError(f"give two percentiles LOW,HIGH, e.g. 2,98; got {v!r}") from None
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"percentiles must satisfy 0 <= LOW < HIGH <= 100, e.g. 2,98; got {v!r}")
        return lo, hi

    @field_validator("max_pixels", mode="before")
    @classmethod
    def _max_pixels(cls, v: Any) -> int | None:
        if v is None:
            return None
        v = _integer("max_pixels", v, 0)
        return v or None

    @field_validator("region", mode="before")
    @classmethod
    def _region_numbers(cls, v: Any) -> tuple[int | float, ...] | None:
        if v is None:
            return None
        from uhrbat.io.regions import region_numbers  # numpy only; imported when a region is given

        return tuple(int(x) if float(x).is_integer() else x for x in region_numbers(v))

    @field_validator("region_file", mode="before")
    @classmethod
    def _region_file(cls, v: Any) -> str | None:
        if v is None:
            return None
        if not isinstance(v, (str, os.PathLike)) or not str(v).strip():
            raise ConfigError(f"region_file must be the path of a GeoJSON file, got {v!r}")
        return os.fspath(v)

    @model_validator(mode="after")
    def _parse_region(self) -> ReadOptions:
        # One parse per request: syntax, CRS, the GeoJSON file's contents (`RegionError`, one line).
        if any(getattr(self, n) is not None for n in REGION_FIELDS):
            from uhrbat.io.regions import parse_region

            self._request = parse_region(
                self.region,
                region_crs=self.region_crs,
                region_file=self.region_file,
                region_geojson=self.region_geojson,
            )
        return self

    def region_request(self) -> Any:
        """The parsed region (`uhrbat.io.regions.RegionRequest`), or None for the whole image."""
        return self._request

    def without_region(self) -> ReadOptions:
        """The same reading options for the whole image."""
        out = self.model_copy(update=dict.fromkeys(REGION_FIELDS))
        out._request = None
        return out

    def region_text(self) -> str | None:
        """`region` as "x0,y0,x1,y1" (whole numbers without a decimal point), or None."""
        return None if self.region is None else ",".join(str(v) for v in self.region)

    def region_given(self) -> dict[str, Any]:
        """The region fields that were given, as keyword arguments."""
        return {n: getattr(self, n) for n in REGION_FIELDS if getattr(self, n) is not None}

    def key(self) -> dict[str, Any]:
        """What the pixels of the whole image depend on, for cache keys (the default reading is
        `{"stretch": ..., "max_pixels": ...}`; bands only when given)."""
        out: dict[str, Any] = {"stretch": self.stretch, "max_pixels": self.max_pixels}
        if self.bands is not None:
            out["bands"] = list(self.bands)
        return out

    def open_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `uhrbat.io.open_image` (the region as its parsed request)."""
        out: dict[str, Any] = {"bands": self.bands, "stretch": self.stretch, "max_pixels": self.max_pixels}
        if self._request is not None:
            out["region"] = self._request
        return out


# ----------------------------------------------------------------------------- documentation
#: The models whose fields make the README's option table, in table order.
DOCUMENTED: tuple[type[_Options], ...] = (SelectionOptions, GenerationOptions, ReadOptions)


def field_flags(model: type[_Options], name: str) -> list[str]:
    """CLI flags of a field (canonical first, then aliases): `--kmeans-clusters`, `--clusters`."""
    extra = model.model_fields[name].json_schema_extra or {}
    flags = extra.get("flags")
    return list(flags if flags is not None else ["--" + name.replace("_", "-")])


def options_table() -> str:
    """The README's option table (Markdown), generated from the models: one row per option with
    its CLI flags (a test checks that the README holds exactly this table)."""
    rows = ["| option | CLI flag | meaning |", "|---|---|---|"]
    for model in DOCUMENTED:
        for name, info in model.model_fields.items():
            extra = info.json_schema_extra or {}
            if not extra.get("flags") and not extra.get("table"):
                continue  # generation passthroughs are transformers' own options
            flags = ", ".join(f"`{f}`" for f in field_flags(model, name)) if extra.get("flags") else "(no flag)"
            rows.append(f"| `{name}` | {flags} | {info.description} |")
    return "\n".join(rows)
