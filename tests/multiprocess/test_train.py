"""Training with 2 CPU processes (gloo) under the shipped Accelerate configs: DDP, ZeRO-2, ZeRO-3;
exact resume, preemption by signal, incomplete checkpoints, a rank that dies."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import small_run_overrides
from safetensors.torch import load_file
from wandb_log import config, history, records, run_ids

from qa_dist import load_examples
from qa_dist.config import EvalConfig, TrainConfig
from qa_dist.train.checkpoint import COMPLETE, complete_checkpoints

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_model, cache_dir):
    """One plain single-process run of 4 steps (its stderr captured, as in a log file), shared by the
    tests that only read what it left."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    return run_dir, _run([sys.executable, *_args(tiny_model, cache_dir, run_dir, "train.max_steps=4")])


def _args(tiny_model, cache_dir, run_dir, *extra):
    return [
        "-m",
        "qa_dist",
        "train",
        "--config",
        str(REPO / "configs" / "runs" / "cpu_sample_en.yaml"),
        *small_run_overrides(tiny_model, run_dir, cache_dir, *extra),
    ]


def _launch(strategy: str) -> list[str]:
    return [
        *ACCELERATE,
        "--config_file",
        str(REPO / "configs" / "accelerate" / f"{strategy}.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
    ]


def _run(cmd, timeout=600, **extra_env):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra_env}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def _losses(stderr: str) -> list[float]:
    return [float(m) for m in re.findall(r"^step \d+: loss ([0-9.]+)", stderr, re.MULTILINE)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["cpu_ddp", "zero2", "zero3"])
