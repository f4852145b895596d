"""`uhrbat chat IMAGE`: an interactive session about one scene.

Each line is a question; earlier questions and answers stay in the conversation
(`UhrBatPipeline.chat` messages), and the scene (tiles, CLIP features, K-Means groups) is
prepared once, so follow-up questions only pay for scoring, selection and decoding. Lines that
start with `/` change options for the next questions (same names, values and checks as the
command-line options) or control the session; `/help` lists them. `/region` asks about one
window of the scene (checked against the scene at once, no pixel read), `/zoom N` looks closer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from uhrbat.cli import options as opt
from uhrbat.cli.ask import describe_selection, format_timings, live_status, load_masks, load_pipeline, open_source
from uhrbat.errors import ConfigError, ContextOverflowError, UhrBatError
from uhrbat.options import (
    ENCODE_MODES,
    KMEANS_MODES,
    GenerationOptions,
    ReadOptions,
    SelectionOptions,
    parse_budgets,
)
from uhrbat.selectors import selector_names


def _int(minimum: int | None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise ConfigError(f"{text!r} is not an integer") from None
        if minimum is not None and v < minimum:
            raise ConfigError(f"{v} is below the minimum {minimum}")
        return v

    return parse


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ConfigError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _margin(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a number") from None
    return SelectionOptions.of(gate_margin=value).gate_margin


# command -> (vocabulary name, parser, example); the parsers apply the command-line options' rules.
SETTINGS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "budgets": ("budgets", parse_budgets, "40,160,300,1000"),
    "selector": ("selector", _choice(selector_names()), "topk"),
    "kmeans-clusters": ("kmeans_clusters", _int(0), "0"),
    "kmeans-iters": ("kmeans_iters", _int(1), "5"),
    "seed": ("seed", _int(None), "1"),
    "kmeans-mode": ("kmeans_mode", _choice(KMEANS_MODES), "exact"),
    "encode": ("encode", _choice(ENCODE_MODES), "gated"),
    "gate-margin": ("gate_margin", _margin, "4"),
    "zoom": ("zoom", _int(0), "1"),
    "max-new-tokens": ("max_new_tokens", _int(1), "64"),
}
#: The chat names the vocabulary gives its fields as aliases (`/clusters` = `/kmeans-clusters`).
ALIASES = {
    alias: name
    for name, (field, _, _) in SETTINGS.items()
    for model in (SelectionOptions, GenerationOptions)
    if field in model.model_fields
    for alias in (model.model_fields[field].json_schema_extra or {}).get("chat", [])
}


def _help_text() -> str:
    lines = ["Type a question and press Enter. Commands:"]
    for name, (field, _, _example) in SETTINGS.items():
        model = SelectionOptions if field in SelectionOptions.model_fields else GenerationOptions
        extra = model.model_fields[field].json_schema_extra or {}
        aliases = "".join(f" (/{a})" for a in extra.get("chat", []))
        meta = extra.get("metavar") or "VALUE"
        lines.append(f"  /{name} {meta:<12} {model.model_fields[field].description}{aliases}")
    region = ReadOptions.model_fields
    lines += [
        f"  /region X0,Y0,X1,Y1 [CRS]  {region['region'].description} (CRS, e.g. EPSG:4326)",
        f"  /region-file FILE    {region['region_file'].description}",
        "  /region off          the whole image again (/region default: the region the session started with)",
        "  /<option> default    back to the value the session started with (e.g. /budgets default)",
        "  /show                the current settings",
        "  /reset               forget the conversation (the scene stays prepared)",
        "  /help                this text",
        "  /quit                leave (also /exit, Ctrl-D)",
    ]
    return "\n".join(lines)


HELP = _help_text()


class ChatSession:
    """The state of one chat: the scene, the conversation and the current options.

    `handle(line)` processes one input line and returns False when the session should end;
    output goes through `say` (answers, stdout) and `note` (status, stderr)."""

    def __init__(
        self,
        pipe: Any,
        source: Any,
        settings: dict[str, Any],
        masks: Optional[dict] = None,
        say: Callable[[str], None] = typer.echo,
        note: Callable[[str], None] = lambda m: typer.echo(m, err=True),
        live: bool = False,
    ):
        self.pipe = pipe
        self.source = source
        self.region: dict[str, Any] | None = None  # /region: region keywords; {}: the whole image
        self._whole: Any = None  # the whole image, read when /region off follows a starting --region
        self.masks = masks
        self.initial = dict(settings)
        self.settings = dict(settings)
        self.messages: list[dict[str, Any]] = []
        self.say = say
        self.note = note
        self.live = live  # show the running stage on stderr (a terminal)

    def handle(self, line: str) -> bool:
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            return self._command(line[1:])
        self._ask(line)
        return True

    def _command(self, text: str) -> bool:
        name, _, value = text.partition(" ")
        name, value = name.strip().lower().replace("_", "-"), value.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name in ("help", "h", "?"):
            self.say(HELP)
        elif name == "show":
            self.say(self._describe())
        elif name == "reset":
            self.messages.clear()
            self.note("conversation cleared (the scene stays prepared)")
        elif name in ("region", "region-file"):
            self._region_command(name, value)
        elif name in SETTINGS or name in ALIASES:
            key, parse, _ = SETTINGS[ALIASES.get(name, name)]
            if not value:
                self.note(f"error: /{name} needs a value, e.g. {self._example(name)}; /help lists the commands")
            elif value == "default":
                self._set(key, self.initial.get(key))
                self.note(f"{name} = {self._shown(key)}")
            else:
                before = dict(self.settings)
                try:
                    self._set(key, parse(value))
                    self._check()
                except UhrBatError as e:
                    self.settings = before  # a bad value changes nothing
                    self.note(f"error: /{name} {value}: {e}")
                else:
                    self.note(f"{name} = {self._shown(key)}")
        else:
            self.note(f"error: unknown command /{name}; /help lists the commands")
        return True

    def _region_command(self, name: str, value: str) -> None:
        """`/region X0,Y0,X1,Y1 [CRS]`, `/region-file FILE`, `/region off`, `/region default`:
        checked against the scene at once (syntax, CRS, inside the image; no pixel is read)."""
        if not value:
            example = "/region-file aoi.geojson" if name == "region-file" else "/region 0,0,1000,1000"
            self.note(f"error: /{name} needs a value, e.g. {example}; /help lists the commands")
            return
        if name == "region" and value.lower() in ("off", "none", "default"):
            self.region = None if value.lower() == "default" else {}
            self.note(f"region = {self._shown_region()}")
            return
        if name == "region-file":
            given = {"region_file": value}
        else:
            numbers, _, crs = value.partition(" ")
            given = {"region": numbers, **({"region_crs": crs.strip()} if crs.strip() else {})}
        try:
            placed = place_region(self.source, ReadOptions.of(**given).region_request())
        except UhrBatError as e:
            self.note(f"error: /{name} {value}: {e}")  # the region stays as it was
            return
        self.region = given
        self.note(f"region = {self._shown_region(placed)}" + (f" ({placed.note})" if placed and placed.note else ""))

    def _shown_region(self, placed: Any = None) -> str:
        if self.region is None:
            start = getattr(self.source, "region", None)
            return "the whole image" if start is None else f"pixels {','.join(map(str, start.pixels))} (the start)"
        if not self.region:
            return "the whole image"
        if placed is not None:
            x0, y0, x1, y1 = placed.pixels
            return f"pixels {x0},{y0},{x1},{y1} ({x1 - x0}x{y1 - y0} px)"
        return ", ".join(f"{k} {v}" for k, v in self.region.items())

    def _image(self) -> tuple[Any, dict[str, Any]]:
        """The image argument and the region keywords of the next question."""
        if self.region is None:
            return self.source, {}
        if not self.region and getattr(self.source, "region", None) is not None:
            if self._whole is None:
                self._whole = self.source.origin.open()
            return self._whole, {}
        return self.source, dict(self.region)

    def _check(self) -> None:
        """Check the selection against the loaded model now (e.g. one budget per scale), not at
        the next question."""
        resolve = getattr(self.pipe, "resolve", None)
        if getattr(getattr(self.pipe, "model", None), "config", None) is None or resolve is None:
            return
        resolve(**{k: v for k, v in self.settings.items() if k != "max_new_tokens"})

    def _set(self, key: str, value: Any) -> None:
        if value is None:
            self.settings.pop(key, None)
        else:
            self.settings[key] = value

    def _shown(self, key: str) -> str:
        v = self.settings.get(key)
        if v is None:
            return "the checkpoint's"
        return ",".join(map(str, v)) if isinstance(v, list) else str(v)

    @staticmethod
    def _example(name: str) -> str:
        canonical = ALIASES.get(name, name)
        return f"/{name} {SETTINGS[canonical][2]}"

    def _describe(self) -> str:
        lines = [f"  {name:<15} {self._shown(key)}" for name, (key, _, _) in SETTINGS.items()]
        lines.append(f"  {'region':<15} {self._shown_region()}")
        lines.append(f"  {'history':<15} {len(self.messages) // 2} earlier question(s)")
        return "\n".join(lines)

    def _ask(self, question: str) -> None:
        from uhrbat.processing.prompt import validate_question

        try:  # the CLI's own wording ("remove '<image>' from the question"), not the API's message-part advice
            question = validate_question(question)
        except UhrBatError as e:
            self.note(f"error: {e}")
            return
        if not self.messages:
            content: Any = [{"type": "image"}, {"type": "text", "text": question}]
        else:
            content = question
        messages = self.messages + [{"role": "user", "content": content}]
        kw = dict(self.settings)
        max_new_tokens = kw.pop("max_new_tokens", 512)
        try:
            image, region = self._image()
            with live_status(self.live) as progress:
                extra = {"progress": progress} if progress is not None else {}
                res = self.pipe.chat(
                    image, messages, max_new_tokens=max_new_tokens, masks=self.masks, **kw, **region, **extra
                )
        except UhrBatError as e:  # a bad question or option: say it, keep the session
            hint = "; /reset forgets the earlier turns" if isinstance(e, ContextOverflowError) and self.messages else ""
            self.note(f"error: {e}{hint}")
            return
        self.messages = messages + [{"role": "assistant", "content": res.answer}]
        self.say(res.answer)
        self.note(format_timings(res))


def place_region(source: Any, request: Any) -> Any:
    """`request` placed on the scene `source` shows (its whole image when `source` is a window),
    from the size and georeference alone (`RegionError` when it does not fit); None when the
    source does not say its size."""
    from uhrbat.io.regions import resolve_region

    start = getattr(source, "region", None)
    if start is not None:
        return resolve_region(request, start.scene_size, start.scene_georef, image="the image")
    if getattr(source, "size", None) is None:
        return None
    return resolve_region(request, tuple(source.size), getattr(source, "georef", None), image="the image")


def _read_lines(prompt: str):
    """Input lines: a rich prompt on a terminal, plain lines from a pipe (no prompt noise)."""
    interactive = sys.stdin.isatty()
    if interactive:
        from rich.prompt import Prompt

        while True:
            try:
                yield Prompt.ask(prompt)
            except EOFError:
                return
    else:
        for line in sys.stdin:
            yield line.rstrip("\n")


@opt.shared("selection", "masks", "model", "cache", "generation", "reading")
def chat(
    image: Annotated[
        Path, typer.Argument(metavar="IMAGE", help="Image file (PNG/JPEG/TIFF/GeoTIFF/COG/JPEG2000 ...).")
    ],
    *,
    opts: opt.Shared,
) -> None:
    """Chat about one image: each line is a question, follow-ups see the earlier turns.

    Lines starting with / change options (/budgets 40,160,300,1000, /selector, /kmeans-clusters,
    /kmeans-iters, /seed, /kmeans-mode, /encode, /gate-margin, /zoom, /max-new-tokens; the old
    /clusters, /iters, /kmeans too; /region X0,Y0,X1,Y1 [CRS], /region-file FILE, /region off)
    or control the session (/show, /reset, /help, /quit). Answers go to stdout, timings and notes
    to stderr; lines can also be piped in."""
    selection = opts.selection
    load = opts.load
    source = open_source(image, opts.read)
    mask = load_masks(opts.masks)
    pipe, t_load = load_pipeline(opts.model, load, selection)
    typer.echo(f"model loaded in {t_load:.1f}s; {describe_selection(pipe, selection)}", err=True)
    typer.echo(
        f"chatting about {image} ({source.size[0]}x{source.size[1]} px); /help lists the commands, /quit leaves.",
        err=True,
    )
    live = sys.stdin.isatty() and sys.stderr.isatty()
    session = ChatSession(pipe, source, dict(selection, max_new_tokens=opts.max_new_tokens), masks=mask, live=live)
    for line in _read_lines("[bold cyan]?[/bold cyan]"):
        try:
            if not session.handle(line):
                break
        except KeyboardInterrupt:  # Ctrl-C while answering stops that answer, not the session
            typer.echo("interrupted; ask again or /quit", err=True)


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)
