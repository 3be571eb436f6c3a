"""Regenerate the samples shipped in this folder from the data sets in ``../shared/data``.

    python -m qa_dist.samples.make_samples /path/to/shared/data

English: SQuAD v2.0 dev (reconstructed; answer texts exact), the first paragraph of each article;
articles 0-23 form ``en-train``, articles 24-34 ``en-dev`` (answerable and unanswerable questions).
English for the demo's fine-tuning (``en-train-v1``): SQuAD v1.1 train, the first two paragraphs of
each article, articles in order until there are at least 1,000 questions (a pretrained encoder needs
a few thousand windows to start answering; v1.1 train shares no article with v2.0 dev).
Chinese: CMRC2018 dev, paragraphs 0-79 form ``zh-train`` and 80-119 ``zh-dev``.
The Chinese character tokenizer's vocabulary is every character of CMRC2018 dev and DRCD dev.
Both data sets are CC BY-SA (see LICENSE.md here).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _read(path: Path) -> dict:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def _dump(obj: dict, out: Path, name: str) -> None:
    (out / name).write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def english(shared: Path, out: Path = HERE) -> None:
    squad = _read(shared / "squad-v2.0-reconstructed" / "dev-v2.0.reconstructed.json.gz")
    articles = [{"title": a["title"], "paragraphs": a["paragraphs"][:1]} for a in squad["data"]]
    _dump({"version": "v2.0", "data": articles[:24]}, out, "squad_v2_sample_train.json")
    _dump({"version": "v2.0", "data": articles[24:35]}, out, "squad_v2_sample_dev.json")


def english_v1_train(shared: Path, out: Path = HERE, questions: int = 1000) -> None:
    squad = _read(shared / "squad-v1.1-reconstructed" / "train-v1.1.reconstructed.json.gz")
    articles, count = [], 0
    for article in squad["data"]:
        if count >= questions:
            break
        paragraphs = article["paragraphs"][:2]
        articles.append({"title": article["title"], "paragraphs": paragraphs})
        count += sum(len(p["qas"]) for p in paragraphs)
    _dump({"version": "1.1", "data": articles}, out, "squad_v1_sample_train.json")


def chinese(shared: Path, out: Path = HERE) -> None:
    articles = _read(shared / "cmrc2018" / "cmrc2018_dev.json.gz")["data"]
    _dump({"version": "v1.0", "data": articles[:80]}, out, "cmrc2018_sample_train.json")
    _dump({"version": "v1.0", "data": articles[80:120]}, out, "cmrc2018_sample_dev.json")


SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_style_tokenizer(model, train_texts=None, vocab_size: int = 30522):
    """A BERT-style fast tokenizer (lower-casing normalizer that splits CJK characters, BERT
    pre-tokenizer, ``[CLS] A [SEP] B [SEP]``) around a ``tokenizers`` WordPiece model, trained on
    ``train_texts`` when given. Also used by the tests to train tokenizers on the fly."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if train_texts is not None:
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
        tok.train_from_iterator(train_texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def chinese_tokenizer(shared: Path, out: Path = HERE) -> None:
    """A character-level WordPiece vocabulary (BERT-Chinese style) for offline Chinese runs."""
    from tokenizers import models

    chars: set[str] = set()
    for path in (
        shared / "cmrc2018" / "cmrc2018_dev.json.gz",
        shared / "drcd" / "DRCD_dev.json.gz",
    ):
        for article in _read(path)["data"]:
            for paragraph in article["paragraphs"]:
                chars.update(paragraph["context"].lower())
                for qa in paragraph["qas"]:
                    chars.update(qa["question"].lower())
    chars = {c for c in chars if not c.isspace() and c.isprintable()}
    ascii_pieces = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    vocab = SPECIAL_TOKENS + sorted(chars | set(ascii_pieces)) + ["##" + c for c in ascii_pieces if c.isalnum()]
    ids = {token: i for i, token in enumerate(vocab)}
    tokenizer = bert_style_tokenizer(models.WordPiece(vocab=ids, unk_token="[UNK]"))
    tokenizer.save_pretrained(str(out / "zh-char-tokenizer"))


if __name__ == "__main__":
    shared_dir = Path(sys.argv[1] if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "data")
    for make in (english, english_v1_train, chinese, chinese_tokenizer):
        make(shared_dir)
