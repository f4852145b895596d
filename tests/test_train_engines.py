"""The shipped DeepSpeed and FSDP configs build real engines on CPU and train, save and resume.

DeepSpeed runs in one fresh interpreter (`engine_smoke`: world size 1, gloo); FSDP needs two
processes (`torchrun --nproc_per_node 2`, gloo) and is marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "uhrbat" / "training" / "configs"
BUDGETS = "4,8"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from uhrbat.training.testing import make_tiny_training_setup

    return make_tiny_training_setup(tmp_path_factory.mktemp("eng"), n=4, scales=[336, 672], budgets=[4, 8])


def _common(setup) -> list[str]:
    return ["--model", str(setup.checkpoint), "--data", str(setup.manifest), "--budgets", BUDGETS, "--max-steps", "2",
            "--set", "bf16=false", "--set", "report_to=none", "--set", "kmeans_clusters=4", "--set", "kmeans_iters=2",
            "--set", "save_steps=1", "--set", "gradient_accumulation_steps=1", "--set", "learning_rate=1e-3",
            "--set", "warmup_ratio=0"]


def _python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def test_shipped_engine_configs_are_well_formed() -> None:
    names = sorted(p.name for p in CONFIGS.iterdir())
    assert {"zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json", "fsdp.json"} <= set(names)
    for name in ("zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json"):
        cfg = json.loads((CONFIGS / name).read_text())
        z = cfg["zero_optimization"]
        assert z["stage"] == (3 if "zero3" in name else 2)
        assert ("offload_optimizer" in z) == ("offload" in name)
        # Batch, accumulation, clipping, lr and precision all come from the recipe ("auto").
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
            assert cfg[key] == "auto"
        assert cfg["optimizer"]["params"]["lr"] == "auto" and cfg["bf16"]["enabled"] == "auto"
    offload = json.loads((CONFIGS / "zero2_offload.json").read_text())["zero_optimization"]
    assert offload["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert offload["reduce_bucket_size"] == 5e7 and offload["overlap_comm"] and offload["contiguous_gradients"]
    fsdp = json.loads((CONFIGS / "fsdp.json").read_text())
    assert fsdp["version"] == 2 and "Qwen2DecoderLayer" in fsdp["transformer_layer_cls_to_wrap"]
    assert fsdp["state_dict_type"] == "FULL_STATE_DICT"


def test_deepspeed_zero2_offload_resume_and_zero3_on_cpu(setup, tmp_path) -> None:
    """ZeRO-2 with CPU optimizer offload trains, saves our format, resumes bit-exactly; ZeRO-3 trains."""
    pytest.importorskip("deepspeed")
    from uhrbat.modeling.loading import load

    common = _common(setup)
    # DeepSpeedCPUAdam needs a C++ JIT build; torch's AdamW keeps the same offload path testable.
    torch_adam = ["--set", "deepspeed_overrides={optimizer: {params: {torch_adam: true}}, zero_force_ds_cpu_optimizer: false}"]
    a, b = tmp_path / "z2o", tmp_path / "z3"
    runs = [
        common + ["--output-dir", str(a), "--deepspeed", "zero2_offload", "--summary", str(tmp_path / "a.json")] + torch_adam,
        common + ["--output-dir", str(a), "--deepspeed", "zero2_offload", "--summary", str(tmp_path / "a2.json")] + torch_adam,
        common + ["--output-dir", str(b), "--deepspeed", "zero3", "--summary", str(tmp_path / "b.json")],
    ]
    code = (
        "import shutil, sys\n"
        "from uhrbat.training.testing import engine_smoke\n"
        f"runs = {runs!r}\n"
        "engine_smoke(runs[0])\n"
        f"shutil.rmtree({str(a / 'checkpoint-2')!r})  # crash after step 1\n"
        "engine_smoke(runs[1], runs[2])\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, resumed, z3 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("a", "a2", "b"))
    assert first["engine"]["engine"] == "deepspeed" and first["engine"]["zero_stage"] == 2
    assert first["engine"]["offload_optimizer"] == "cpu"
    assert resumed["resumed_from"] == str(a / "checkpoint-1")
    assert resumed["step_losses"] == first["step_losses"][1:]  # bit-identical after the resume
    assert z3["engine"]["zero_stage"] == 3 and len(z3["step_losses"]) == 2
    assert (a / "checkpoint-1" / "global_step1").is_dir()  # DeepSpeed's own resume state
    for d in (a, a / "checkpoint-1", b):
        model, proc_ = load(d)  # gathered, safetensors, our format
        assert model.config.image_token_id == proc_.image_token_id


@pytest.mark.slow
def test_deepspeed_zero2_offload_with_deepspeed_cpu_adam(setup, tmp_path) -> None:
    """The shipped offload config as is (DeepSpeedCPUAdam: JIT-compiles DeepSpeed's cpu_adam op)."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "z2o"
    runs = [_common(setup) + ["--output-dir", str(out), "--deepspeed", "zero2_offload", "--summary", str(tmp_path / "s.json")]]
    proc = _python(f"from uhrbat.training.testing import engine_smoke\nengine_smoke(*{runs!r})\n", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["engine"]["offload_optimizer"] == "cpu" and s["engine"]["optimizer"] == "DeepSpeedCPUAdam"


@pytest.mark.slow
def test_fsdp_two_processes_on_cpu_train_save_resume(setup, tmp_path) -> None:
    """FSDP2 (shipped fsdp.json) across 2 CPU processes: trains, saves gathered weights, resumes."""
    from uhrbat.modeling.loading import load

    out = tmp_path / "fsdp"

    def torchrun(summary: Path) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563",
               "-m", "uhrbat.cli.main", "train", *_common(setup), "--output-dir", str(out), "--fsdp", "full_shard auto_wrap",
               "--summary", str(summary), "--set", "trainer_args={use_cpu: true, ddp_backend: gloo}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]

    torchrun(tmp_path / "a.json")
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["engine"]["engine"] == "fsdp" and first["engine"]["world_size"] == 2
    shutil.rmtree(out / "checkpoint-2")
    torchrun(tmp_path / "b.json")
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["resumed_from"] == str(out / "checkpoint-1")
    assert second["step_losses"] == first["step_losses"][1:]
    model, _ = load(out)
    assert sum(p.numel() for p in model.parameters()) > 0
