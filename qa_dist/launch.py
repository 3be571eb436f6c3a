"""``qa-dist launch``: one run config to an ``accelerate launch`` line or a Slurm batch script.

Pure planning (strategy choice, memory estimate, command lines, script text) is kept apart from the
few side effects (environment checks, running the line, calling ``sbatch``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import typing
import unicodedata
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import psutil  # a dependency of accelerate
import yaml

from qa_dist.config import LaunchConfig, RunConfig, load_config
from qa_dist.errors import ConfigError
from qa_dist.features.cache import default_cache_dir
from qa_dist.features.prepare import warm_entries
from qa_dist.models import load_tokenizer, resolve_model_path
from qa_dist.runtime.fsutil import atomic_write
from qa_dist.runtime.preemption import EXIT_PREEMPTED, PREEMPTED_MARKER


def _package_dir(name: str) -> Path:
    """A directory shipped inside the qa_dist package (package data), found through
    ``importlib.resources`` so that an installed wheel finds its own copy wherever it runs from. In a
    checkout, ``configs/`` and ``slurm/`` at the repository root are symlinks to these."""
    return Path(str(files("qa_dist") / name))


CONFIGS = _package_dir("configs")
SLURM_DIR = _package_dir("slurm")
STRATEGY_CHOICES: tuple[str, ...] = typing.get_args(typing.get_type_hints(LaunchConfig)["strategy"])
"""What ``launch.strategy`` (and ``qa-dist launch --strategy``) accepts: the config's Literal."""
STRATEGIES = tuple(s for s in STRATEGY_CHOICES if s not in ("auto", "single"))
"""The strategies with configs of their own (auto picks one of them; single is DDP on one process)."""
AUTO_ORDER = ("ddp", "zero2", "fsdp", "zero3", "zero3_offload")
"""Cheapest first, in communication and speed, among what fits:

- DDP: one all-reduce of the gradients per step, nothing gathered.
- ZeRO-2: the same volume (a reduce-scatter of the gradients and an all-gather of the updated
  16-bit weights) with the optimizer state and gradients sharded; the weights stay whole.
- FSDP (FSDP2, full sharding) before ZeRO-3: both shard everything and move 1.5x DDP's volume
  (weights all-gathered in the forward and again in the backward, gradients reduce-scattered);
  FSDP2 does it with one all-gather per wrapped layer in PyTorch's own collectives, without
  DeepSpeed's per-submodule hooks and engine, and is at least as fast. Its estimate is a little higher (it holds whole
  units unsharded, and the root unit, embeddings included, for the whole step), so ZeRO-3, which
  gathers finer pieces, still comes next for the margin where FSDP does not fit.
- ZeRO-3 with offload to host memory last: the optimizer step runs on the CPU.

zero3_nvme is never chosen automatically: its GPU memory is zero3_offload's (it only moves the
host's share to NVMe), so it fits exactly where zero3_offload does; ask for it when host memory
is what runs out."""
GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know of the model."""

    parameters: int
    hidden: int
    layers: int
    heads: int
    layer_parameters: int = 0
    """Parameters of the largest unit FSDP wraps on its own (a transformer layer, or the embeddings
    where the model's ``_no_split_modules`` names them, as BERT's does); 0: 12h^2 + 13h, one layer."""
    root_parameters: int = -1
    """Parameters in no such unit (FSDP's root unit: the QA head, and the embeddings when they are
    not a unit); -1: ``parameters`` minus ``layers`` standard layers."""

    @property
    def layer_size(self) -> int:
        return self.layer_parameters or 12 * self.hidden**2 + 13 * self.hidden

    @property
    def root_size(self) -> int:
        if self.root_parameters >= 0:
            return self.root_parameters
        return max(0, self.parameters - self.layers * self.layer_size)


def model_shape(name_or_path: str) -> ModelShape:
    """Parameter count and sizes from the model's config alone (the model is built on the meta
    device: no weights are read or allocated). The units are the modules of the model's
    ``_no_split_modules`` classes, which FSDP's transformer wrap policy wraps one by one."""
    # torch and transformers only here and in gpus_available: a launch that names its strategy and
    # GPUs plans without them (seconds saved on a login node).
    import torch
    from transformers import AutoConfig, AutoModelForQuestionAnswering

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path: cannot read the config of {name_or_path!r}: {e}") from None
    with torch.device("meta"):
        model = AutoModelForQuestionAnswering.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    unit_classes = set(getattr(model, "_no_split_modules", None) or ())
    units = [sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in unit_classes]
    return ModelShape(
        parameters=total,
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        layer_parameters=max(units, default=0),
        root_parameters=total - sum(units) if units else -1,
    )


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, checkpointing: bool = False) -> float:
    """Activations kept for the backward pass of one micro-batch in 16-bit precision (Korthikanti et
    al. 2022, "Reducing Activation Recomputation in Large Transformer Models"): per layer
    ``s*b*h*(34 + 5*a*s/h)`` bytes without recomputation. With gradient checkpointing (full
    recomputation) each layer keeps only its input, ``2*s*b*h`` bytes, and one layer at a time
    holds its full activations again while it is recomputed in the backward pass."""
    s, b, h, a = seq_len, micro_batch, shape.hidden, shape.heads
    full_layer = s * b * h * (34 + 5 * a * s / h)
    if checkpointing:
        return shape.layers * 2 * s * b * h + full_layer
    return shape.layers * full_layer


