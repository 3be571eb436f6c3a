"""``qa-dist launch``: one run config to an ``accelerate launch`` line or a Slurm batch script.

Pure planning is kept apart from the few side effects:

- ``estimate``: the memory model and the strategy ``auto`` picks;
- ``accelerate``: the Accelerate/DeepSpeed configs a plan selects and the ``accelerate launch`` line;
- ``slurm``: ``#SBATCH`` options, the rendered batch scripts and ``sbatch``;
- ``checks``: what is verified before any work;
- ``process``: running the line and forwarding signals;
- ``plan``: ``LaunchPlan``, which ties them together;
- ``quoting``: what may go into a line or a script, and how it is escaped."""

from __future__ import annotations

from qa_dist.launch.accelerate import CONFIGS, Plan, launch_line, resolved_configs, write_launch_configs
from qa_dist.launch.estimate import AUTO_ORDER, STRATEGIES, ModelShape, choose_strategy, model_shape
from qa_dist.launch.plan import LaunchPlan
from qa_dist.launch.slurm import SLURM_DIR, SlurmOptions, render_sbatch

__all__ = [
    "AUTO_ORDER",
    "CONFIGS",
    "SLURM_DIR",
    "STRATEGIES",
    "LaunchPlan",
    "ModelShape",
    "Plan",
    "SlurmOptions",
    "choose_strategy",
    "launch_line",
    "model_shape",
    "render_sbatch",
    "resolved_configs",
    "write_launch_configs",
]
