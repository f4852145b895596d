"""The shipped DeepSpeed and FSDP configs build real engines on CPU and train, save and resume.

DeepSpeed runs in one fresh interpreter (`engine_smoke`: world size 1, gloo); FSDP needs two
processes (`torchrun --nproc_per_node 2`, gloo) and is marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
CONFIGS = Path(__file__).resolve().parents[1] / "src" / "uhrbat" / "training" / "configs"
BUDGETS = "4,8"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from uhrbat.training.testing import make_tiny_training_setup

    return make_tiny_training_setup(tmp_path_factory.mktemp("eng"), n=4, scales=[336, 672], budgets=[4, 8])


def _common(setup) -> list[str]:
    return [
        "--model",
        str(setup.checkpoint),
        "--data",
        str(setup.manifest),
        "--budgets",
        BUDGETS,
        "--max-steps",
        "2",
        "--set",
        "bf16=false",
        "--set",
        "report_to=none",
        "--set",
        "kmeans_clusters=4",
        "--set",
        "kmeans_iters=2",
        "--set",
        "save_steps=1",
        "--set",
        "gradient_accumulation_steps=1",
        "--set",
        "learning_rate=1e-3",
        "--set",
        "warmup_ratio=0",
    ]


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


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install deepspeed)")
def test_deepspeed_zero2_offload_resume_and_zero3_on_cpu(setup, tmp_path) -> None:
    """ZeRO-2 with CPU optimizer offload trains, saves our format, resumes bit-exactly; ZeRO-3 trains."""
    from uhrbat.modeling.loading import load

    common = _common(setup)
    # DeepSpeedCPUAdam needs a C++ JIT build; torch's AdamW keeps the same offload path testable.
    torch_adam = [
        "--set",
        "deepspeed_overrides={optimizer: {params: {torch_adam: true}}, zero_force_ds_cpu_optimizer: false}",
    ]
    a, b = tmp_path / "z2o", tmp_path / "z3"
    runs = [
        common
        + ["--output-dir", str(a), "--deepspeed", "zero2_offload", "--summary", str(tmp_path / "a.json")]
        + torch_adam,
        common
        + ["--output-dir", str(a), "--deepspeed", "zero2_offload", "--summary", str(tmp_path / "a2.json")]
        + torch_adam,
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
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install deepspeed)")
def test_deepspeed_zero2_offload_with_deepspeed_cpu_adam(setup, tmp_path) -> None:
    """The shipped offload config as is (DeepSpeedCPUAdam: JIT-compiles DeepSpeed's cpu_adam op)."""
    out = tmp_path / "z2o"
    runs = [
        _common(setup)
        + ["--output-dir", str(out), "--deepspeed", "zero2_offload", "--summary", str(tmp_path / "s.json")]
    ]
    proc = _python(f"from uhrbat.training.testing import engine_smoke\nengine_smoke(*{runs!r})\n", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["engine"]["offload_optimizer"] == "cpu" and s["engine"]["optimizer"] == "DeepSpeedCPUAdam"


_FSDP_WORKER = r"""
import json, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from uhrbat.modeling.loading import load
from uhrbat.training.collator import UhrBatCollator
from uhrbat.training.dataset import SftDataset
from uhrbat.training.freeze import apply_freeze, merged_state_dict

ckpt, manifest, cfg_path, out = sys.argv[1:5]
dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = json.load(open(cfg_path))
model, proc = load(ckpt)
apply_freeze(model, "vision_projector,token_mlp,llm")
# Accelerate's FSDP2 transformer-based auto wrap: each listed layer class, then the root.
wrap = set(cfg["transformer_layer_cls_to_wrap"])
units = [m for m in model.modules() if type(m).__name__ in wrap]
for m in units:
    fully_shard(m, reshard_after_forward=cfg["reshard_after_forward"])
fully_shard(model, reshard_after_forward=cfg["reshard_after_forward"])
ds = SftDataset(manifest, proc, [4, 8], 512)
col = UhrBatCollator(proc.tokenizer.pad_token_id, [4, 8], selection={"kmeans_clusters": 4, "kmeans_iters": 2})
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model.train()
losses = []
for step in range(2):
    loss = model(**col([ds[2 * step + rank]])).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    losses.append(loss.item())
sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    full, _ = load(ckpt)
    full.save_pretrained(out, state_dict=merged_state_dict(full, sd))
    proc.save_pretrained(out)
    print(json.dumps({"units": len(units), "losses": losses}))
# Both ranks leave together: a rank that tears gloo down while its peer still saves can abort
# ("terminate called without an active exception").
dist.barrier()
dist.destroy_process_group()
"""


def test_fsdp2_config_shards_the_model_on_two_cpu_processes(setup, tmp_path) -> None:
    """Accelerate runs FSDP on accelerators only; on CPU the shipped fsdp.json is applied with torch's
    `fully_shard` (as Accelerate's FSDP2 path does) across 2 gloo processes: trains, gathers the full
    state dict, which saves as a checkpoint in our format."""
    from uhrbat.modeling.loading import load

    worker = tmp_path / "fsdp_worker.py"
    worker.write_text(_FSDP_WORKER)
    out = tmp_path / "fsdp-out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29563",
        str(worker),
        str(setup.checkpoint),
        str(setup.manifest),
        str(CONFIGS / "fsdp.json"),
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert info["units"] == 2 + 3  # Qwen2 decoder layers + CLIP encoder layers of the tiny model
    assert all(x == x and x < 20 for x in info["losses"])
    model, _ = load(out)
    start, _ = load(setup.checkpoint)
    assert not torch_equal(model.projector.fc1.weight, start.projector.fc1.weight)
    assert torch_equal(
        model.vision_tower.embeddings.patch_embedding.weight, start.vision_tower.embeddings.patch_embedding.weight
    )


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


@pytest.mark.gpu
def test_fsdp_trainer_on_gpu_train_save_resume(setup, tmp_path) -> None:
    """The Trainer's own FSDP path (`--fsdp`), which Accelerate enables on accelerators only."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("FSDP through Accelerate needs a GPU")
    from uhrbat.modeling.loading import load

    out = tmp_path / "fsdp"

    def torchrun(summary: Path) -> None:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "1",
            "--master_port",
            "29564",
            "-m",
            "uhrbat.cli.main",
            "train",
            *_common(setup),
            "--output-dir",
            str(out),
            "--fsdp",
            "full_shard auto_wrap",
            "--summary",
            str(summary),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]

    torchrun(tmp_path / "a.json")
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["engine"]["engine"] == "fsdp"
    shutil.rmtree(out / "checkpoint-2")
    torchrun(tmp_path / "b.json")
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["resumed_from"] == str(out / "checkpoint-1")
    assert len(second["step_losses"]) == 1
    load(out)