def state_bytes(strategy: str, parameters: int, gpus: int) -> tuple[float, float]:
    """(device, host) bytes per GPU of weights, gradients and AdamW state under mixed precision:
    16 bytes per parameter (2 weights + 2 gradients + 4 fp32 master + 8 Adam moments; under
    Accelerate's autocast DDP and FSDP keep fp32 weights and gradients instead: 4 + 4 + 8, the same 16).
    DDP adds 4 more: its reducer copies the fp32 gradients into flat buckets for the all-reduce
    (``gradient_as_bucket_view`` is off by default), so 20 bytes per parameter."""
    p, n = float(parameters), max(gpus, 1)
    if strategy == "ddp":
        return 20 * p, 0.0
    if strategy == "zero2":  # optimizer state and gradients sharded, 16-bit weights replicated
        return 2 * p + 14 * p / n, 0.0
    if strategy in ("zero3", "fsdp"):  # everything sharded (FSDP: fp32 weights + fp32 gradients + Adam)
        return 16 * p / n, 0.0
    if strategy in ("zero3_offload", "zero3_nvme"):
        # shards of 16-bit weights and gradients stay; the rest on the host (or, zero3_nvme, on NVMe)
        return 4 * p / n, (12 * p / n if strategy == "zero3_offload" else 0.0)
    raise ConfigError(f"unknown strategy {strategy!r}: {', '.join(STRATEGIES)}")


def gathered_bytes(strategy: str, shape: ModelShape) -> float:
    """Weights held unsharded at a time by the strategies that shard them (16-bit copies).

    ZeRO-3 (and its offload variants) gathers one submodule at a time and prefetches about the
    next one: two units' weights. FSDP2 all-gathers whole units: the one it computes and the one it
    prefetches, plus that unit's unsharded 16-bit gradient before the reduce-scatter; and its root
    unit (what no wrapped unit holds) stays unsharded for the whole step (FSDP2 does not reshard
    the root after the forward). The largest unit stands for every unit: a little high, never low."""
    if strategy == "fsdp":
        return 2 * shape.root_size + 3 * 2 * shape.layer_size
    if strategy.startswith("zero3"):
        return 2 * 2 * shape.layer_size
    return 0.0


@dataclass(frozen=True)
class Estimate:
    strategy: str
    device_gib: float
    host_gib: float
    fits: bool
    checkpointing: bool = False


def estimate(
    shape: ModelShape,
    strategy: str,
    gpus: int,
    micro_batch: int,
    seq_len: int,
    gpu_gib: float,
    checkpointing: bool = False,
) -> Estimate:
    device, host = state_bytes(strategy, shape.parameters, gpus)
    device += gathered_bytes(strategy, shape)
    device += activation_bytes(shape, micro_batch, seq_len, checkpointing)
    device_gib = device / GIB + 1.5  # CUDA context, allocator slack, communication buffers
    return Estimate(strategy, device_gib, host / GIB, device_gib <= 0.9 * gpu_gib, checkpointing)


@dataclass(frozen=True)
class Choice:
    """What ``--strategy auto`` settled on, and every estimate it made on the way."""

    strategy: str
    checkpointing: bool
    estimates: list[Estimate]


def describe(shape: ModelShape, choice: Choice, gpus: int, micro_batch: int, seq_len: int, gpu_gib: float) -> str:
    """The estimate behind ``--strategy auto``, as printed."""
    lines = [
        f"strategy auto: {shape.parameters / 1e6:,.0f}M parameters, micro-batch {micro_batch} x {seq_len} "
        f"tokens, {gpus} GPUs of {gpu_gib:.0f} GiB (90% usable):"
    ]
    for e in choice.estimates:
        host = f", host {e.host_gib:.1f} GiB" if e.host_gib else ""
        chosen = e.strategy == choice.strategy and e.checkpointing == choice.checkpointing
        mark = "<- chosen" if chosen else ("fits" if e.fits else "does not fit")
        name = e.strategy + (" + checkpointing" if e.checkpointing else "")
        lines.append(f"  {name:30s} {e.device_gib:7.1f} GiB per GPU{host}   {mark}")
    if choice.checkpointing:
        lines.append(
            "  gradient checkpointing on (activations recomputed in the backward pass, about a third more compute): "
            "the run gets train.gradient_checkpointing=true"
        )
    return "\n".join(lines)


