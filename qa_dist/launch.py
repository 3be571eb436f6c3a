"""``qa-dist launch``: one run config to an ``accelerate launch`` line or a Slurm batch script.

Pure planning (strategy choice, memory estimate, command lines, script text) is kept apart from the
few side effects (environment checks, running the line, calling ``sbatch``)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from qa_dist.config import RunConfig
from qa_dist.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SLURM_DIR = ROOT / "slurm"
STRATEGIES = ("ddp", "fsdp", "zero2", "zero3", "zero3_offload")
AUTO_ORDER = ("ddp", "zero2", "zero3", "zero3_offload")  # cheapest first
GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know of the model."""

    parameters: int
    hidden: int
    layers: int
    heads: int


def model_shape(name_or_path: str) -> ModelShape:
    """Parameter count and sizes from the model's config alone (the model is built on the meta
    device: no weights are read or allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForQuestionAnswering

    from qa_dist.models import resolve_model_path

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path: cannot read the config of {name_or_path!r}: {e}") from None
    with torch.device("meta"):
        model = AutoModelForQuestionAnswering.from_config(config)
    return ModelShape(
        parameters=sum(p.numel() for p in model.parameters()),
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
    )


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int) -> float:
    """Activations kept for the backward pass of one micro-batch in 16-bit precision, per layer
    ``s*b*h*(34 + 5*a*s/h)`` bytes (Korthikanti et al. 2022, without recomputation)."""
    s, b, h, a = seq_len, micro_batch, shape.hidden, shape.heads
    return shape.layers * s * b * h * (34 + 5 * a * s / h)


def state_bytes(strategy: str, parameters: int, gpus: int) -> tuple[float, float]:
    """(device, host) bytes per GPU of weights, gradients and AdamW state under mixed precision:
    16 bytes per parameter (2 weights + 2 gradients + 4 fp32 master + 8 Adam moments)."""
    p, n = float(parameters), max(gpus, 1)
    if strategy == "ddp":
        return 16 * p, 0.0
    if strategy == "zero2":  # optimizer state and gradients sharded, 16-bit weights replicated
        return 2 * p + 14 * p / n, 0.0
    if strategy in ("zero3", "fsdp"):  # everything sharded
        return 16 * p / n, 0.0
    if strategy == "zero3_offload":  # shards of 16-bit weights and gradients stay; the rest on the host
        return 4 * p / n, 12 * p / n
    raise ConfigError(f"unknown strategy {strategy!r}: {', '.join(STRATEGIES)}")


@dataclass(frozen=True)
class Estimate:
    strategy: str
    device_gib: float
    host_gib: float
    fits: bool


def estimate(shape: ModelShape, strategy: str, gpus: int, micro_batch: int, seq_len: int, gpu_gib: float) -> Estimate:
    device, host = state_bytes(strategy, shape.parameters, gpus)
    device += activation_bytes(shape, micro_batch, seq_len)
    device_gib = device / GIB + 1.5  # CUDA context, allocator slack, communication buffers
    return Estimate(strategy, device_gib, host / GIB, device_gib <= 0.9 * gpu_gib)


def describe(
    shape: ModelShape, estimates: list[Estimate], chosen: str, gpus: int, micro_batch: int, seq_len: int, gpu_gib: float
) -> str:
    """The estimate behind ``--strategy auto``, as printed."""
    lines = [
        f"strategy auto: {shape.parameters / 1e6:,.0f}M parameters, micro-batch {micro_batch} x {seq_len} "
        f"tokens, {gpus} GPUs of {gpu_gib:.0f} GiB (90% usable):"
    ]
    for e in estimates:
        host = f", host {e.host_gib:.1f} GiB" if e.host_gib else ""
        mark = "<- chosen" if e.strategy == chosen else ("fits" if e.fits else "does not fit")
        lines.append(f"  {e.strategy:14s} {e.device_gib:7.1f} GiB per GPU{host}   {mark}")
    return "\n".join(lines)


def choose_strategy(
    shape: ModelShape, gpus: int, micro_batch: int, seq_len: int, gpu_gib: float
) -> tuple[str, list[Estimate]]:
    """The cheapest strategy that fits (DDP, then ZeRO-2, ZeRO-3, offload), and every estimate."""
    estimates = [estimate(shape, s, gpus, micro_batch, seq_len, gpu_gib) for s in AUTO_ORDER]
    chosen = next((e.strategy for e in estimates if e.fits), None)
    if chosen is None:
        raise ConfigError(
            f"no strategy fits {shape.parameters / 1e6:,.0f}M parameters in {gpu_gib:.0f} GiB per GPU at micro-batch "
            f"{micro_batch} x {seq_len} tokens; lower train.per_device_batch_size or add GPUs"
        )
    return chosen, estimates


@dataclass(frozen=True)
class Plan:
    """Where and how a run is launched."""

    strategy: str
    nodes: int
    processes_per_node: int
    cpu: bool

    @property
    def num_processes(self) -> int:
        """Total over all nodes: what ``accelerate launch --num_processes`` means."""
        return self.nodes * self.processes_per_node

    @property
    def accelerate_config(self) -> Path:
        if self.cpu:
            if self.strategy != "ddp":
                raise ConfigError(
                    f"strategy {self.strategy} needs GPUs here: on CPU qa-dist launch runs DDP over gloo "
                    "(DeepSpeed on CPU works with an explicit accelerate config; FSDP has no CPU path)"
                )
            return CONFIGS / "accelerate" / "cpu_ddp.yaml"
        return CONFIGS / "accelerate" / f"{self.strategy}.yaml"

    @property
    def deepspeed_config(self) -> Path | None:
        return CONFIGS / "deepspeed" / f"{self.strategy}.json" if self.strategy.startswith("zero") else None


def accelerate_args(plan: Plan, *, machine_rank: str = "0", head: str = "127.0.0.1", port: str = "29500") -> list[str]:
    """``accelerate launch`` options for ``plan``. ``machine_rank``/``head``/``port`` may be shell
    expressions (Slurm fills them in on each node)."""
    args = ["--config_file", str(plan.accelerate_config), "--num_processes", str(plan.num_processes)]
    if plan.deepspeed_config:
        args += ["--deepspeed_config_file", str(plan.deepspeed_config)]
    if plan.nodes > 1:
        args += ["--num_machines", str(plan.nodes), "--machine_rank", machine_rank]
        args += ["--main_process_ip", head, "--main_process_port", port]
    else:
        args += ["--num_machines", "1", "--main_process_port", port]
    return args


def train_command(config_path: str, overrides: list[str]) -> list[str]:
    return ["-m", "qa_dist", "train", "--config", str(Path(config_path).resolve()), *overrides]


def launch_line(
    plan: Plan,
    config_path: str,
    overrides: list[str],
    *,
    machine_rank: int = 0,
    head: str = "127.0.0.1",
    port: int = 29500,
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *accelerate_args(plan, machine_rank=str(machine_rank), head=head, port=str(port)),
        *train_command(config_path, overrides),
    ]


def render_sbatch(
    plan: Plan,
    config: RunConfig,
    config_path: str,
    overrides: list[str],
    *,
    script: str = "train.sbatch",
    partition: str | None = None,
    time_limit: str | None = None,
) -> str:
    """``slurm/<script>`` with the run's values filled in (the file's own comments stay)."""
    text = (SLURM_DIR / script).read_text()
    values = {
        "@NODES@": str(plan.nodes),
        "@PROCESSES_PER_NODE@": str(plan.processes_per_node),
        "@JOB_NAME@": f"qa-dist-{Path(config.run_dir).name}",
        "@RUN_DIR@": str(Path(config.run_dir).resolve()),
        "@QA_DIST_PYTHON@": sys.executable,
        "@ACCELERATE_ARGS@": " ".join(
            shlex.quote(a) if not a.startswith("$") else f'"{a}"'
            for a in accelerate_args(plan, machine_rank="$SLURM_PROCID", head="$HEAD_NODE", port="$PORT")
        ),
        "@TRAIN_ARGS@": " ".join(shlex.quote(a) for a in train_command(config_path, overrides)),
        "@CONFIG@": shlex.quote(str(Path(config_path).resolve())),
        "@OVERRIDES@": " ".join(shlex.quote(o) for o in overrides),
        "@GPU_LINE@": "" if plan.cpu else f"#SBATCH --gpus-per-node={plan.processes_per_node}",
    }
    for key, value in values.items():
        text = text.replace(key, value)
    lines = text.splitlines()
    extra = [f"#SBATCH --partition={partition}"] if partition else []
    extra += [f"#SBATCH --time={time_limit}"] if time_limit else []
    if extra:
        lines[1:1] = extra
    return "\n".join(lines) + "\n"


def check_environment(config: RunConfig, plan: Plan) -> list[str]:
    """Problems to fix before spending cluster time; empty when all is well."""
    from qa_dist.cache import default_cache_dir

    problems = []
    cache = Path(default_cache_dir(config.data.cache_dir))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        problems.append(f"data.cache_dir {cache}: not writable ({e})")
    if plan.nodes > 1 and config.data.cache_shared == "local":
        problems.append("data.cache_shared=local with several nodes: every node builds its own cache")
    for name in ("HF_HOME", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE", "HF_HUB_CACHE"):
        value = os.environ.get(name)
        if value is not None and not Path(value).is_dir():
            problems.append(f"{name}={value}: no such directory (a misspelled path sends the job to the hub)")
    for name in os.environ:
        if name.startswith(("HF_", "HUGGINGFACE")) and name not in KNOWN_HF_VARIABLES:
            problems.append(f"environment variable {name} is not one Hugging Face reads (misspelled?)")
    try:
        from qa_dist.models import load_tokenizer

        load_tokenizer(config.model)
    except Exception as e:  # noqa: BLE001 - reported, not swallowed: the launch stops on it
        problems.append(f"tokenizer of {config.model.name_or_path!r} cannot be loaded: {e}")
    for role, source in (("train", config.data.train), ("eval", config.data.eval)):
        if source and not source.startswith("sample:") and _looks_local(source) and not Path(source).exists():
            problems.append(f"data.{role}: {source} does not exist")
    return problems


KNOWN_HF_VARIABLES = {
    "HF_HOME",
    "HF_DATASETS_CACHE",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_TOKEN",
    "HF_ENDPOINT",
    "HF_HUB_ENABLE_HF_TRANSFER",
    "HF_HUB_DISABLE_TELEMETRY",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "HF_HUB_ETAG_TIMEOUT",
    "HF_HUB_DOWNLOAD_TIMEOUT",
    "HF_XET_HIGH_PERFORMANCE",
    "HF_MODULES_CACHE",
    "HF_ASSETS_CACHE",
    "HF_TOKEN_PATH",
    "HF_DEBUG",
    "HF_HUB_VERBOSITY",
    "HF_DATASETS_TRUST_REMOTE_CODE",
    "HF_UPDATE_DOWNLOAD_COUNTS",
    "HF_HUB_DISABLE_SYMLINKS_WARNING",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    "HUGGINGFACE_HUB_CACHE",
    "HUGGINGFACE_HUB_VERBOSITY",
    "HF_HUB_USER_AGENT_ORIGIN",
}


def _looks_local(source: str) -> bool:
    return source.endswith((".json", ".jsonl", ".gz")) or source.startswith(("/", "./", "../"))


def gpus_available() -> tuple[int, float]:
    """(visible GPUs, memory of the first in GiB); (0, 0) without GPUs."""
    import torch

    if not torch.cuda.is_available():
        return 0, 0.0
    return torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory / GIB


def run(cmd: list[str]) -> int:
    """Run the launch line in the foreground; its exit code is the launch's."""
    return subprocess.call(cmd)


def submit(script_text: str, script_path: Path, dependency: str | None = None) -> str:
    """Write the script and submit it; returns the job id."""
    script_path.parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script_text)
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch not found: --slurm needs a Slurm client on this machine")
    cmd = ["sbatch", "--parsable"]
    if dependency:
        cmd.append(f"--dependency=afterok:{dependency}")
    done = subprocess.run([*cmd, str(script_path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"sbatch refused {script_path}: {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]
