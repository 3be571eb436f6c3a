"""``LaunchPlan``: everything ``qa-dist launch`` decided, validated when built."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qa_dist.config import RunConfig, load_config
from qa_dist.errors import ConfigError
from qa_dist.features.prepare import warm_entries
from qa_dist.launch.accelerate import Plan, check_nvme_path, launch_line, write_launch_configs
from qa_dist.launch.checks import check_environment, check_launch_values
from qa_dist.launch.estimate import choose_strategy, describe, gpus_available, model_shape
from qa_dist.launch.process import run
from qa_dist.launch.slurm import SlurmOptions, render_sbatch, sbatch_output_dir, submit
from qa_dist.models import load_tokenizer
from qa_dist.runtime.fsutil import atomic_write
from qa_dist.runtime.rundir import check_free
from qa_dist.runtime.threads import available_cores


def _quiet(_message: str) -> None:
    """The default ``report`` of ``LaunchPlan.build``: notes are kept in ``LaunchPlan.notes`` only."""


@dataclass(frozen=True)
class Layout:
    """How many machines, processes and which strategy, before the environment checks."""

    strategy: str
    nodes: int
    per_node: int
    cpu: bool
    overrides: tuple[str, ...] = ()
    """What the choice adds to the training command (``train.gradient_checkpointing=true``)."""


def _layout(config: RunConfig, *, slurm: bool, note: Callable[[str], None]) -> Layout:
    """Strategy, nodes and processes per node from ``config.launch`` and the visible GPUs; strategy
    auto runs the memory estimate (the model is built on the meta device)."""
    launch = config.launch
    gpus, gpu_gib = gpus_available()
    cpu = launch.cpu or (gpus == 0 and not slurm)
    nodes, strategy = launch.nodes, launch.strategy
    if strategy == "single":
        return Layout("ddp", 1, 1, cpu)
    per_node = launch.gpus_per_node or (2 if cpu else gpus)
    # A login node without GPUs says nothing about the compute nodes': never guess them.
    if not per_node:
        raise ConfigError(
            "--slurm on a machine without visible GPUs: give --gpus-per-node (or launch.gpus_per_node), the GPUs "
            "of each compute node (--cpu plans a CPU job)"
        )
    if strategy != "auto":
        return Layout(strategy, nodes, per_node, cpu)
    if cpu:
        note("strategy auto: no GPU, so DDP over CPU processes with gloo")
        return Layout("ddp", nodes, per_node, cpu)
    memory = launch.gpu_memory_gib or gpu_gib
    if not memory:
        raise ConfigError(
            "--strategy auto on a machine without visible GPUs: give --gpu-memory-gib (or "
            "launch.gpu_memory_gib), the memory of one compute node's GPU, or choose --strategy"
        )
    shape = model_shape(config.model.name_or_path)
    sizes = (nodes * per_node, config.train.per_device_batch_size, config.data.max_length)
    choice = choose_strategy(shape, *sizes, memory, checkpointing=config.train.gradient_checkpointing)
    note(describe(shape, choice, *sizes, memory))
    extra = (
        ("train.gradient_checkpointing=true",)
        if choice.checkpointing and not config.train.gradient_checkpointing
        else ()
    )
    return Layout(choice.strategy, nodes, per_node, cpu, extra)


def _cache_is_cold(config: RunConfig, plan: Plan) -> bool:
    """Slurm only: whether a prepare job must go first. Fingerprinting the data (hashing files,
    asking the hub about a dataset name) is paid here for the prepare job's sake; a local launch
    leaves the one-step check to training, which makes it before the model loads."""
    entries = warm_entries(config.data, load_tokenizer(config.model))
    windows = (entries.get("train") or {}).get("num_features")
    if isinstance(windows, int):  # known from a warm cache: fail here, not after the queue
        config.train.steps_per_epoch(windows, plan.num_processes)
    return any(manifest is None for manifest in entries.values())


def _absolute_paths(config: RunConfig) -> tuple[str, ...]:
    """``run_dir`` and ``data.cache_dir`` as absolute paths, where the config has them relative: the
    printed line and the Slurm scripts work from any directory (a job starts where ``sbatch`` was
    run), and the run writes where the scripts look for its markers."""
    paths = []
    if not Path(config.run_dir).is_absolute():
        paths.append(f"run_dir={Path(config.run_dir).resolve()}")
    if not Path(config.data.cache_dir).expanduser().is_absolute():
        paths.append(f"data.cache_dir={Path(config.data.cache_dir).resolve()}")
    return tuple(paths)


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
    """The overrides the config was loaded with (the command line's, its flags' included), plus
    ``train.gradient_checkpointing=true`` where strategy auto found that only that fits."""
    plan: Plan
    slurm: SlurmOptions | None = None
    """The ``#SBATCH`` choices; None: launched from this machine (``line()``)."""
    cold: bool = False
    """Slurm only: the feature cache is cold, so a prepare job goes first."""
    notes: tuple[str, ...] = ()
    """What the build decided on its own (strategy auto's table), as it told ``report``."""

    @classmethod
    def build(
        cls,
        config: RunConfig,
        config_path: str,
        overrides: Sequence[str] = (),
        *,
        slurm: bool = False,
        check: bool = True,
        names: Mapping[str, str] | None = None,
        report: Callable[[str], None] = _quiet,
    ) -> LaunchPlan:
        """The plan of ``config``, loaded from ``config_path`` with ``overrides`` (which the training
        command repeats), against this machine. ``names`` gives the flag behind a ``launch.*`` key,
        for messages; ``report(message)`` is told each decision as it is made (``qa-dist launch``
        prints them to stderr); ``check=False`` skips the environment checks (``--no-check``)."""
        options = SlurmOptions.from_config(config.launch, names or {})
        # Before anything runs: no control characters in what goes into the line or the script.
        check_launch_values(config_path, list(overrides), config, slurm=options)
        notes: list[str] = []

        def note(message: str) -> None:
            notes.append(message)
            report(message)

        layout = _layout(config, slurm=slurm, note=note)
        if layout.cpu and not slurm and layout.per_node > (cores := available_cores()):
            note(f"warning: {layout.per_node} CPU processes on {cores} cores are oversubscribed; use at most {cores}")
        check_nvme_path(layout.strategy, config.launch.nvme_path)
        config.check_keep_best()  # launch runs qa-dist train, with qa-dist's own evaluation
        plan = Plan(strategy=layout.strategy, nodes=layout.nodes, processes_per_node=layout.per_node, cpu=layout.cpu)
        _ = plan.accelerate_config  # (raises for strategies without a CPU path)
        if check and (problems := check_environment(config, plan, local=not slurm)):
            raise ConfigError("\n".join(f"environment check: {problem}" for problem in problems))
        if slurm:
            sbatch_output_dir(str(Path(config.run_dir).resolve()))  # (raises for a run_dir sbatch cannot carry)
        # Also before a Slurm launch writes its configs and scripts there: a live job rereads them
        # when it is requeued. (The job itself takes the lock when it starts.)
        check_free(config.run_dir)
        return cls(
            config=config,
            config_path=config_path,
            overrides=(*overrides, *_absolute_paths(config), *layout.overrides),
            plan=plan,
            slurm=options if slurm else None,
            cold=slurm and _cache_is_cold(config, plan),
            notes=tuple(notes),
        )

    @classmethod
    def load(cls, config_path: str, overrides: Sequence[str] = (), **options) -> LaunchPlan:
        """``build`` for the config at ``config_path`` with ``overrides`` (``launch.*`` keys for what
        ``qa-dist launch``'s flags set); ``options`` are ``build``'s."""
        return cls.build(load_config(config_path, list(overrides)), config_path, overrides, **options)

    def write_configs(self) -> LaunchPlan:
        """Write the resolved Accelerate/DeepSpeed configs into RUN_DIR/launch/ and return the plan
        that names them. Done for a dry run too: what is printed must work when copied."""
        written = write_launch_configs(self.plan, self.config.run_dir, self.config.launch.nvme_path)
        return dataclasses.replace(self, plan=written)

    def line(self) -> list[str]:
        """The ``accelerate launch`` command line, for a run started from this machine."""
        launch = self.config.launch
        return launch_line(
            self.plan,
            self.config_path,
            list(self.overrides),
            machine_rank=launch.machine_rank,
            head=launch.head,
            port=launch.port,
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

    def write_scripts(self) -> dict[str, Path]:
        """Write the Slurm scripts into RUN_DIR/slurm/ (atomically: a file never holds half a
        script), also for a dry run; their paths by file name, in submission order."""
        slurm_dir = Path(self.config.run_dir).resolve() / "slurm"
        paths = {}
        for name, text in self.scripts().items():
            atomic_write(slurm_dir / name, text)
            paths[name] = slurm_dir / name
        return paths

    def submit(self, report=_quiet) -> str:
        """Write the scripts into RUN_DIR/slurm/ and submit them with ``sbatch``, training after the
        prepare job; ``report`` is told each submission. Returns the training job's id."""
        paths = self.write_scripts()
        dependency = None
        if "prepare.sbatch" in paths:
            dependency = submit(paths["prepare.sbatch"])
            if dependency:
                report(f"submitted prepare job {dependency} (the feature cache is cold)")
        job = submit(paths["train.sbatch"], dependency=dependency)
        report(f"submitted training job {job}" + (f" (after {dependency})" if dependency else ""))
        return job