def choose_strategy(
    shape: ModelShape,
    gpus: int,
    micro_batch: int,
    seq_len: int,
    gpu_gib: float,
    *,
    checkpointing: bool = False,
) -> Choice:
    """The cheapest strategy that fits, in ``AUTO_ORDER``, first without gradient checkpointing
    (unless the config already turns it on), then with it; a ConfigError proposing a smaller
    micro-batch (with the accumulation that keeps the batch) when nothing fits even then."""
    estimates: list[Estimate] = []
    for with_checkpointing in (True,) if checkpointing else (False, True):
        tried = [estimate(shape, s, gpus, micro_batch, seq_len, gpu_gib, with_checkpointing) for s in AUTO_ORDER]
        estimates += tried
        chosen = next((e for e in tried if e.fits), None)
        if chosen is not None:
            return Choice(chosen.strategy, with_checkpointing, estimates)
    smaller = next(
        (
            b
            for b in range(micro_batch - 1, 0, -1)
            if any(estimate(shape, s, gpus, b, seq_len, gpu_gib, True).fits for s in AUTO_ORDER)
        ),
        None,
    )
    proposal = (
        f"lower train.per_device_batch_size to {smaller} (with gradient checkpointing; raise "
        f"train.gradient_accumulation_steps by {-(-micro_batch // smaller)}x to keep the batch) or add GPUs"
        if smaller
        else "even one window per GPU does not fit: add GPUs, shorten data.max_length, or use strategy zero3_nvme"
    )
    raise ConfigError(
        f"no strategy fits {shape.parameters / 1e6:,.0f}M parameters in {gpu_gib:.0f} GiB per GPU at micro-batch "
        f"{micro_batch} x {seq_len} tokens, even with gradient checkpointing; {proposal}"
    )


@dataclass(frozen=True)
class Plan:
    """Where and how a run is launched."""

    strategy: str
    nodes: int
    processes_per_node: int
    cpu: bool
    launch_dir: Path | None = None
    """Where ``write_launch_configs`` wrote the resolved configs (``RUN_DIR/launch``); None: the templates."""

    @property
    def num_processes(self) -> int:
        """Total over all nodes: what ``accelerate launch --num_processes`` means."""
        return self.nodes * self.processes_per_node

    @property
    def template(self) -> Path:
        """The shipped Accelerate config for this plan."""
        if self.cpu:
            if self.strategy != "ddp":
                raise ConfigError(
                    f"strategy {self.strategy} needs GPUs here: on CPU qa-dist launch runs DDP over gloo "
                    "(DeepSpeed on CPU works with an explicit accelerate config; FSDP has no CPU path)"
                )
            return CONFIGS / "accelerate" / "cpu_ddp.yaml"
        return CONFIGS / "accelerate" / f"{self.strategy}.yaml"

    @property
    def deepspeed_template(self) -> Path | None:
        return CONFIGS / "deepspeed" / f"{self.strategy}.json" if self.strategy.startswith("zero") else None

    @property
    def accelerate_config(self) -> Path:
        template = self.template
        return self.launch_dir / "accelerate.yaml" if self.launch_dir is not None else template

    @property
    def deepspeed_config(self) -> Path | None:
        if self.deepspeed_template is None:
            return None
        return self.launch_dir / "deepspeed.json" if self.launch_dir is not None else self.deepspeed_template


NVME_PLACEHOLDER = "/local_nvme"
"""The ``nvme_path`` of the shipped zero3_nvme.json, replaced by ``launch.nvme_path``."""


def check_nvme_path(strategy: str, nvme_path: str | None) -> None:
    """zero3_nvme needs ``launch.nvme_path``: absolute (every node resolves it on its own disk)."""
    if strategy != "zero3_nvme":
        return
    if not nvme_path:
        raise ConfigError("strategy zero3_nvme needs launch.nvme_path (an absolute path on node-local NVMe)")
    if not Path(check_printable("launch.nvme_path", nvme_path)).is_absolute():
        raise ConfigError(f"launch.nvme_path: {nvme_path!r} must be an absolute path")


def resolved_configs(plan: Plan, nvme_path: str | None = None) -> tuple[str, str | None]:
    """The text of the Accelerate config (YAML) and DeepSpeed config (JSON) of ``plan`` as
    ``write_launch_configs`` writes them: the number of processes and machines filled in, the
    DeepSpeed file named by its absolute path in ``plan.launch_dir`` (Accelerate resolves a relative
    one against the directory it is started from), and for zero3_nvme ``nvme_path`` filled in."""
    if plan.launch_dir is None:
        raise ValueError("resolved_configs needs a plan with a launch_dir")
    accelerate = yaml.safe_load(plan.template.read_text())
    accelerate["num_processes"] = plan.num_processes
    accelerate["num_machines"] = plan.nodes
    deepspeed = None
    if plan.deepspeed_template is not None:
        ds = json.loads(plan.deepspeed_template.read_text())
        if plan.strategy == "zero3_nvme":
            check_nvme_path(plan.strategy, nvme_path)
            for key in ("offload_optimizer", "offload_param"):
                ds["zero_optimization"][key]["nvme_path"] = nvme_path
        accelerate["deepspeed_config"]["deepspeed_config_file"] = str(plan.deepspeed_config)
        deepspeed = json.dumps(ds, indent=2) + "\n"
    header = (
        f"# Written by qa-dist launch from {plan.template.name} (qa_dist/configs/accelerate/) for this run:\n"
        f"# {plan.nodes} machine(s), {plan.num_processes} process(es) in all"
        + (", the DeepSpeed JSON beside it by its absolute path" if deepspeed else "")
        + ". Usable from any directory:\n"
        "#   accelerate launch --config_file THIS_FILE -m qa_dist train --config RUN.yaml\n"
    )
    return header + yaml.safe_dump(accelerate, sort_keys=False), deepspeed


