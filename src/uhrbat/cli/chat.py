"""`uhrbat chat IMAGE`: an interactive session about one scene.

Each line is a question; earlier questions and answers stay in the conversation
(`UhrBatPipeline.chat` messages), and the scene (tiles, CLIP features, K-Means groups) is
prepared once, so follow-up questions only pay for scoring, selection and decoding. Lines that
start with `/` change options for the next questions (same names, values and checks as the
command-line options) or control the session; `/help` lists them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from uhrbat.cli import options as opt
from uhrbat.cli.ask import describe_selection, format_timings, load_masks, load_pipeline, open_source
from uhrbat.errors import ConfigError, ContextOverflowError, UhrBatError
from uhrbat.modeling.hub import DEFAULT_MODEL

HELP = """\
Type a question and press Enter. Commands:
  /budgets B1,B2,...   visual tokens per scale, e.g. /budgets 40,160,300,1000
  /selector NAME       kmeans | segments | topk
  /clusters K          K-Means clusters per scale (0 = the scale's budget)
  /iters N             maximum K-Means iterations
  /seed S              K-Means initialisation seed
  /kmeans MODE         fast | exact
  /max-new-tokens N    longest answer, in tokens
  /<option> default    back to the value the session started with (e.g. /budgets default)
  /show                the current settings
  /reset               forget the conversation (the scene stays prepared)
  /help                this text
  /quit                leave (also /exit, Ctrl-D)"""


def _int(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise ConfigError(f"{text!r} is not an integer") from None
        if v < minimum:
            raise ConfigError(f"{v} is below the minimum {minimum}")
        return v

    return parse


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ConfigError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _budgets(text: str) -> list[int]:
    from uhrbat.processing.processing_uhrbat import parse_budgets

    return parse_budgets(text)


# command -> (pipeline keyword, parser); the parsers apply the command-line options' rules.
SETTINGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "budgets": ("budgets", _budgets),
    "selector": ("selector", _choice(opt.SELECTORS)),
    "clusters": ("kmeans_clusters", _int(0)),
    "iters": ("kmeans_iters", _int(1)),
    "seed": ("seed", _int(-(2**63))),
    "kmeans": ("kmeans_mode", _choice(opt.KMEANS_MODES)),
    "max-new-tokens": ("max_new_tokens", _int(1)),
}


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
    ):
        self.pipe = pipe
        self.source = source
        self.masks = masks
        self.initial = dict(settings)
        self.settings = dict(settings)
        self.messages: list[dict[str, Any]] = []
        self.say = say
        self.note = note

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
        elif name in SETTINGS:
            key, parse = SETTINGS[name]
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

    def _check(self) -> None:
        """Check the selection against the loaded model now (e.g. one budget per scale), not at
        the next question."""
        config = getattr(getattr(self.pipe, "model", None), "config", None)
        if config is None:
            return
        from uhrbat.modeling.modeling_uhrbat import SelectionOptions

        SelectionOptions.resolve(config, **{k: v for k, v in self.settings.items() if k != "max_new_tokens"})

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
        return {"budgets": "/budgets 40,160,300,1000", "selector": "/selector topk", "kmeans": "/kmeans exact"}.get(
            name, f"/{name} 10"
        )

    def _describe(self) -> str:
        lines = [f"  {name:<15} {self._shown(key)}" for name, (key, _) in SETTINGS.items()]
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
            res = self.pipe.chat(self.source, messages, max_new_tokens=max_new_tokens, masks=self.masks, **kw)
        except UhrBatError as e:  # a bad question or option: say it, keep the session
            hint = "; /reset forgets the earlier turns" if isinstance(e, ContextOverflowError) and self.messages else ""
            self.note(f"error: {e}{hint}")
            return
        self.messages = messages + [{"role": "assistant", "content": res.answer}]
        self.say(res.answer)
        self.note(format_timings(res))


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


def chat(
    image: Annotated[
        Path, typer.Argument(metavar="IMAGE", help="Image file (PNG/JPEG/TIFF/GeoTIFF/COG/JPEG2000 ...).")
    ],
    model: opt.Model = DEFAULT_MODEL,
    budgets: opt.Budgets = None,
    selector: opt.Selector = None,
    clusters: opt.Clusters = None,
    iters: opt.Iters = None,
    seed: opt.Seed = None,
    kmeans: opt.KMeans = None,
    masks: opt.Masks = None,
    compat: opt.Compat = None,
    device: opt.Device = "cpu",
    dtype: opt.Dtype = None,
    attn: opt.Attn = None,
    vision_tower: opt.VisionTower = None,
    cache_dir: opt.CacheDir = None,
    max_new_tokens: opt.MaxNewTokens = 512,
    bands: opt.Bands = None,
    stretch: opt.Stretch = opt.DEFAULT_STRETCH,
    max_pixels: opt.MaxPixels = opt.DEFAULT_MAX_PIXELS,
) -> None:
    """Chat about one image: each line is a question, follow-ups see the earlier turns.

    Lines starting with / change options (/budgets 40,160,300,1000, /selector, /clusters,
    /iters, /seed, /kmeans, /max-new-tokens) or control the session (/show, /reset, /help,
    /quit). Answers go to stdout, timings and notes to stderr; lines can also be piped in."""
    selection = opt.selection_kwargs(budgets, selector, clusters, iters, seed, kmeans)
    load = opt.load_kwargs(device, dtype, attn, vision_tower, compat, cache_dir)
    source = open_source(image, opt.read_kwargs(bands, stretch, max_pixels))
    mask = load_masks(masks)
    pipe, t_load = load_pipeline(model, load, selection)
    typer.echo(f"model loaded in {t_load:.1f}s; {describe_selection(pipe, selection)}", err=True)
    typer.echo(
        f"chatting about {image} ({source.size[0]}x{source.size[1]} px); /help lists the commands, /quit leaves.",
        err=True,
    )
    session = ChatSession(pipe, source, dict(selection, max_new_tokens=max_new_tokens), masks=mask)
    for line in _read_lines("[bold cyan]?[/bold cyan]"):
        try:
            if not session.handle(line):
                break
        except KeyboardInterrupt:  # Ctrl-C while answering stops that answer, not the session
            typer.echo("interrupted; ask again or /quit", err=True)


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)
