"""`uhrbat chat IMAGE`: the session logic (commands, history, errors) with a recording fake
pipeline, and a real session on the tiny model fed through stdin."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from conftest import ASSETS
from uhrbat.cli.chat import ChatSession
from uhrbat.cli.main import app
from uhrbat.errors import ContextOverflowError, PromptError

AERIAL = str(ASSETS / "aerial" / "neon_yell_1249x1035.png")
TINY = ["--clusters", "6", "--iters", "3", "--max-new-tokens", "4"]


class FakePipe:
    """Records every chat() call; answers "answer N"."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[dict] = []
        self.fail = fail

    def chat(self, image, messages, **kw):
        if self.fail is not None:
            raise self.fail
        self.calls.append({"image": image, "messages": [dict(m) for m in messages], **kw})
        return SimpleNamespace(answer=f"answer {len(self.calls)}", timings={"select": 0.1}, cache="hit")


def session(pipe=None, **settings):
    out, notes = [], []
    s = ChatSession(pipe or FakePipe(), "SCENE", dict(settings), say=out.append, note=notes.append)
    return s, out, notes


def test_history_is_kept_as_chat_messages() -> None:
    pipe = FakePipe()
    s, out, _ = session(pipe, max_new_tokens=7)
    assert s.handle("How many ships?") and s.handle("  ") and s.handle("Where is the largest?")
    assert out == ["answer 1", "answer 2"]
    first, second = pipe.calls
    assert first["image"] == second["image"] == "SCENE" and first["max_new_tokens"] == 7
    assert first["messages"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many ships?"}]}
    ]
    assert second["messages"][1:] == [
        {"role": "assistant", "content": "answer 1"},
        {"role": "user", "content": "Where is the largest?"},
    ]
    s.handle("/reset")
    s.handle("Again?")
    assert pipe.calls[-1]["messages"][0]["content"][0] == {"type": "image"} and len(pipe.calls[-1]["messages"]) == 1


def test_commands_change_options_with_the_cli_rules() -> None:
    pipe = FakePipe()
    s, out, notes = session(pipe, budgets=[8, 16], max_new_tokens=4)
    for line in [
        "/budgets 40,160,300,1000",
        "/selector topk",
        "/clusters 0",
        "/iters 5",
        "/seed 3",
        "/kmeans exact",
        "/max-new-tokens 9",
    ]:
        assert s.handle(line)
    s.handle("q")
    call = pipe.calls[-1]
    assert call["budgets"] == [40, 160, 300, 1000] and call["selector"] == "topk" and call["kmeans_clusters"] == 0
    assert call["kmeans_iters"] == 5 and call["seed"] == 3 and call["kmeans_mode"] == "exact"
    assert call["max_new_tokens"] == 9
    s.handle("/budgets default")
    s.handle("/selector default")
    s.handle("q2")
    assert pipe.calls[-1]["budgets"] == [8, 16] and "selector" not in pipe.calls[-1]
    assert "budgets = 8,16" in notes and "selector = the checkpoint's" in notes


@pytest.mark.parametrize(
    "line, message",
    [
        ("/budgets 80.0,320", "error: /budgets 80.0,320: budget '80.0' is not an integer"),
        ("/budgets 0,0", "are all 0"),
        ("/selector random", "error: /selector random: 'random' is not one of kmeans, segments, topk, divprune, dpp"),
        ("/kmeans slow", "'slow' is not one of fast, exact"),
        ("/max-new-tokens 0", "error: /max-new-tokens 0: 0 is below the minimum 1"),
        ("/clusters many", "'many' is not an integer"),
        ("/iters 0", "error: /iters 0: 0 is below the minimum 1"),
        ("/budgets", "error: /budgets needs a value, e.g. /budgets 40,160,300,1000"),
        ("/frobnicate", "error: unknown command /frobnicate; /help lists the commands"),
    ],
)
def test_bad_commands_are_one_line_and_keep_the_session(line, message) -> None:
    pipe = FakePipe()
    s, _, notes = session(pipe, budgets=[8, 16])
    assert s.handle(line) is True
    assert len(notes) == 1 and message in notes[0] and "\n" not in notes[0]
    s.handle("q")
    assert pipe.calls[-1]["budgets"] == [8, 16]  # the bad value changed nothing


def test_settings_are_checked_against_the_loaded_model(tiny_pipeline) -> None:
    """With the real (2-scale) model, a budget list of the wrong length is refused at once."""
    s, _, notes = session(tiny_pipeline, budgets=[8, 16])
    s.handle("/budgets 40,160,300,1000")
    assert notes[-1] == (
        "error: /budgets 40,160,300,1000: got 4 budgets [40, 160, 300, 1000] but the model has "
        "2 scales; give one budget per scale"
    )
    assert s.settings["budgets"] == [8, 16]
    s.handle("/budgets 4,8")
    assert notes[-1] == "budgets = 4,8" and s.settings["budgets"] == [4, 8]


def test_pipeline_errors_are_reported_and_the_session_goes_on() -> None:
    s, out, notes = session(FakePipe(fail=PromptError("the question is empty; ask something")))
    assert s.handle("?") is True and out == [] and notes == ["error: the question is empty; ask something"]
    s, out, notes = session(FakePipe(fail=ContextOverflowError("prompt would be 6000 tokens")))
    s.messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    s.handle("more?")
    assert notes == ["error: prompt would be 6000 tokens; /reset forgets the earlier turns"]
    assert len(s.messages) == 2  # the failed turn is not added


def test_help_show_and_quit() -> None:
    s, out, _ = session(budgets=[8, 16])
    s.handle("/help")
    assert "/budgets B1,B2,..." in out[-1] and "/quit" in out[-1]
    s.handle("/show")
    assert "budgets         8,16" in out[-1] and "history         0 earlier question(s)" in out[-1]
    assert s.handle("/quit") is False and s.handle("/exit") is False


# ----------------------------------------------------------------------------- real session
def test_chat_session_on_the_tiny_model(tiny_checkpoint) -> None:
    """Questions piped through stdin: answers on stdout, one per question; the scene is prepared
    once (cache hit from the second question on); the first answer equals `uhrbat ask`'s."""
    runner = CliRunner()
    lines = "How many trees are there?\n/budgets 4,8\nIs there a road?\n/show\n/quit\nNot asked?\n"
    r = runner.invoke(app, ["chat", AERIAL, "--model", str(tiny_checkpoint), "--budgets", "8,16", *TINY], input=lines)
    assert r.exit_code == 0, r.output
    notes = r.stderr.splitlines()
    timing = [ln for ln in notes if "(scene cache:" in ln]
    assert len(timing) == 2 and "scene cache: miss" in timing[0] and "scene cache: hit" in timing[1]
    assert "budgets = 4,8" in notes
    answers = r.stdout.split("  budgets")[0].splitlines()
    assert len(answers) == 2
    a = runner.invoke(
        app,
        [
            "ask",
            AERIAL,
            "How many trees are there?",
            "--model",
            str(tiny_checkpoint),
            "--budgets",
            "8,16",
            "--json",
            *TINY,
        ],
    )
    assert a.exit_code == 0, a.output
    assert answers[0] == json.loads(a.stdout)["answer"]
