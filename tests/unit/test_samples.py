"""The samples shipped with the package are exactly what make_samples takes from ../shared/data."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import SHARED_DATA

from qa_dist.data import load_source, sample_path
from qa_dist.samples import make_samples

SAMPLES = Path(make_samples.__file__).parent


def test_shipped_samples_regenerate_identically(tmp_path):
    make_samples.english(SHARED_DATA, tmp_path)
    make_samples.english_v1_train(SHARED_DATA, tmp_path)
    make_samples.chinese(SHARED_DATA, tmp_path)
    make_samples.chinese_tokenizer(SHARED_DATA, tmp_path)
    for name in (
        "squad_v2_sample_train.json",
        "squad_v2_sample_dev.json",
        "squad_v1_sample_train.json",
        "cmrc2018_sample_train.json",
        "cmrc2018_sample_dev.json",
    ):
        assert (tmp_path / name).read_text() == (SAMPLES / name).read_text(), name
    shipped = json.loads((SAMPLES / "zh-char-tokenizer" / "tokenizer.json").read_text())
    assert json.loads((tmp_path / "zh-char-tokenizer" / "tokenizer.json").read_text())["model"] == shipped["model"]


def test_samples_are_a_few_hundred_questions_with_unanswerables():
    en = load_source("sample:en-train").examples + load_source("sample:en-dev").examples
    zh = load_source("sample:zh-train").examples + load_source("sample:zh-dev").examples
    assert 300 <= len(en) <= 600 and 300 <= len(zh) <= 600
    assert 0.3 < sum(e["is_impossible"] for e in en) / len(en) < 0.7
    train_ids = {e["id"] for e in load_source("sample:en-train").examples}
    assert not train_ids & {e["id"] for e in load_source("sample:en-dev").examples}
    assert (sample_path("zh-char-tokenizer") / "tokenizer.json").exists()
    assert "CC BY-SA" in (SAMPLES / "LICENSE.md").read_text()


def test_demo_training_sample_is_answerable_squad_from_other_articles():
    v1 = load_source("sample:en-train-v1").examples
    assert 1000 <= len(v1) <= 1100 and not any(e["is_impossible"] for e in v1)
    dev_titles = {e["title"] for e in load_source("sample:en-dev").examples}
    assert dev_titles and not dev_titles & {e["title"] for e in v1}
