"""Calibration data: text, text files and JSONL into seeded [N, L] windows; the built-in default; clear
errors for empty, too-short or malformed sources."""
import json
import logging

import numpy as np
import pytest

from jaxq.calib import data
from jaxq.calib.data import calibration_tokens


class WordTokenizer:
    """One id per whitespace-separated word (ids by first appearance), enough to count windows."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=False):
        ids = [self.vocab.setdefault(word, len(self.vocab)) for word in text.split()]
        return type("Encoding", (), {"input_ids": ids})()


class Model:
    source = "<test model>"

    def __init__(self, tokenizer=True):
        self.tokenizer = WordTokenizer() if tokenizer else None


TEXT = " ".join(f"w{i}" for i in range(1000))


def test_text_file_windows_are_seeded_non_overlapping_and_in_text_order(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    a = calibration_tokens(Model(), path, num_samples=5, seq_len=100, seed=7)
    b = calibration_tokens(Model(), str(path), num_samples=5, seq_len=100, seed=7)
    c = calibration_tokens(Model(), path, num_samples=5, seq_len=100, seed=8)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (5, 100) and a.dtype == np.int32 and not np.array_equal(a, c)
    starts = a[:, 0]
    assert np.all(np.diff(starts) >= 100) and np.all(starts % 100 == 0)  # whole windows, text order
    np.testing.assert_array_equal(a[:, 1:] - a[:, :-1], 1)


def test_jsonl_field_and_token_ids(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "body": " ".join(f"d{i}w{j}" for j in range(30))})
                              for i in range(10)) + "\n\n")
    got = calibration_tokens(Model(), path, num_samples=3, seq_len=50, field="body")
    assert got.shape == (3, 50)
    ids = np.arange(1000)
    np.testing.assert_array_equal(calibration_tokens(Model(tokenizer=False), ids, num_samples=10, seq_len=100),
                                  ids.reshape(10, 100))


def test_fewer_windows_than_asked_uses_all_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        got = calibration_tokens(Model(), TEXT, num_samples=50, seq_len=300)
    assert got.shape == (3, 300) and "fewer than the 50 asked" in caplog.text


def test_default_source_is_documented_and_offline(monkeypatch):
    text, what = data.default_calibration_text()
    assert len(text.split()) > 10_000 and what
    monkeypatch.setattr(data, "DEFAULT_WIKITEXT", data.DEFAULT_WIKITEXT.with_name("missing.txt"))
    text, what = data.default_calibration_text()
    assert what == "pydoc_data.topics" and len(text.split()) > 10_000
    assert calibration_tokens(Model(), None, num_samples=4, seq_len=64).shape == (4, 64)


def test_bad_sources_are_refused_naming_the_problem(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match=r"calibration data .*empty\.txt is empty"):
        calibration_tokens(Model(), empty)
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(ValueError, match=r"short\.txt holds 5 tokens, fewer than one sample of 512"):
        calibration_tokens(Model(), short)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: record has no field 'text' \(it has \['body'\]\)"):
        calibration_tokens(Model(), bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: not a JSON object"):
        calibration_tokens(Model(), bad)
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        calibration_tokens(Model(), str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="has no tokenizer"):
        calibration_tokens(Model(tokenizer=False), "some text")
    with pytest.raises(ValueError, match="expected integers"):
        calibration_tokens(Model(), np.ones(600, np.float32))