def write_launch_configs(plan: Plan, run_dir: str | Path, nvme_path: str | None = None) -> Plan:
    """Write the resolved configs into ``RUN_DIR/launch/`` (atomically) and return the plan that
    launches from them. Done for ``--dry-run`` too: the printed line must name files that exist."""
    resolved = dataclasses.replace(plan, launch_dir=Path(run_dir).resolve() / "launch")
    accelerate, deepspeed = resolved_configs(resolved, nvme_path)
    if deepspeed is not None:
        atomic_write(resolved.deepspeed_config, deepspeed)
    atomic_write(resolved.accelerate_config, accelerate)
    return resolved


SLURM_SHELL_VALUES = {"machine_rank": "$SLURM_PROCID", "head": "$HEAD_NODE", "port": "$PORT"}
"""The shell expressions ``accelerate_args`` takes in the Slurm script, expanded in each srun task.
These exact strings, and nothing else, are written double-quoted rather than shell-quoted."""


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


def check_printable(name: str, value: str) -> str:
    """``value`` unchanged, or a ConfigError naming ``name`` when it holds a character that has no
    place in a script or a command line: a control or format character (newline, carriage return,
    escape, DEL, zero-width and direction marks...) or a Unicode line or paragraph separator. A
    newline would end a ``#SBATCH`` line (Slurm reads that block itself, no shell quoting applies)
    and the others hide what a printed command really runs."""
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Cf") or ch in "\u2028\u2029":
            raise ConfigError(
                f"{name}: control or line-break character {ch!r} (U+{ord(ch):04X}) in {value!r}: "
                "not allowed in a launch script or command line"
            )
    return value


def _override_key(override: str) -> str:
    return override.split("=", 1)[0] if "=" in override else override


PARTITION = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
ACCOUNT = re.compile(r"[A-Za-z0-9_.-]+")
TIME_LIMIT = re.compile(r"(\d+-)?\d+(:\d+){0,2}|(?i:infinite|unlimited)")


@dataclass(frozen=True)
class SlurmOptions:
    """The ``#SBATCH`` choices of a run: flags where given, else the config's ``launch.*`` keys."""

    partition: str | None = None
    time_limit: str | None = None
    account: str | None = None
    exclusive: bool = False
    cpus_per_task: int = 0
    """0: 4 CPUs per training process on GPU jobs, 1 per process on CPU jobs (see ``cpus_for``)."""
    srun_wait: int = 120
    names: tuple[tuple[str, str], ...] = ()
    """(field, where the value came from: a flag or a config key), for error messages."""

    @classmethod
    def resolve(
        cls,
        config: RunConfig,
        *,
        partition: str | None = None,
        time_limit: str | None = None,
        account: str | None = None,
        exclusive: bool | None = None,
        cpus_per_task: int | None = None,
    ) -> SlurmOptions:
        """Flags override the config's keys; each value remembers where it came from."""
        launch = config.launch
        picked = {
            "partition": (partition, "--partition", launch.partition, "launch.partition"),
            "time_limit": (time_limit, "--time", launch.time, "launch.time"),
            "account": (account, "--account", launch.account, "launch.account"),
            "cpus_per_task": (cpus_per_task, "--cpus-per-task", launch.cpus_per_task, "launch.cpus_per_task"),
        }
        values, names = {}, []
        for field_name, (flag_value, flag, key_value, key) in picked.items():
            use_flag = flag_value is not None
            values[field_name] = flag_value if use_flag else key_value
            names.append((field_name, flag if use_flag else key))
        return cls(
            **values,
            exclusive=launch.exclusive if exclusive is None else exclusive,
            srun_wait=launch.srun_wait,
            names=tuple(names),
        )

    def name(self, field_name: str) -> str:
        flags = {"partition": "--partition", "time_limit": "--time", "account": "--account"}
        return dict(self.names).get(field_name, flags.get(field_name, "--cpus-per-task"))

    def check(self) -> None:
        """Strict patterns for what lands in ``#SBATCH`` lines (sbatch parses them itself)."""
        if self.partition is not None and not PARTITION.fullmatch(
            check_printable(self.name("partition"), self.partition)
        ):
            raise ConfigError(
                f"{self.name('partition')}: {self.partition!r} is not a partition name (letters, digits, '_.-', commas)"
            )
        if self.time_limit is not None and not TIME_LIMIT.fullmatch(
            check_printable(self.name("time_limit"), self.time_limit)
        ):
            raise ConfigError(
                f"{self.name('time_limit')}: {self.time_limit!r} is not a Slurm time limit "
                "(minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM:SS, ...)"
            )
        if self.account is not None and not ACCOUNT.fullmatch(check_printable(self.name("account"), self.account)):
            raise ConfigError(
                f"{self.name('account')}: {self.account!r} is not an account name (letters, digits, '_.-')"
            )
        if self.cpus_per_task < 0:
            raise ConfigError(f"{self.name('cpus_per_task')}: {self.cpus_per_task} must be >= 0")

    def cpus_for(self, plan: Plan) -> int:
        """CPUs of the one task per node. Default: 4 per training process on GPU jobs (each has a
        few threads besides its GPU: the data loader, host-side ops, NCCL's; features come
        memory-mapped from the cache, so no tokenizer runs there), conservative because the login
        node cannot see the compute nodes' cores and asking for more than a node has makes the job
        unschedulable; 1 per process on CPU jobs, as the tests' one-node cluster has 2 cores. Raise
        launch.cpus_per_task for zero3_offload/zero3_nvme: DeepSpeed's CPU Adam uses every thread."""
        if self.cpus_per_task:
            return self.cpus_per_task
        return plan.processes_per_node * (1 if plan.cpu else 4)


