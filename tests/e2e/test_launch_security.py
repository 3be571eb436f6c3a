"""qa-dist launch and hostile values (issue 14 item 1): run directories, overrides, config and
interpreter paths full of shell syntax reach the rendered Slurm scripts quoted. The shell part of each
script is executed here, under bash, with stub ``srun``/``scontrol`` and a stub interpreter that records
its arguments: nothing the values spell out runs, and each value arrives as one intact argument. The
``#SBATCH`` block is read the way sbatch reads it; control characters stop a launch with exit code 2."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from qa_dist import cli
from qa_dist.config import load_config
from qa_dist.errors import ConfigError
from qa_dist.launch import accelerate as LA
from qa_dist.launch import slurm as LS

CONFIG = REPO / "configs" / "runs" / "cpu_sample_en.yaml"

HOSTILE_NAMES = [
    "x$(touch pwned)",
    "y; touch pwned",
    "z`touch pwned`",
    "q'\"; touch pwned; echo \"'",
    "with space # and hash",
    "100%j pct & touch pwned |",
    "-n dash $HOME ${PATH} * ?",
]


def sbatch_options(script: str) -> list[str]:
    """The options sbatch takes from a script's ``#SBATCH`` lines: a port of Slurm 22.05's
    ``_opt_batch_script`` and ``_get_argument`` (src/sbatch/opt.c). Lines are read up to the first
    command; whitespace separates arguments, quotes group, a backslash escapes the next character
    (inside quotes too), an unquoted ``#`` ends the line."""
    options = []
    for line in script.split("\n"):
        if not line.startswith("#SBATCH"):
            stripped = line.lstrip(" \t\v\f\r")
            if stripped and not stripped.startswith("#"):
                break  # the first command: sbatch reads no further
            continue
        rest, i = line[len("#SBATCH") :], 0
        while True:
            while i < len(rest) and rest[i] in " \t\v\f\r":
                i += 1
            if i >= len(rest):
                break
            arg, quote, escape = [], "", False
            while i < len(rest) and (quote or rest[i] not in " \t\v\f\r"):
                ch = rest[i]
                i += 1
                if escape:
                    escape = False
                elif ch == "\\":
                    escape = True
                    continue
                elif quote:
                    if ch == quote:
                        quote = ""
                        continue
                elif ch in "\"'":
                    quote = ch
                    continue
                elif ch == "#":
                    i = len(rest)
                    break
                arg.append(ch)
            assert not quote, f"sbatch: unmatched {quote} in {line!r}"
            if arg:
                options.append("".join(arg))
    return options


