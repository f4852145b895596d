"""README claims checked by QA that no other test pinned: how a reference-format folder is refused
by each loading entry (*Checkpoints*), and how missing / unreadable mask files are reported by
`uhrbat ask` (*Command line*, "Checked before anything runs"). No model is loaded."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import ASSETS, SHARED
from uhrbat.cli.main import main

TINY = SHARED / "parity" / "uhrbat_tiny"
AERIAL = str(ASSETS / "aerial" / "neon_yell_1249x1035.png")


def _main(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code, capsys.readouterr().err


@pytest.mark.skipif(not TINY.is_dir(), reason="needs ../shared/parity/uhrbat_tiny")
def test_reference_folder_errors_of_each_loading_entry() -> None:
    """UhrBatForConditionalGeneration names `load` and `uhrbat convert`; the Auto classes give
    transformers' own unknown-architecture error for `llava_qwen` (README *Checkpoints*)."""
    from transformers import AutoConfig

    import uhrbat  # noqa: F401  (registers the Auto classes)
    from uhrbat import UhrBatForConditionalGeneration
    from uhrbat.errors import CheckpointError

    with pytest.raises(CheckpointError) as e:
        UhrBatForConditionalGeneration.from_pretrained(str(TINY))
    assert "uhrbat.modeling.loading.load" in str(e.value) and "uhrbat convert" in str(e.value)
    with pytest.raises(ValueError, match="llava_qwen") as e2:
        AutoConfig.from_pretrained(str(TINY))
    assert not isinstance(e2.value, CheckpointError)


def test_missing_mask_file_is_a_usage_error_before_loading(tmp_path, capsys) -> None:
    code, err = _main(
        capsys, "ask", AERIAL, "q", "--model", "/nonexistent/model", "--selector", "segments",
        "--masks", str(tmp_path / "none.safetensors"),
    )  # fmt: skip
    assert code == 2 and err.startswith("Usage: uhrbat ask") and "Invalid value for '--masks'" in err
    assert "loading" not in err


def test_unreadable_mask_file_is_one_error_line_before_loading(tmp_path, capsys) -> None:
    bad = tmp_path / "m.safetensors"
    bad.write_bytes(b"junk\n")
    code, err = _main(
        capsys, "ask", AERIAL, "q", "--model", "/nonexistent/model", "--selector", "segments", "--masks", str(bad)
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: cannot read mask file"), err


def test_cli_runner_lists_every_command_in_help() -> None:
    """`uhrbat --help` lists every command of the README's *Command line* table."""
    from uhrbat.cli.main import app

    out = CliRunner().invoke(app, ["--help"]).output
    names = ("ask", "chat", "trace", "convert", "eval", "score", "train", "data", "masks", "demo", "serve", "batch")
    for name in names:
        assert f" {name} " in out, name


@pytest.mark.parametrize(
    "line, message",
    [
        ("how many <image> ships?", "error: the question contains an extra '<image>' marker; the image is given"),
        ("<image>", "error: the question is empty"),
    ],
)
def test_chat_bad_question_says_what_ask_says(line, message) -> None:
    """`uhrbat chat` (README *Command line*: "A bad question ... prints one `error: …` line") words a
    bad question as `ask` does, not with the Python API's "pass the image as an image part" advice."""
    from test_cli_chat import FakePipe, session

    pipe = FakePipe()
    s, out, notes = session(pipe)
    assert s.handle(line) is True
    assert out == [] and pipe.calls == [] and len(notes) == 1 and notes[0].startswith(message), notes
    assert "image part" not in notes[0]
    s.handle("<image>\nfine?")  # a leading marker is refused the same way, as in `ask`
    assert pipe.calls == [] and notes[-1].startswith("error: the question contains an extra '<image>' marker")


@pytest.mark.skipif(not TINY.is_dir(), reason="needs ../shared/parity/uhrbat_tiny")
def test_a_missing_vision_tower_is_named_as_given(tmp_path) -> None:
    """`--vision-tower DIR` (README *Command line*) that does not exist is named in the error,
    not the checkpoint's own `mm_vision_tower` entry."""
    from uhrbat.errors import CheckpointError
    from uhrbat.modeling.conversion import reference_config

    missing = tmp_path / "no_clip"
    with pytest.raises(CheckpointError, match="no_clip") as e:
        reference_config(TINY, vision_tower=missing)
    assert "tiny_clip" not in str(e.value)
    _, vpath = reference_config(TINY, vision_tower=SHARED / "parity" / "tiny_clip")
    assert vpath == (SHARED / "parity" / "tiny_clip").resolve()


def test_pixel_limit_message_names_our_limit_only(tmp_path) -> None:
    """`--max-pixels` (README *GeoTIFF input*) far below the image: one line naming the image's
    pixels and our limit, never Pillow's own (twice as high) threshold."""
    from PIL import Image

    from uhrbat.errors import ImageLoadError
    from uhrbat.io import open_image

    path = tmp_path / "a.png"
    Image.new("RGB", (50, 30)).save(path)
    for trust in ("local", "untrusted"):
        with pytest.raises(ImageLoadError) as e:
            open_image(path, max_pixels=100, trust=trust)  # > 2x over: Pillow's guard fires first
        msg = str(e.value)
        assert "has 1,500 pixels, which exceeds the pixel limit of 100 pixels" in msg, msg
        assert "limit of 200 " not in msg and "decompression bomb" not in msg and "\n" not in msg


def test_cache_dir_expands_the_home_folder(tmp_path, monkeypatch) -> None:
    """README *Many questions per scene* passes `cache_dir="~/.cache/uhrbat/scenes"`: that is the
    home folder's cache, never a literal `~` folder in the working directory."""
    from uhrbat.pipeline import _make_store

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    for scene_cache in (True, 2**20):
        cache = _make_store(scene_cache, "~/.cache/uhrbat/scenes")
        assert cache.cache_dir == tmp_path / "home" / ".cache" / "uhrbat" / "scenes"
