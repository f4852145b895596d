"""Device names are checked once (`uhrbat.devices.resolve_device`): a device this machine does not
have stops every entry point with one line that names it and the fix, before any work.

CUDA availability is monkeypatched, so both sides run on any machine.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys

import pytest
import torch

from conftest import PARITY, ROOT
from uhrbat.devices import resolve_device
from uhrbat.errors import ConfigError


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_resolve_device_names(no_cuda) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"--device gpu: not a device name; use cpu, cuda"):
        resolve_device("gpu")
    with pytest.raises(ConfigError, match=r"unsupported device type 'meta'"):
        resolve_device("meta")


def test_cuda_not_available_is_one_clear_line(no_cuda) -> None:
    with pytest.raises(ConfigError) as e:
        resolve_device("cuda:1")
    msg = str(e.value)
    assert msg.startswith("--device cuda:1: CUDA is not available on this machine (") and msg.endswith(
        "use --device cpu"
    )
    assert "\n" not in msg


def test_cuda_index_beyond_the_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\) \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


def test_load_and_ask_stop_before_loading(no_cuda, capsys: pytest.CaptureFixture) -> None:
    """Used to end in `pin_memory=True requires a CUDA or other accelerator backend`."""
    from uhrbat.cli.main import main
    from uhrbat.modeling.loading import load

    with pytest.raises(ConfigError, match="CUDA is not available"):
        load(PARITY / "uhrbat_tiny", device="cuda")
    image = PARITY / "images" / "image_b.png"
    with pytest.raises(SystemExit) as e:
        main(["ask", str(image), "Is there a ship?", "--model", str(PARITY / "uhrbat_tiny"), "--device", "cuda"])
    assert e.value.code == 2
    line = _one_line("\n".join(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")))
    assert line.startswith("error: --device cuda: CUDA is not available on this machine")


def test_eval_device_is_resolved(no_cuda) -> None:
    from uhrbat.factory import pick_device

    assert pick_device("auto", 0) == "cpu"
    with pytest.raises(ConfigError, match="--device cuda: CUDA is not available"):
        pick_device("cuda", 0)


@pytest.fixture
def unlaunched(no_cuda, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)


def test_train_dry_run_says_deepspeed_needs_cuda(unlaunched, capsys: pytest.CaptureFixture, tmp_path) -> None:
    from uhrbat.cli.main import main

    recipe = str(ROOT / "recipes" / "uhrbat-sft.yaml")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", recipe, "--dry-run"])
    assert e.value.code == 0  # a dry run still prints the recipe
    err = capsys.readouterr().err
    assert _one_line(err) == (
        "will not run on this machine: deepspeed zero2_offload: DeepSpeed needs CUDA, which is not available on "
        f"this machine ({_reason()}); use --deepspeed none"
    )
    with pytest.raises(SystemExit):
        main(["train", "--config", recipe, "--dry-run", "--deepspeed", "none"])
    assert capsys.readouterr().err == ""


def test_train_real_run_fails_early_with_that_line(unlaunched, capsys: pytest.CaptureFixture, tmp_path) -> None:
    """Before loading the model (the recipe's checkpoint does not even exist here): one line."""
    from uhrbat.cli.main import main

    recipe = str(ROOT / "recipes" / "uhrbat-sft.yaml")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", recipe, "--output-dir", str(tmp_path / "run"), "--max-steps", "2"])
    assert e.value.code == 2
    assert _one_line(capsys.readouterr().err).startswith("error: deepspeed zero2_offload: DeepSpeed needs CUDA")
    assert not (tmp_path / "run").exists()


def test_train_machine_problems_fp16_and_qlora(unlaunched) -> None:
    from uhrbat.training.recipe import load_recipe

    r = load_recipe(
        None, [], model="m", data="d", deepspeed="none", bf16=False, fp16=True, **{"lora.r": 8, "lora.quantize": "4bit"}
    )
    problems = r.machine_problems()
    assert [p.split(":")[0] for p in problems] == ["fp16", "lora.quantize 4bit"]
    assert load_recipe(None, [], model="m", data="d", deepspeed="none").machine_problems() == []


def _reason() -> str:
    from uhrbat.devices import cuda_unavailable_reason

    return cuda_unavailable_reason()


def test_default_attention_is_flash_only_on_cuda_half_precision_when_installed(monkeypatch):
    import importlib.util

    from uhrbat.modeling.loading import default_attn_implementation

    # CPU, or fp32 anywhere: transformers' own default (sdpa) is kept.
    assert default_attn_implementation(torch.device("cpu"), torch.bfloat16) is None
    assert default_attn_implementation(torch.device("cuda"), torch.float32) is None
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a)
    )
    assert default_attn_implementation(torch.device("cuda"), torch.bfloat16) == "flash_attention_2"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    assert default_attn_implementation(torch.device("cuda"), torch.float16) is None


# ----------------------------------------------------------------------------- DeepSpeed's CPU notice
_DEEPSPEED_SCRIPT = """
import logging, sys
if sys.argv[1] == "uhrbat":
    import uhrbat  # installs the filter before DeepSpeed is imported
from deepspeed.accelerator import get_accelerator
print(get_accelerator()._name)
logging.getLogger("DeepSpeed").warning("another DeepSpeed warning")
"""


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is in the [train] extra")
def test_deepspeed_cpu_notice_is_silenced_on_cpu_runs() -> None:
    """DeepSpeed warns "Setting accelerator to CPU ..." when it is first imported on a machine
    without CUDA (accelerate imports it on every `save_pretrained`). After `import uhrbat` that
    one record is dropped; DeepSpeed's other warnings still show. (On a CUDA machine DeepSpeed
    prints no such notice; the filter's CUDA side is the next test.)"""
    if torch.cuda.is_available():
        pytest.skip("DeepSpeed prints no CPU notice where CUDA is visible")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", _DEEPSPEED_SCRIPT, mode], capture_output=True, text=True, timeout=300, env=env
        )

    plain, ours = run("plain"), run("uhrbat")
    assert plain.returncode == ours.returncode == 0, (plain.stderr[-2000:], ours.stderr[-2000:])
    # DeepSpeed's logger writes to stdout
    plain_out, our_out = plain.stdout + plain.stderr, ours.stdout + ours.stderr
    assert "cpu" in plain.stdout.splitlines() and "cpu" in ours.stdout.splitlines()
    assert "Setting accelerator to CPU" in plain_out  # the notice this guards against exists
    assert "Setting accelerator to CPU" not in our_out
    assert "another DeepSpeed warning" in our_out


def test_deepspeed_cpu_notice_passes_when_cuda_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a CUDA device visible the notice means DeepSpeed missed it: it is kept."""
    from uhrbat.devices import _DeepSpeedCpuNotice

    notice = logging.LogRecord("DeepSpeed", logging.WARNING, "x.py", 1, "Setting accelerator to CPU. If", None, None)
    other = logging.LogRecord("DeepSpeed", logging.WARNING, "x.py", 1, "something else", None, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _DeepSpeedCpuNotice().filter(notice) and _DeepSpeedCpuNotice().filter(other)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not _DeepSpeedCpuNotice().filter(notice) and _DeepSpeedCpuNotice().filter(other)
