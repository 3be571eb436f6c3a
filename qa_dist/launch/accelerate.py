"""The Accelerate side of a launch: the shipped Accelerate/DeepSpeed configs a plan selects, their
resolved copies in ``RUN_DIR/launch/``, and the ``accelerate launch`` line."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import yaml

from qa_dist.errors import ConfigError
from qa_dist.launch.quoting import check_printable, override_key
from qa_dist.runtime.fsutil import atomic_write
from qa_dist.runtime.threads import threads_per_process


def package_dir(name: str) -> Path:
    """A directory shipped inside the qa_dist package (package data), found through
    ``importlib.resources`` so that an installed wheel finds its own copy wherever it runs from. In a
    checkout, ``configs/`` and ``slurm/`` at the repository root are symlinks to these."""
    return Path(str(files("qa_dist") / name))


CONFIGS = package_dir("configs")


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


def accelerate_args(plan: Plan, *, machine_rank: str, head: str, port: str, threads: str | None = None) -> list[str]:
    """``accelerate launch`` options for ``plan``. ``machine_rank``/``head``/``port``/``threads`` may
    be shell expressions (Slurm fills them in on each node). ``threads``: each process's
    ``OMP_NUM_THREADS``, which accelerate otherwise sets to 1 (qa_dist.runtime.threads plans torch's
    and numba's pools from it)."""
    args = ["--config_file", str(plan.accelerate_config), "--num_processes", str(plan.num_processes)]
    if threads is not None:
        args += ["--num_cpu_threads_per_process", threads]
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
    machine_rank: int,
    head: str,
    port: int,
) -> list[str]:
    threads = threads_per_process(plan.processes_per_node)  # this machine's cores, shared by its processes
    check_printable("--config", str(config_path))
    check_printable("launch.head", head)
    for override in overrides:
        check_printable(f"override {override_key(override)!r}", override)
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *accelerate_args(plan, machine_rank=str(machine_rank), head=head, port=str(port), threads=str(threads)),
        *train_command(config_path, overrides),
    ]