def check_launch_values(
    config_path: str,
    overrides: list[str],
    config: RunConfig,
    *,
    partition: str | None = None,
    time_limit: str | None = None,
    head: str | None = None,
    slurm: SlurmOptions | None = None,
) -> None:
    """Every value ``qa-dist launch`` writes into a script or a command line, checked before anything
    runs; a ConfigError names the key or flag."""
    check_printable("--config", str(config_path))
    for override in overrides:
        check_printable(f"override {_override_key(override)!r}", override)
    check_printable("run_dir", str(config.run_dir))
    check_printable("run_dir (resolved)", str(Path(config.run_dir).resolve()))
    check_printable("the Python interpreter path (sys.executable)", sys.executable)
    if head is not None:
        check_printable("--head", head)
    if config.launch.nvme_path is not None:
        check_printable("launch.nvme_path", config.launch.nvme_path)
    if slurm is None:
        slurm = SlurmOptions.resolve(config, partition=partition, time_limit=time_limit)
    slurm.check()


def sbatch_word(value: str) -> str:
    """``value`` as (part of) one argument of a ``#SBATCH`` line. Slurm splits those lines itself
    (sbatch's ``_get_argument``, not a shell): whitespace ends an argument unless it is inside quotes
    (a backslash does not protect it), an unquoted ``#`` starts a comment, and a backslash escapes the
    next character anywhere, even inside quotes. So a value holding any of these is written inside
    double quotes with ``"`` and ``\\`` escaped; ``$``, ``;``, backticks, parentheses are plain
    characters there. Control characters cannot be carried at all (a newline ends the line) and are
    refused by ``check_printable`` before this."""
    if not any(ch in " \t\v\f\r\"'#\\" for ch in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sbatch_output_dir(run_dir: str) -> str:
    """The run directory as the start of a ``#SBATCH --output`` pattern: ``%`` doubled (Slurm reads
    ``%j``, ``%x``... in that path), then quoted by ``sbatch_word``. Refused: a backslash (it turns
    Slurm's ``%j`` replacement off for the whole path) and ``hetjob``/``packjob`` (sbatch treats a
    ``#SBATCH`` line holding either word as the start of another heterogeneous job component)."""
    if "\\" in run_dir:
        raise ConfigError(f"run_dir: {run_dir!r} holds a backslash, which Slurm's --output cannot carry")
    for word in ("hetjob", "packjob"):
        if word in run_dir.lower():
            raise ConfigError(f"run_dir: {run_dir!r} holds {word!r}, which sbatch reads as a job separator")
    return sbatch_word(run_dir.replace("%", "%%"))


def job_name(run_dir: str) -> str:
    """``qa-dist-<run directory name>``, with anything but letters, digits and ``._+-`` replaced by
    ``_`` (the name is only a label; it goes into a ``#SBATCH`` line)."""
    return "qa-dist-" + re.sub(r"[^A-Za-z0-9._+-]", "_", Path(run_dir).name)


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
    check_printable("--config", str(config_path))
    check_printable("--head", head)
    for override in overrides:
        check_printable(f"override {_override_key(override)!r}", override)
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
    slurm: SlurmOptions | None = None,
) -> str:
    """``slurm/<script>`` with the run's values filled in (the file's own comments stay).

    ``slurm`` holds the ``#SBATCH`` choices (default: the config's ``launch.*`` keys, with
    ``partition``/``time_limit`` overriding theirs). A value is written for where it lands:
    shell-quoted (``shlex.quote``) in the shell part, escaped for Slurm's own parser
    (``sbatch_word``) in ``#SBATCH`` lines, whose partition, time limit and account must match strict
    patterns and whose job name is reduced to a safe label. Control characters anywhere are refused
    (ConfigError naming the key or flag)."""
    if slurm is None:
        slurm = SlurmOptions.resolve(config, partition=partition, time_limit=time_limit)
    check_launch_values(config_path, overrides, config, slurm=slurm)
    run_dir = str(Path(config.run_dir).resolve())
    name = job_name(config.run_dir)
    cpus = slurm.cpus_for(plan)
    shell_args = []
    for a in accelerate_args(plan, **SLURM_SHELL_VALUES):
        # Only the fixed expressions of SLURM_SHELL_VALUES stay expandable; any other value is quoted.
        shell_args.append(f'"{a}"' if a in SLURM_SHELL_VALUES.values() else shlex.quote(a))
    in_shell = {
        "@NODES@": str(plan.nodes),
        "@PROCESSES_PER_NODE@": str(plan.processes_per_node),
        "@CPUS_PER_TASK@": str(cpus),
        "@SRUN_WAIT@": f"--wait={slurm.srun_wait}" if slurm.srun_wait else "",
        "@JOB_NAME@": shlex.quote(name),
        "@RUN_DIR@": shlex.quote(run_dir),
        "@QA_DIST_PYTHON@": shlex.quote(sys.executable),
        "@ACCELERATE_ARGS@": " ".join(shell_args),
        "@TRAIN_ARGS@": " ".join(shlex.quote(a) for a in train_command(config_path, overrides)),
        "@CONFIG@": shlex.quote(str(Path(config_path).resolve())),
        "@OVERRIDES@": " ".join(shlex.quote(o) for o in overrides),
        "@GPU_LINE@": "" if plan.cpu else f"#SBATCH --gpus-per-node={plan.processes_per_node}",
    }
    in_sbatch = {
        "@NODES@": str(plan.nodes),
        "@PROCESSES_PER_NODE@": str(plan.processes_per_node),
        "@CPUS_PER_TASK@": str(cpus),
        "@JOB_NAME@": name,
        "@RUN_DIR@": sbatch_output_dir(run_dir),
    }
    lines = []
    for line in (SLURM_DIR / script).read_text().splitlines():
        values = in_sbatch if line.startswith("#SBATCH") else in_shell
        # One pass: a value that happens to hold "@...@" is never substituted again.
        lines.append(PLACEHOLDER.sub(lambda m, values=values: _fill(m.group(), values, script), line))
    extra = [f"#SBATCH --partition={slurm.partition}"] if slurm.partition else []
    # The prepare job is short and CPU-only: no time limit, account or whole node of the GPU job's.
    if script == "train.sbatch":
        extra += [f"#SBATCH --time={slurm.time_limit}"] if slurm.time_limit else []
        extra += ["#SBATCH --exclusive"] if slurm.exclusive else []
    extra += [f"#SBATCH --account={slurm.account}"] if slurm.account else []
    if extra:  # before the script's own #SBATCH lines, after its opening comment
        first = next(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
        lines[first:first] = extra
    return "\n".join(lines) + "\n"


PLACEHOLDER = re.compile(r"@[A-Z_]+@")


def _fill(placeholder: str, values: dict[str, str], script: str) -> str:
    if placeholder not in values:
        raise ConfigError(f"slurm/{script}: {placeholder} cannot be filled in on this line")
    return values[placeholder]


def check_environment(config: RunConfig, plan: Plan, *, local: bool = True) -> list[str]:
    """Problems to fix before spending cluster time; empty when all is well. ``local``: the run
    starts on this machine (not through Slurm), so its NVMe directory must be here."""
    problems = []
    cache = Path(default_cache_dir(config.data.cache_dir))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        problems.append(f"data.cache_dir {cache}: not writable ({e})")
    nvme = config.launch.nvme_path
    if local and plan.strategy == "zero3_nvme" and nvme and not (Path(nvme).is_dir() and os.access(nvme, os.W_OK)):
        problems.append(f"launch.nvme_path {nvme}: not a writable directory on this machine")
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


def run(cmd: list[str], run_dir: str | Path | None = None) -> int:
    """Run the launch line in the foreground, pass signals on, and return its exit code: 75 (the
    training checkpointed and stopped on a signal) when the run wrote a new ``preempted.json``.

    Why a child and not ``os.execv``: ``accelerate launch`` (torchrun's elastic agent, in process)
    starts every training process with ``start_new_session=True``, so no process group holds them,
    and it handles only SIGTERM, SIGINT, SIGHUP and SIGQUIT (``TORCHELASTIC_SIGNALS_TO_HANDLE``):
    SIGUSR1 kills the agent, which leaves its training processes running. On SIGTERM the agent
    forwards it to the workers but kills them 30 s later (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``),
    whether or not their checkpoint is written, and either way it exits 1, never 75. So the launcher
    stays in between: it starts the agent in a session of its own (a Ctrl-C or a SIGTERM to the
    terminal's process group reaches this process only, once), and on SIGTERM or SIGUSR1 it signals
    the training processes themselves (the agent's children), not the agent; they agree, save a
    checkpoint, write ``preempted.json`` and exit 75; the agent then sees them end and exits;
    the marker turns that into exit code 75 here. A second SIGTERM, and SIGINT, SIGHUP or SIGQUIT,
    go to the agent, which stops its workers its own way (no checkpoint). Before the training
    processes exist a SIGTERM or SIGUSR1 goes to the agent as SIGTERM: nothing to checkpoint yet."""
    marker = Path(run_dir) / PREEMPTED_MARKER if run_dir is not None else None
    before = _stamp(marker)
    proc: subprocess.Popen | None = None
    pending: list[int] = []
    asked: set[int] = set()

    def forward(signum: int, _frame=None) -> None:
        if proc is None:
            pending.append(signum)
            return
        if signum in (signal.SIGTERM, signal.SIGUSR1) and not (signum == signal.SIGTERM and signum in asked):
            asked.add(signum)
            workers = _children(proc.pid)
            for pid in workers:
                _kill(pid, signum)
            if workers:
                return
            signum = signal.SIGTERM  # no training process yet: nothing to checkpoint, stop
        _kill(proc.pid, signum)

    handled = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
    previous = {sig: signal.signal(sig, forward) for sig in handled}
    try:
        proc = subprocess.Popen(cmd, start_new_session=True)
        for signum in pending:
            forward(signum)
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if marker is not None and _stamp(marker) not in (None, before):
        print(
            f"qa-dist: training stopped on a signal after a checkpoint ({marker.read_text().strip()}); "
            "continue with resume=auto",
            file=sys.stderr,
        )
        return EXIT_PREEMPTED
    return code if code >= 0 else 128 - code


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    """What tells a rewritten file from the one seen before (None: no file)."""
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size) if st else None


