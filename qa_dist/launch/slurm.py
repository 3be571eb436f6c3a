"""The Slurm side of a launch: ``#SBATCH`` options, the batch scripts rendered from ``qa_dist/slurm/``
with every value quoted for where it lands, and their submission."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from qa_dist.config import LaunchConfig, RunConfig
from qa_dist.errors import ConfigError
from qa_dist.launch.accelerate import Plan, accelerate_args, package_dir, train_command
from qa_dist.launch.checks import check_launch_values
from qa_dist.launch.quoting import check_printable, sbatch_word

SLURM_DIR = package_dir("slurm")


SLURM_SHELL_VALUES = {
    "machine_rank": "$SLURM_PROCID",
    "head": "$HEAD_NODE",
    "port": "$PORT",
    "threads": "$THREADS_PER_PROCESS",
}
"""The shell expressions ``accelerate_args`` takes in the Slurm script, expanded in each srun task.
These exact strings, and nothing else, are written double-quoted rather than shell-quoted."""


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
    def from_config(cls, launch: LaunchConfig, names: Mapping[str, str]) -> SlurmOptions:
        """The ``launch.*`` keys; ``names`` maps a key to the flag that set it, for messages."""
        keys = {"partition": "partition", "time_limit": "time", "account": "account", "cpus_per_task": "cpus_per_task"}
        return cls(
            partition=launch.partition,
            time_limit=launch.time,
            account=launch.account,
            exclusive=launch.exclusive,
            cpus_per_task=launch.cpus_per_task,
            srun_wait=launch.srun_wait,
            names=tuple((f, names.get(f"launch.{k}", f"launch.{k}")) for f, k in keys.items()),
        )

    def name(self, field_name: str) -> str:
        return dict(self.names).get(field_name, field_name)

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


def render_sbatch(
    plan: Plan,
    config: RunConfig,
    config_path: str,
    overrides: list[str],
    *,
    script: str = "train.sbatch",
    slurm: SlurmOptions | None = None,
) -> str:
    """``slurm/<script>`` with the run's values filled in (the file's own comments stay).

    ``slurm`` holds the ``#SBATCH`` choices (default: the config's ``launch.*`` keys). A value is
    written for where it lands:
    shell-quoted (``shlex.quote``) in the shell part, escaped for Slurm's own parser
    (``sbatch_word``) in ``#SBATCH`` lines, whose partition, time limit and account must match strict
    patterns and whose job name is reduced to a safe label. Control characters anywhere are refused
    (ConfigError naming the key or flag)."""
    slurm = slurm or SlurmOptions.from_config(config.launch, {})
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


def submit(script_path: Path, dependency: str | None = None) -> str:
    """Submit a written script; returns the job id."""
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch not found: --slurm needs a Slurm client on this machine")
    cmd = ["sbatch", "--parsable"]
    if dependency:
        cmd.append(f"--dependency=afterok:{dependency}")
    done = subprocess.run([*cmd, str(script_path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"sbatch refused {script_path}: {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


def how_to_submit(paths: dict[str, Path], run_dir: str, job: str) -> list[str]:
    """The lines that submit the written scripts by hand, in order, and how to watch the job."""
    lines = ["# submit (the training job waits for the prepare job, which builds the feature cache):"]
    train = shlex.quote(str(paths["train.sbatch"]))
    if "prepare.sbatch" in paths:
        lines.append(f"PREPARE=$(sbatch --parsable {shlex.quote(str(paths['prepare.sbatch']))})")
        lines.append(f"sbatch --dependency=afterok:$PREPARE {train}")
    else:
        lines[0] = "# submit:"
        lines.append(f"sbatch {train}")
    logs = shlex.quote(str(Path(run_dir).resolve())) + "/slurm-JOBID.out"
    lines += [
        "# watch: the queue, then the log (a requeued job appends to the same file)",
        f"squeue --me --name {shlex.quote(job)}",
        f"tail -f {logs}",
    ]
    return lines