def test_two_processes_train_and_export(tmp_path, tiny_model, cache_dir, strategy):
    from transformers import AutoModelForQuestionAnswering

    run_dir = tmp_path / "run"
    done = _run(
        [
            *_launch(strategy),
            *_args(tiny_model, cache_dir, run_dir, "train.max_steps=30", "train.checkpoint_every=10"),
        ]
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "training on 2 process(es)" in done.stderr  # the world size we asked for, not 1 twice
    losses = _losses(done.stderr)
    assert len(losses) == 15
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses  # the loss falls
    assert [p.name for p in complete_checkpoints(run_dir)] == [
        "step-00000020",
        "step-00000030",
    ]  # keep 2
    # The gathered evaluation ran at the end (under DeepSpeed too, whose Accelerate gather fails on
    # gloo) and rank zero wrote the prediction files of every dev question.
    metrics = json.loads((run_dir / "eval" / "step_30" / "metrics.json").read_text())
    assert metrics["metric"] == "squad_v2" and metrics["raw"]["missing"] == 0
    predictions = json.loads((run_dir / "eval" / "step_30" / "predictions.json").read_text())
    assert set(predictions) == {e["id"] for e in load_examples("sample:en-dev")}
    assert re.search(r"^step 30: .*eval/f1 ", done.stderr, re.MULTILINE)

    # The export loads and predicts what the model at the end of training predicted.
    saved = load_file(str(run_dir / "export_check_logits.safetensors"))  # no pickle among qa-dist's files
    inputs = {k.removeprefix("inputs."): v for k, v in saved.items() if k.startswith("inputs.")}
    exported = AutoModelForQuestionAnswering.from_pretrained(str(run_dir / "model")).eval()
    with torch.no_grad():
        out = exported(**inputs)
    assert torch.allclose(torch.stack([out.start_logits, out.end_logits]), saved["logits"], atol=1e-5)
    assert not list(run_dir.glob("*.pt")) and not (run_dir / "model.partial").exists()
    weights = load_file(str(run_dir / "model" / "model.safetensors"))
    assert all(t.numel() > 0 for t in weights.values())  # ZeRO-3 gathered, not empty shards
    assert json.loads((run_dir / "export_check.json").read_text())["max_abs_diff"] <= 1e-4


def test_exported_model_runs_in_the_pipeline(single_run):
    """Single plain process; the export is what pipeline("question-answering") loads (transformers
    5.3 removed the task: importing qa_dist.qa_pipeline gives it back where it is missing), and its
    answer is the one ``qa-dist predict`` gives."""
    from transformers import pipeline

    import qa_dist.qa_pipeline  # noqa: F401
    from qa_dist.eval.run import predict

    run_dir, done = single_run
    assert done.returncode == 0, done.stderr[-4000:]
    qa = pipeline("question-answering", model=str(run_dir / "model"))
    context = "Paris is the capital of France. " * 40  # several windows at max_seq_len 64
    question = "Where is Paris?"
    answer = qa(question=question, context=context, max_seq_len=64, doc_stride=16)
    assert set(answer) == {"answer", "score", "start", "end"}
    assert 0 <= answer["start"] < answer["end"] <= len(context) and 0 < answer["score"] <= 1
    assert context[answer["start"] : answer["end"]] == answer["answer"]
    example = {"id": "q", "question": question, "context": context}
    config = EvalConfig(max_answer_length=15, metric="squad")  # the pipeline's defaults: no null answer
    expected = predict(str(run_dir / "model"), [example], None, max_length=64, doc_stride=16, config=config)
    assert answer["answer"] == expected.predictions.answers["q"]

    top = qa({"question": question, "context": context}, top_k=3, max_seq_len=64, doc_stride=16)
    assert len(top) == 3 and top[0] == answer
    assert [a["score"] for a in top] == sorted((a["score"] for a in top), reverse=True)
    both = qa(question=[question, "What is Paris?"], context=context, max_seq_len=64, doc_stride=16)
    assert len(both) == 2 and both[0] == answer
    with_null = qa(question=question, context=context, handle_impossible_answer=True, top_k=25, max_seq_len=64)
    assert any(a["answer"] == "" for a in with_null)  # the no-answer entry, at its own score


def _workers(launcher_pid: int) -> dict[int, int]:
    """{local rank: pid} of the training processes a launcher started."""
    found = {}
    for pid in subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [e.split(b"=", 1)[1] for e in env if e.startswith(b"LOCAL_RANK=")]
        if rank:
            found[int(rank[0])] = int(pid)
    return found


def _wait_for_step(log: Path, step: int, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while f"step {step}:" not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.multiprocess
def test_preemption_then_exact_resume(tmp_path, tiny_model, cache_dir):
    """SIGUSR1 to one rank: all ranks checkpoint at the next step boundary and exit 75; resume=auto
    then reaches bit for bit the weights of an uninterrupted run."""
    steps = ["train.max_steps=40", "train.checkpoint_every=0"]
    straight = _run([*_launch("cpu_ddp"), *_args(tiny_model, cache_dir, tmp_path / "straight", *steps)])
    assert straight.returncode == 0, straight.stderr[-4000:]

    run_dir = tmp_path / "interrupted"
    log = tmp_path / "interrupted.log"
    wandb_on = ["logging.wandb_project=qa-dist-tests"]  # no API key: offline
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [*_launch("cpu_ddp"), *_args(tiny_model, cache_dir, run_dir, *steps, *wandb_on)],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        _wait_for_step(log, 6, proc)
        os.kill(_workers(proc.pid)[1], signal.SIGUSR1)  # rank 1 only: the ranks agree
        proc.wait(timeout=300)
    text = log.read_text()
    assert proc.returncode != 0 and "exitcode  : 75" in text, text[-3000:]
    marker = json.loads((run_dir / "preempted.json").read_text())
    assert marker["signal"] == "SIGUSR1" and marker["exit_code"] == 75 and 6 <= marker["step"] < 40
    (checkpoint,) = complete_checkpoints(run_dir)
    assert checkpoint.name == f"step-{marker['step']:08d}"
    assert not (run_dir / "model").exists()

    # A later, half-written checkpoint (no marker) must never be chosen.
    fake = run_dir / "checkpoints" / "step-00000039"
    fake.mkdir()
    (fake / "trainer_state.json").write_text(json.dumps({"step": 39, "epoch": 9, "micro_step": 0}))

    resumed = _run([*_launch("cpu_ddp"), *_args(tiny_model, cache_dir, run_dir, *steps, *wandb_on, "resume=auto")])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {checkpoint}" in resumed.stderr
    assert not (run_dir / "preempted.json").exists()
    # wandb ran offline on rank zero only, and the resumed run continued the same wandb run.
    logs = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 2, logs
    assert run_ids(logs[0]) == run_ids(logs[1]) and len(run_ids(logs[0])) == 1
    logged_steps = [row["_step"] for row in history(logs[0]) + history(logs[1]) if "loss" in row]
    assert logged_steps == list(range(2, 41, 2)), logged_steps  # every log step once, across the two
    assert config(logs[0])["train"]["max_steps"] == 40
    # A table of sample predictions on evaluation windows, logged once, at the end of the run.
    (path,) = [
        f.path for r in records(logs[1]) if r.HasField("files") for f in r.files.files if "sample_predictions" in f.path
    ]
    table = json.loads((logs[1].parent / "files" / path).read_text())
    assert len(table["data"]) == 8
    assert table["columns"] == ["id", "question", "predicted", "probability", "gold"]
    dev_ids = {e["id"] for e in load_examples("sample:en-dev")}
    assert all(row[0] in dev_ids for row in table["data"])
    assert "wandb sync" in resumed.stderr
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(run_dir / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit


@pytest.mark.multiprocess
def test_a_rank_that_dies_ends_the_job_quickly(tmp_path, tiny_model, cache_dir):
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [
                *_launch("cpu_ddp"),
                *_args(tiny_model, cache_dir, tmp_path / "run", "train.max_steps=100000"),
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        _wait_for_step(log, 4, proc)
        os.kill(_workers(proc.pid)[1], signal.SIGKILL)
        started = time.monotonic()
        proc.wait(timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - started < 90


def _evaluating(tmp_path, tiny_model, cache_dir):
    """A 2-process run whose evaluation at step 2 computes for two minutes; returns (launcher, log)
    once both ranks are evaluating."""
    log = tmp_path / "run.log"
    args = _args(tiny_model, cache_dir, tmp_path / "run", "train.max_steps=100000")[5:]  # the overrides only
    script = str(REPO / "tests" / "train_with_evaluator.py")
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [*_launch("cpu_ddp"), script, str(tmp_path / "calls.json"), "2", "data.train=sample:en-train", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1", "QA_DIST_TEST_EVAL_SECONDS": "120"},
        )
    deadline = time.monotonic() + 300
    while not all(f"rank {r} evaluating at step 2" in log.read_text() for r in (0, 1)):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc, log


@pytest.mark.multiprocess
def test_a_rank_that_dies_during_evaluation_ends_the_job_quickly(tmp_path, tiny_model, cache_dir):
    """Rank 1 is killed while both ranks evaluate. torchrun sends the survivor SIGTERM; the
    preemption handler used to note it for the next step boundary while the survivor evaluated on
    until torchrun's SIGKILL 30 s later. Now the ranks agree after every evaluation batch whether to
    stop, and with a dead peer that agreement fails at once."""
    proc, log = _evaluating(tmp_path, tiny_model, cache_dir)
    os.kill(_workers(proc.pid)[1], signal.SIGKILL)
    started = time.monotonic()
    proc.wait(timeout=120)
    took = time.monotonic() - started
    print(f"the job ended {took:.1f} s after rank 1 was killed")
    assert proc.returncode != 0
    assert took < 15, f"{took:.1f} s: {log.read_text()[-2000:]}"


@pytest.mark.multiprocess
def test_sigterm_during_evaluation_checkpoints_at_once(tmp_path, tiny_model, cache_dir):
    """A preemption's SIGTERM to one rank in the middle of a two-minute evaluation: every rank
    leaves the evaluation at the same batch, the step is checkpointed and the job exits 75 (it used
    to finish the evaluation first, past any scheduler's KillWait)."""
    proc, log = _evaluating(tmp_path, tiny_model, cache_dir)
    os.kill(_workers(proc.pid)[1], signal.SIGTERM)
    started = time.monotonic()
    proc.wait(timeout=300)
    took = time.monotonic() - started
    print(f"the job checkpointed and ended {took:.1f} s after SIGTERM")
    text = log.read_text()
    assert "exitcode  : 75" in text, text[-3000:]
    marker = json.loads((tmp_path / "run" / "preempted.json").read_text())
    assert marker == {"step": 2, "signal": "SIGTERM", "exit_code": 75}
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step-00000002"]
    assert took < 30, f"{took:.1f} s: {text[-2000:]}"
    # The requeued run evaluates the stopped step first (its checkpoint says so), then trains on.
    args = _args(tiny_model, cache_dir, tmp_path / "run", "train.max_steps=3", "resume=auto")[5:]
    script = str(REPO / "tests" / "train_with_evaluator.py")
    resumed = subprocess.run(
        [*_launch("cpu_ddp"), script, str(tmp_path / "calls.json"), "2", "data.train=sample:en-train", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "calls.json").read_text()) == {"calls": [2, 3], "steps": 3}


def test_wandb_mode_in_the_environment_wins_over_an_api_key(tmp_path, tiny_model, cache_dir):
    """WANDB_API_KEY made qa-dist go online by itself (and overwrite the user's WANDB_MODE=offline),
    then fail after 108 s on a machine without network. The wandb server here is a closed port:
    any attempt to reach it would fail or hang."""
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_API_KEY": "dummy" * 8,
        "WANDB_MODE": "offline",
        "WANDB_BASE_URL": "http://127.0.0.1:9",
    }
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            *_args(tiny_model, cache_dir, run_dir, "train.max_steps=2", "data.eval=null"),
            "logging.wandb_project=qa-dist-tests",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-4000:]
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    assert [row["_step"] for row in history(log) if "loss" in row] == [2]
    assert "wandb sync" in done.stderr
    assert took < 90, took


def test_wandb_that_cannot_go_online_is_one_line_error(tmp_path, tiny_model, cache_dir):
    """An API key and no WANDB_MODE: online, as wandb itself would. When the server cannot be
    reached (a closed port; wandb's init timeout shortened from 90 s), one line and exit 2."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_API_KEY": "dummy" * 8,
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_INIT_TIMEOUT": "10",
    }
    env.pop("WANDB_MODE", None)
    done = subprocess.run(
        [
            sys.executable,
            *_args(tiny_model, cache_dir, tmp_path / "run", "train.max_steps=2", "data.eval=null"),
            "logging.wandb_project=qa-dist-tests",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 2, done.stderr[-4000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("qa-dist: error:")]
    assert "wandb could not start online" in line and "WANDB_MODE=offline" in line


@pytest.mark.parametrize(
    ("configured", "environ", "expected"),
    [
        ("auto", {}, "offline"),
        ("auto", {"WANDB_API_KEY": "k"}, "online"),
        ("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}, "offline"),
        ("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "dryrun"}, "offline"),
        ("auto", {"WANDB_MODE": "online"}, "online"),
        ("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}, "disabled"),
        ("auto", {"WANDB_API_KEY": "k", "WANDB_DISABLED": "true"}, "disabled"),
        ("offline", {"WANDB_API_KEY": "k", "WANDB_MODE": "online"}, "offline"),
    ],
)
def test_wandb_mode_follows_the_environment_under_auto(configured, environ, expected):
    from qa_dist.config import LoggingConfig
    from qa_dist.train.tracking import wandb_mode

    assert wandb_mode(LoggingConfig(wandb_project="p", wandb_mode=configured), environ) == expected


def test_single_process_trains_and_export_loads(single_run):
    from transformers import AutoModelForQuestionAnswering

    run_dir, done = single_run
    assert done.returncode == 0, done.stderr[-4000:]
    assert "training on 1 process(es)" in done.stderr
    model = AutoModelForQuestionAnswering.from_pretrained(str(run_dir / "model"))
    assert model.config.hidden_size == 32
    assert (run_dir / "model" / "tokenizer.json").exists() and (run_dir / "config.yaml").exists()
    # The windows it was trained on, for predict and the pipeline (the quick runs use 192 / 64).
    windows = json.loads((run_dir / "model" / "qa_dist_windows.json").read_text())
    assert windows == {"max_length": 192, "doc_stride": 64}


def test_evaluation_hook_runs_every_n_steps_and_at_the_end(tmp_path, tiny_model, cache_dir):
    out = tmp_path / "calls.json"
    args = _args(tiny_model, cache_dir, tmp_path / "run", "train.max_steps=10")[5:]  # the overrides only
    script = str(REPO / "tests" / "train_with_evaluator.py")
    done = _run([sys.executable, script, str(out), "4", "data.train=sample:en-train", *args])
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(out.read_text()) == {"calls": [4, 8, 10], "steps": 10}
    assert "step 8: eval/score 8" in done.stderr  # the hook's metrics reach the tracker


def test_mfu_estimate():
    from qa_dist.train.tracking import mfu

    # 110M parameters at 100k tokens/s on 8 GPUs of 312 TFLOP/s: 6 * 1.1e8 * 1e5 / 2.496e15.
    assert mfu(110_000_000, 100_000.0, 8, 312.0) == pytest.approx(0.02644, rel=1e-3)


def test_incomplete_checkpoints_are_never_complete(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in [(10, True), (20, True), (30, False)]:
        path = root / f"step-{step:08d}"
        path.mkdir(parents=True)
        (path / "trainer_state.json").write_text("{}")
        if complete:
            (path / COMPLETE).write_text("")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000010", "step-00000020"]


def test_periodic_evaluator_runs_once_at_the_end_even_when_the_last_step_was_evaluated():
    from qa_dist.train import PeriodicEvaluator

    class Counting(PeriodicEvaluator):
        calls: list[int] = []

        def run(self, step, model):
            self.calls.append(step)
            return {}

    evaluator = Counting(5)
    for step in range(1, 11):
        evaluator.maybe_run(step, None)
    evaluator.finish(10, None)
    assert evaluator.calls == [5, 10]
    evaluator.finish(12, None)
    assert evaluator.calls == [5, 10, 12]


def test_export_check_compares_bf16_runs_like_with_like(tmp_path, tiny_model):
    """Under bf16 the trained logits carry rounding that grows with their size (a MiniLM run in bf16
    failed the old absolute check at 0.07). The check runs the export under the same autocast with a
    tolerance relative to the logits: a right export of a model with large logits passes, a wrong
    export still fails."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from qa_dist.train.export import check_export, export_model

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    try:
        model = AutoModelForQuestionAnswering.from_pretrained(str(tiny_model))
        with torch.no_grad():
            model.qa_outputs.weight.mul_(400)  # logits the size of a trained model's
        model = accelerator.prepare(model)
        tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
        batch = dict(tokenizer(["Where is Paris?"] * 4, ["Paris is the capital of France."] * 4, return_tensors="pt"))
        export_model(accelerator, model, tokenizer, tmp_path / "model")
        report = check_export(accelerator, model, batch, tmp_path / "model", tolerance=2e-2)
        assert report["scale"] > 5 and report["max_abs_diff"] <= 2e-2 * report["scale"]

        AutoModelForQuestionAnswering.from_pretrained(str(tiny_model)).save_pretrained(tmp_path / "model")
        with pytest.raises(RuntimeError, match="disagrees"):
            check_export(accelerator, model, batch, tmp_path / "model", tolerance=2e-2)
    finally:
        AcceleratorState._reset_state(True)


def test_progress_bar_on_a_terminal_and_none_in_logs(tmp_path, tiny_model, cache_dir, single_run):
    """On a terminal rank zero draws a bar of optimizer steps with the step lines above it; a log
    file (captured here, Slurm's output file) gets the step lines only."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    args = [sys.executable, *_args(tiny_model, cache_dir, tmp_path / "tty", "train.max_steps=4", "data.eval=null")]
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(args, stdin=child, stdout=child, stderr=child, cwd=REPO)
    os.close(child)
    shown = b""
    while select.select([main], [], [], 300)[0]:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    assert proc.wait(timeout=60) == 0, shown.decode(errors="replace")[-3000:]
    lines = shown.decode(errors="replace").replace("\r", "\n").splitlines()
    assert any(line.startswith("training: 100%") and "4/4" in line for line in lines)
    assert any(line.startswith("step 4: loss") for line in lines)

    _, logged = single_run
    assert logged.returncode == 0, logged.stderr[-3000:]
    assert "step 4: loss" in logged.stderr and "training:" not in logged.stderr.replace("training on", "")


def test_adamw_is_fused_on_cpu_and_cuda_unless_the_parameters_are_sharded():
    """The Trainer's default, and 4x faster on the CPU for MiniLM (17-19 against 74-97 ms a step);
    DeepSpeed and FSDP keep the default kernel (they own flat or DTensor parameters)."""
    from qa_dist.train.optim import make_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    fused = make_optimizer(model, TrainConfig(), device_type="cpu")
    assert fused.defaults["fused"] is True
    assert [len(g["params"]) for g in fused.param_groups] == [1, 3]  # weight; bias and LayerNorm
    fused.zero_grad()
    model(torch.ones(2, 4)).sum().backward()
    fused.step()  # the CPU kernel exists in this torch
    assert not make_optimizer(model, TrainConfig(), device_type="cpu", sharded=True).defaults["fused"]
    assert not make_optimizer(model, TrainConfig(fused_adamw=False), device_type="cpu").defaults["fused"]


@pytest.mark.slow
def test_compiled_training_exports_every_weight_and_resumes_exactly(tmp_path, tiny_model, cache_dir):
    """train.compile on the CPU (inductor): Accelerate keeps torch.compile's wrapper when it hands
    out the state dict, whose keys gain "_orig_mod."; the export must carry the plain names (or
    from_pretrained initialises every weight afresh and the export check fails). The compiled run
    also checkpoints and resumes to the uninterrupted run's weights, to rounding. train.compile=false
    compiles nothing, even where the environment asks Accelerate to."""
    from transformers import AutoModelForQuestionAnswering

    steps = ["train.max_steps=4", "train.checkpoint_every=2", "train.compile=true", "data.eval=null"]
    straight_dir = tmp_path / "straight"
    # Regional compilation (each block compiled, "_orig_mod." inside the names) here, the whole
    # model in the resumed run; TORCH_LOGS shows that dynamo really compiled (a new length recompiles).
    straight = _run(
        [sys.executable, *_args(tiny_model, cache_dir, straight_dir, *steps)],
        TORCH_LOGS="recompiles",
        ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION="true",
    )
    assert straight.returncode == 0, straight.stderr[-4000:]
    assert "Recompiling function" in straight.stderr
    exported = load_file(str(straight_dir / "model" / "model.safetensors"))
    expected = AutoModelForQuestionAnswering.from_pretrained(str(tiny_model)).state_dict()
    assert set(exported) == set(expected), sorted(set(exported) ^ set(expected))[:4]
    check = json.loads((straight_dir / "export_check.json").read_text())
    assert check["max_abs_diff"] <= check["tolerance"] * check["scale"], check

    # The same run as if it had stopped right after step 2.
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    (resumed_dir / "checkpoints").mkdir()
    step2 = straight_dir / "checkpoints" / "step-00000002"
    assert step2 in complete_checkpoints(straight_dir)
    subprocess.run(["cp", "-a", str(step2), str(resumed_dir / "checkpoints")], check=True)
    resumed = _run(
        [sys.executable, *_args(tiny_model, cache_dir, resumed_dir, *steps, "resume=auto")], TORCH_LOGS="recompiles"
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr and "Recompiling function" in resumed.stderr
    assert "step 4: loss" in resumed.stderr and "step 2: loss" not in resumed.stderr  # only steps 3-4 ran
    again = load_file(str(resumed_dir / "model" / "model.safetensors"))
    assert again.keys() == exported.keys()
    # Not bit for bit, unlike eager runs: the resumed process compiles the whole model where the
    # straight run compiled each block, and meets a new sequence length first, so step 3 runs
    # kernels with other reduction orders (1.3e-9 seen with whole-model compilation on both sides).
    worst = max(float((again[k] - exported[k]).abs().max()) for k in exported)
    assert worst <= 1e-6, worst

    # The same run with compile off, where an accelerate config's dynamo backend would compile it.
    eager = _run(
        [sys.executable, *_args(tiny_model, cache_dir, tmp_path / "eager", *steps, "train.compile=false")],
        TORCH_LOGS="recompiles",
        ACCELERATE_DYNAMO_BACKEND="INDUCTOR",
    )
    assert eager.returncode == 0, eager.stderr[-4000:]
    assert "step 4: loss" in eager.stderr and "Recompiling function" not in eager.stderr


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("flash_attn") is not None, reason="flash-attn is installed here"
)
def test_an_attention_kernel_that_cannot_load_is_one_line_naming_the_switch(tmp_path, tiny_model, cache_dir):
    """transformers raises ImportError for flash_attention_2 without the flash-attn package: the
    user's switch is named, exit 2, no traceback, and no training starts."""
    done = _run(
        [sys.executable, *_args(tiny_model, cache_dir, tmp_path / "run", "train.attn_implementation=flash_attention_2")]
    )
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("qa-dist: error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith("qa-dist: error: train.attn_implementation=flash_attention_2: "), lines[0]
    assert "step 1" not in done.stderr and not (tmp_path / "run" / "model").exists()


def test_an_error_that_only_mentions_attention_is_not_blamed_on_the_switch(tmp_path, tiny_model):
    """The switch is blamed only when the same load works without it: a head count that does not
    divide the hidden size, or a path with "attention" in it, stay the model's errors."""
    from qa_dist.config import ModelConfig
    from qa_dist.errors import ConfigError
    from qa_dist.models import load_qa_model

    bad = tmp_path / "bad-heads"
    shutil.copytree(tiny_model, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))
    for name in (bad, tmp_path / "no-attention-model-here"):
        with pytest.raises(ConfigError) as refused:
            load_qa_model(ModelConfig(name_or_path=str(name)), attn_implementation="eager")
        message = str(refused.value)
        assert message.startswith("model.name_or_path:") and "attn_implementation" not in message, message