def _children(pid: int) -> list[int]:
    """The direct children of ``pid``: the training processes torchrun's agent started."""
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
        os.kill(pid, signum)


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


def _quiet(_message: str) -> None:
    """The default ``report`` of ``LaunchPlan.build``: notes are kept in ``LaunchPlan.notes`` only."""


@dataclass(frozen=True)
class LaunchPlan:
    """Everything ``qa-dist launch`` decided, validated when built: ``LaunchPlan.build`` raises
    ConfigError for every bad combination (values that cannot go into a script or command line,
    nodes and strategy, zero3_nvme's path, a strategy without a CPU path, the environment checks).
    What is left are its outputs: ``write_configs()`` (RUN_DIR/launch/, also for a dry run),
    ``line()``/``run()`` for a launch from this machine, ``scripts()``/``submit()`` for Slurm."""

    config: RunConfig
    config_path: str
    overrides: tuple[str, ...]
    """The command line's overrides, plus ``train.gradient_checkpointing=true`` where strategy auto
    found that only that fits."""
    plan: Plan
    slurm: SlurmOptions | None = None
    """The ``#SBATCH`` choices; None: launched from this machine (``line()``)."""
    machine_rank: int = 0
    head: str = "127.0.0.1"
    port: int = 29500
    cold: bool = False
    """Slurm only: the feature cache is cold, so a prepare job goes first."""
    notes: tuple[str, ...] = ()
    """What the build decided on its own (strategy auto's table), as it told ``report``."""

    @classmethod
    def build(
        cls,
        config_path: str | None,
        overrides: list[str] | tuple[str, ...] = (),
        *,
        strategy: str | None = None,
        nodes: int | None = None,
        gpus_per_node: int | None = None,
        cpu: bool = False,
        gpu_memory_gib: float | None = None,
        slurm: bool = False,
        partition: str | None = None,
        time_limit: str | None = None,
        account: str | None = None,
        exclusive: bool | None = None,
        cpus_per_task: int | None = None,
        machine_rank: int = 0,
        head: str = "127.0.0.1",
        port: int = 29500,
        check: bool = True,
        report=_quiet,
    ) -> LaunchPlan:
        """Resolve flags (None: the config's ``launch.*`` key) against the config and this machine.
        ``report(message)`` is told each decision as it is made (``qa-dist launch`` prints them to
        stderr); ``check=False`` skips the environment checks (``--no-check``)."""
        if not config_path:
            raise ConfigError("qa-dist launch needs --config RUN.yaml")
        if gpu_memory_gib is not None and gpu_memory_gib <= 0:
            raise ConfigError(f"--gpu-memory-gib: must be > 0, got {gpu_memory_gib}")
        overrides = list(overrides)
        config = load_config(config_path, overrides)
        options = SlurmOptions.resolve(
            config,
            partition=partition,
            time_limit=time_limit,
            account=account,
            exclusive=exclusive,
            cpus_per_task=cpus_per_task,
        )
        # Before anything runs: no control characters in what goes into the line or the script.
        check_launch_values(config_path, overrides, config, head=head, slurm=options)
        notes: list[str] = []

        def note(message: str) -> None:
            notes.append(message)
            report(message)

        gpus, gpu_gib = gpus_available()
        cpu = cpu or (gpus == 0 and not slurm)
        nodes = nodes or config.launch.nodes
        strategy = strategy or config.launch.strategy
        if strategy == "single":
            strategy, per_node, nodes = "ddp", 1, 1
        else:
            per_node = gpus_per_node or config.launch.gpus_per_node or (2 if cpu else gpus)
        # A login node without GPUs says nothing about the compute nodes': never guess them.
        if not per_node:
            raise ConfigError(
                "--slurm on a machine without visible GPUs: give --gpus-per-node (or launch.gpus_per_node), the GPUs "
                "of each compute node (--cpu plans a CPU job)"
            )
        if strategy == "auto":
            if cpu:
                strategy = "ddp"
                note("strategy auto: no GPU, so DDP over CPU processes with gloo")
            else:
                memory = gpu_memory_gib or config.launch.gpu_memory_gib or gpu_gib
                if not memory:
                    raise ConfigError(
                        "--strategy auto on a machine without visible GPUs: give --gpu-memory-gib (or "
                        "launch.gpu_memory_gib), the memory of one compute node's GPU, or choose --strategy"
                    )
                shape = model_shape(config.model.name_or_path)
                sizes = (nodes * per_node, config.train.per_device_batch_size, config.data.max_length)
                choice = choose_strategy(shape, *sizes, memory, checkpointing=config.train.gradient_checkpointing)
                note(describe(shape, choice, *sizes, memory))
                strategy = choice.strategy
                if choice.checkpointing and not config.train.gradient_checkpointing:
                    overrides.append("train.gradient_checkpointing=true")
        check_nvme_path(strategy, config.launch.nvme_path)
        config.check_keep_best()  # launch runs qa-dist train, with qa-dist's own evaluation
        plan = Plan(strategy=strategy, nodes=nodes, processes_per_node=per_node, cpu=cpu)
        _ = plan.accelerate_config  # (raises for strategies without a CPU path)
        if check:
            problems = check_environment(config, plan, local=not slurm)
            if problems:
                raise ConfigError("environment check failed:\n  " + "\n  ".join(problems))
        cold = False
        if slurm:
            sbatch_output_dir(str(Path(config.run_dir).resolve()))  # (raises for a run_dir sbatch cannot carry)
            # Fingerprinting the data (hashing files, asking the hub about a dataset name) is paid
            # here for the prepare job's sake; a local launch leaves the one-step check to training,
            # which makes it before the model loads.
            entries = warm_entries(config.data, load_tokenizer(config.model))
            windows = (entries.get("train") or {}).get("num_features")
            if isinstance(windows, int):  # known from a warm cache: fail here, not after the queue
                config.train.steps_per_epoch(windows, plan.num_processes)
            cold = any(manifest is None for manifest in entries.values())
        return cls(
            config=config,
            config_path=config_path,
            overrides=tuple(overrides),
            plan=plan,
            slurm=options if slurm else None,
            machine_rank=machine_rank,
            head=head,
            port=port,
            cold=cold,
            notes=tuple(notes),
        )

    def write_configs(self) -> LaunchPlan:
        """Write the resolved Accelerate/DeepSpeed configs into RUN_DIR/launch/ and return the plan
        that names them. Done for a dry run too: what is printed must work when copied."""
        written = write_launch_configs(self.plan, self.config.run_dir, self.config.launch.nvme_path)
        return dataclasses.replace(self, plan=written)

    def line(self) -> list[str]:
        """The ``accelerate launch`` command line, for a run started from this machine."""
        return launch_line(
            self.plan,
            self.config_path,
            list(self.overrides),
            machine_rank=self.machine_rank,
            head=self.head,
            port=self.port,
        )

    def run(self) -> int:
        """Run ``line()`` in the foreground (see ``run``); its exit code."""
        return run(self.line(), self.config.run_dir)

    def scripts(self) -> dict[str, str]:
        """The Slurm batch scripts by file name, in submission order: ``prepare.sbatch`` when the
        feature cache is cold, then ``train.sbatch``."""
        if self.slurm is None:
            raise ConfigError("scripts() is for a Slurm launch (build with slurm=True)")
        overrides = list(self.overrides)
        train = render_sbatch(self.plan, self.config, self.config_path, overrides, slurm=self.slurm)
        scripts = {}
        if self.cold:
            scripts["prepare.sbatch"] = render_sbatch(
                self.plan, self.config, self.config_path, overrides, script="prepare.sbatch", slurm=self.slurm
            )
        scripts["train.sbatch"] = train
        return scripts

    def submit(self, report=_quiet) -> str:
        """Write the scripts into RUN_DIR/slurm/ and submit them with ``sbatch``, training after the
        prepare job; ``report`` is told each submission. Returns the training job's id."""
        scripts = self.scripts()
        slurm_dir = Path(self.config.run_dir).resolve() / "slurm"
        dependency = None
        if "prepare.sbatch" in scripts:
            dependency = submit(scripts["prepare.sbatch"], slurm_dir / "prepare.sbatch")
            if dependency:
                report(f"submitted prepare job {dependency} (the feature cache is cold)")
        job = submit(scripts["train.sbatch"], slurm_dir / "train.sbatch", dependency=dependency)
        report(f"submitted training job {job}" + (f" (after {dependency})" if dependency else ""))
        return job