def _stub(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def stubs(tmp_path, monkeypatch):
    """A stub interpreter in a directory whose name is shell syntax too (it is written into the
    script as QA_DIST_PYTHON), recording its arguments NUL-separated; ``srun`` that runs its command
    once (as task SLURM_PROCID); ``scontrol`` that names this host and records a requeue."""
    record = tmp_path / "argv"
    python = _stub(
        tmp_path / "py $(touch pwned) ;`touch pwned`" / "python",
        f"printf '%s\\0' \"$@\" > {shlex.quote(str(record))}\n",
    )
    bin_dir = tmp_path / "bin"
    _stub(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    _stub(
        bin_dir / "scontrol",
        f'if [ "$1" = show ]; then echo node-a; echo node-b; else echo "$@" >> {shlex.quote(str(tmp_path / "requeue"))}; fi\n',
    )
    monkeypatch.setattr(sys, "executable", str(python))
    return record, bin_dir


def _execute(script: str, tmp_path: Path, bin_dir: Path) -> subprocess.CompletedProcess:
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_PROCID": "1",
    }
    return subprocess.run(["bash", "-s"], input=script, text=True, capture_output=True, cwd=cwd, env=env, timeout=60)


def _nothing_ran(tmp_path: Path) -> None:
    assert not [p for p in tmp_path.rglob("pwned")], "a value was run as a command"


def _argv(record: Path) -> list[str]:
    return record.read_bytes().decode().split("\0")[:-1]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_run_dir_and_overrides_never_run_in_the_training_script(tmp_path, stubs, name):
    record, bin_dir = stubs
    run_dir = tmp_path / "runs" / name
    config_path = tmp_path / f"cfg {name}" / "run.yaml"  # the config path is written into the script too
    config_path.parent.mkdir(parents=True)
    config_path.write_text(CONFIG.read_text())
    overrides = [f"run_dir={run_dir}", f"data.train=/data/{name}.json", f"data.cache_dir={tmp_path}/c {name}"]
    config = load_config(str(config_path), overrides)
    run_dir = Path(config.run_dir)  # as the config reads it (YAML: " #" starts a comment there)
    # Launched from the resolved configs written into the hostile run directory, as qa-dist launch does.
    plan = LA.write_launch_configs(LA.Plan("ddp", nodes=2, processes_per_node=1, cpu=True), run_dir)
    config = dataclasses.replace(
        config, launch=dataclasses.replace(config.launch, partition="cpu,debug", time="1-02:00:00")
    )
    script = LS.render_sbatch(plan, config, str(config_path), overrides)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)

    done = _execute(script, tmp_path, bin_dir)
    _nothing_ran(tmp_path)
    assert done.returncode == 0, done.stderr
    assert run_dir.is_dir()  # mkdir -p "$RUN_DIR" made exactly this directory
    port = str(20000 + 4242 % 40000)
    expected = [
        "-m",
        "accelerate.commands.launch",
        *LA.accelerate_args(plan, machine_rank="1", head="node-a", port=port, threads="1"),  # 1 CPU, 1 process
        "-m",
        "qa_dist",
        "train",
        "--config",
        str(config_path.resolve()),
        *overrides,
        "resume=auto",
    ]
    assert _argv(record) == expected  # every value one argument, byte for byte

    # The #SBATCH block, read as sbatch reads it: every option there, nothing lost or split.
    options = sbatch_options(script)
    assert options == [
        "--partition=cpu,debug",
        "--time=1-02:00:00",
        f"--job-name={LS.job_name(str(run_dir))}",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
        "--signal=B:USR1@120",
        "--requeue",
        "--open-mode=append",
        f"--output={str(run_dir.resolve()).replace('%', '%%')}/slurm-%j.out",
    ]
    first_command = next(i for i, line in enumerate(script.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(script.splitlines()) if line.startswith("#SBATCH"))
    assert re.fullmatch(r"qa-dist-[A-Za-z0-9._+-]*", LS.job_name(str(run_dir)))


@pytest.mark.parametrize("name", HOSTILE_NAMES[:4])
def test_hostile_values_never_run_in_the_prepare_script(tmp_path, stubs, name):
    record, bin_dir = stubs
    overrides = [f"run_dir={tmp_path / 'runs' / name}", f"data.train=/data/{name}.json"]
    config = load_config(str(CONFIG), overrides)
    run_dir = Path(config.run_dir)
    plan = LA.Plan("ddp", nodes=1, processes_per_node=2, cpu=True)
    script = LS.render_sbatch(plan, config, str(CONFIG), overrides, script="prepare.sbatch")
    done = _execute(script, tmp_path, bin_dir)
    _nothing_ran(tmp_path)
    assert done.returncode == 0, done.stderr
    assert _argv(record) == ["-m", "qa_dist", "prepare", "--config", str(CONFIG.resolve()), *overrides]
    output = [o for o in sbatch_options(script) if o.startswith("--output=")]
    assert output == [f"--output={str(run_dir.resolve()).replace('%', '%%')}/slurm-prepare-%j.out"]


def test_only_the_fixed_slurm_expressions_stay_expandable():
    plan = LA.Plan("zero3", nodes=2, processes_per_node=8, cpu=False)
    config = load_config(str(CONFIG), ["run_dir=/tmp/r"])
    script = LS.render_sbatch(plan, config, str(CONFIG), ["train.lr=3e-5"])
    expandable = re.findall(r'"\$[A-Z_]+"', script.split("launch_on_node() {")[1].split("}")[0])
    assert sorted(expandable) == [
        '"$HEAD_NODE"',
        '"$PORT"',
        '"$QA_DIST_PYTHON"',
        '"$SLURM_PROCID"',
        '"$THREADS_PER_PROCESS"',
    ]


@pytest.mark.parametrize(
    "args, key",
    [
        (["run_dir=a\nb"], "run_dir"),
        (["run_dir=a\rb"], "run_dir"),
        (["run_dir=a\u2028b"], "run_dir"),
        (["data.train=/d/x\x1b[2K.json"], "data.train"),
        (["run_dir=ok\u202eexe.txt"], "run_dir"),  # a direction override: the printed line would lie
        (["run_dir=del\x7f"], "run_dir"),
        (["--partition", "gpu\n#SBATCH --account=other"], "--partition"),
        (["--partition", "gpu --account=other"], "--partition"),
        (["--time", "1:00:00\nhostname"], "--time"),
        (["--time", "1:00:00 --account=other"], "--time"),
        (["--account", "a\n#SBATCH --qos=high"], "--account"),
        (["--account", "a --qos=high"], "--account"),
        (["launch.account=a b"], "launch.account"),
        (["launch.partition=a#b"], "launch.partition"),
        (["launch.nvme_path=/nv\nme"], "launch.nvme_path"),
    ],
)
def test_control_characters_and_unsafe_sbatch_values_stop_a_slurm_launch(tmp_path, capsys, args, key):
    code = cli.main(
        ["launch", "--config", str(CONFIG), "--slurm", "--dry-run", "--no-check", f"data.cache_dir={tmp_path}", *args]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("qa-dist: error: ") and key in err


def test_control_characters_stop_the_accelerate_line(tmp_path, capsys):
    for args, key in [
        (["train.max_steps=3", "run_dir=a\tb"], "run_dir"),
        (["--head", "10.0.0.1\n", "--nodes", "2"], "--head"),
    ]:
        code = cli.main(["launch", "--config", str(CONFIG), "--dry-run", "--no-check", "--cpu", *args])
        captured = capsys.readouterr()
        assert code == 2 and captured.out == "", captured
        assert captured.err.startswith("qa-dist: error: ") and key in captured.err and captured.err.count("\n") == 1


def test_a_config_path_with_a_newline_is_refused(tmp_path, capsys):
    config = tmp_path / "a\nb.yaml"
    config.write_text(CONFIG.read_text())
    code = cli.main(["launch", "--config", str(config), "--slurm", "--dry-run", "--no-check", f"run_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "--config" in err and err.count("\n") == 1


def test_a_newline_in_the_run_dir_exits_2_through_the_command_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "qa_dist", "launch", "--config", str(CONFIG), "--slurm", "--dry-run"]
        + [f"data.cache_dir={tmp_path}", f"run_dir={tmp_path}/a\nb"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 2, done.stdout
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.startswith("qa-dist: error: ") and "run_dir" in done.stderr


@pytest.mark.parametrize("run_dir", ["/tmp/a\\b", "/tmp/hetjob-1", "/tmp/PackJob"])
def test_run_dirs_sbatch_cannot_carry_are_refused_with_a_reason(run_dir):
    config = load_config(str(CONFIG), [f"run_dir={run_dir}"])
    with pytest.raises(ConfigError, match="run_dir"):
        LS.render_sbatch(LA.Plan("ddp", 1, 2, cpu=True), config, str(CONFIG), [])


def test_the_printed_accelerate_line_is_shell_quoted(tmp_path):
    overrides = [f"run_dir={tmp_path}/x$(touch pwned); touch pwned", "data.train=/d/`touch pwned`.json"]
    line = LA.launch_line(LA.Plan("ddp", 1, 2, cpu=True), str(CONFIG), overrides, machine_rank=0, head="h", port=1)
    printed = shlex.join(line)
    assert shlex.split(printed) == line
    done = subprocess.run(["bash", "-c", "printf '%s\\0' " + printed], capture_output=True, cwd=tmp_path, check=True)
    assert done.stdout.decode().split("\0")[:-1] == line
    _nothing_ran(tmp_path)


@pytest.mark.parametrize("script", ["one_node.sh", "multi_node.sh"])
def test_launch_wrappers_pass_every_argument_through_intact(tmp_path, script):
    record = tmp_path / "argv"
    bin_dir = tmp_path / "bin"
    _stub(bin_dir / "qa-dist", f"printf '%s\\0' \"$@\" > {shlex.quote(str(record))}\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HEAD": "-h", "NODES": "2", "RANK": "1"}
    args = ["-cfg $(touch pwned).yaml", "run_dir=a b; touch pwned", "data.train=`touch pwned`"]
    subprocess.run([str(REPO / "launch" / script), *args], env=env, cwd=tmp_path, check=True)
    argv = _argv(record)
    assert argv[:2] == ["launch", f"--config={args[0]}"] and argv[-2:] == args[1:]
    if script == "multi_node.sh":
        assert "--head=-h" in argv  # a value starting with "-" cannot be taken for an option
    _nothing_ran(tmp_path)


@pytest.mark.parametrize("script", ["one_node.sh", "multi_node.sh"])
def test_a_recipes_strategy_survives_the_wrappers(tmp_path, script):
    """The wrappers pass only what the user set: the recipe's launch.strategy is what the launch
    plans with, unless STRATEGY says otherwise."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(CONFIG.read_text().replace("  strategy: ddp\n", "  strategy: single\n", 1))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HEAD": "127.0.0.1"}
    env |= {"NODES": "1", "RANK": "0"}
    env.pop("STRATEGY", None)
    env.pop("PORT", None)
    args = ["--dry-run", "--no-check", f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(
        [str(REPO / "launch" / script), str(recipe), *args], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "--num_processes 1" in done.stdout  # single: one process, not auto's two CPU processes
    done = subprocess.run(
        [str(REPO / "launch" / script), str(recipe), *args],
        env={**env, "STRATEGY": "ddp"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "--num_processes 2" in done.stdout, done.stderr
