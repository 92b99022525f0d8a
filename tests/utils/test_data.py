"""The text-data layer: every local source form, Wikitext from the caches, windows and samples."""

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from huggingface_hub import constants as hub_constants
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from cores.utils.data import DatasetNotFoundError, calibration_samples, load_text, ppl_windows

ROWS = ["", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 is a game . \n", " It was released . \n"]
WORDS = "the quick brown fox jumps over the lazy dog while a cat sleeps on a warm mat".split()


@pytest.fixture
def tokenizer():
    """A real word-level tokenizer trained in-process, with a small model_max_length."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", model_max_length=16)


@pytest.fixture
def text():
    return " ".join(WORDS[i % len(WORDS)] for i in range(7 * 53))


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": rows}), path)
    return path


def write_raw(path, rows):
    """The Wikitext .raw form of ``rows``: blank rows are ' \\n' lines in the original files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(row or " \n" for row in rows), encoding="utf-8")
    return path


# ---- local files and folders ----

def test_txt_file(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n\nworld\n")
    assert load_text(tmp_path / "a.txt") == "hello\n\nworld\n"


def test_parquet_file_joins_rows_with_blank_lines(tmp_path):
    assert load_text(write_parquet(tmp_path / "x.parquet", ROWS)) == "\n\n".join(ROWS)


@pytest.mark.parametrize("layout", ["", "wikitext-2-raw-v1/"])
def test_wikitext_parquet_folder(tmp_path, layout):
    write_parquet(tmp_path / f"{layout}test-00000-of-00002.parquet", ROWS[:2])
    write_parquet(tmp_path / f"{layout}test-00001-of-00002.parquet", ROWS[2:])
    write_parquet(tmp_path / f"{layout}train-00000-of-00001.parquet", ["train row"])
    assert load_text(tmp_path, "test") == "\n\n".join(ROWS)
    assert load_text(tmp_path, "eval") == "\n\n".join(ROWS)
    assert load_text(tmp_path, "train") == "train row"


def test_parquet_conversion_layout(tmp_path):
    write_parquet(tmp_path / "wikitext-2-raw-v1/test/0000.parquet", ROWS)
    assert load_text(tmp_path) == "\n\n".join(ROWS)


@pytest.mark.parametrize("layout", ["", "wikitext-2-raw/"])
def test_raw_files_match_parquet_rows(tmp_path, layout):
    write_raw(tmp_path / f"{layout}wiki.test.raw", ROWS)
    write_raw(tmp_path / f"{layout}wiki.valid.raw", ["valid row\n"])
    assert load_text(tmp_path, "test") == "\n\n".join(ROWS)
    assert load_text(tmp_path, "validation") == "valid row\n"
    assert load_text(tmp_path / f"{layout}wiki.test.raw") == "\n\n".join(ROWS)


@pytest.mark.parametrize(("name", "split"), [("eval.txt", "test"), ("test.txt", "eval"), ("valid.txt", "validation")])
def test_split_txt_synonyms(tmp_path, name, split):
    (tmp_path / name).write_text("held out")
    (tmp_path / "train.txt").write_text("training")
    assert load_text(tmp_path, split) == "held out"
    assert load_text(tmp_path, "train") == "training"


def test_plain_txt_folder_joins_documents_in_name_order(tmp_path, caplog):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    with caplog.at_level(logging.WARNING):
        assert load_text(tmp_path, "train") == "first\n\nsecond"
    assert "no split files" in caplog.text


def test_folder_with_other_splits_only_is_an_error(tmp_path):
    (tmp_path / "train.txt").write_text("training")
    (tmp_path / "notes.txt").write_text("notes")
    with pytest.raises(DatasetNotFoundError, match="nothing for split 'test'"):
        load_text(tmp_path, "test")


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt: no such file"):
        load_text(tmp_path / "nope.txt")


def test_empty_folder_and_empty_text(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path)):
        load_text(tmp_path)
    (tmp_path / "eval.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no text"):
        load_text(tmp_path)


def test_bad_split_and_file_type(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_text(tmp_path / "a.csv")
    with pytest.raises(ValueError, match="unknown split"):
        load_text(tmp_path, "dev-clean")


# ---- Wikitext-2 from the local caches ----

@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty hub and datasets caches in tmp_path."""
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return tmp_path


def test_wikitext2_from_hub_cache(caches):
    snapshot = caches / "hub/datasets--Salesforce--wikitext/snapshots/b08601e04326c79dfdd32d625aee71d232d685c3"
    write_parquet(snapshot / "wikitext-2-raw-v1/test-00000-of-00001.parquet", ROWS)
    write_parquet(snapshot / "wikitext-103-raw-v1/test-00000-of-00001.parquet", ["wrong config"])
    assert load_text("wikitext2") == "\n\n".join(ROWS)


def test_wikitext2_from_datasets_arrow_cache(caches, tmp_path):
    from datasets import Dataset  # its own writer, so the file is what a real cache holds

    Dataset.from_dict({"text": ROWS}).save_to_disk(tmp_path / "saved")
    build = caches / "datasets/wikitext/wikitext-2-raw-v1/1.0.0/a241db52902eaf2c6aa732210bead40c"
    build.mkdir(parents=True)
    next((tmp_path / "saved").glob("*.arrow")).rename(build / "wikitext-test.arrow")
    assert load_text("wikitext2", "test") == "\n\n".join(ROWS)


def test_wikitext2_missing_says_what_to_do(caches):
    with pytest.raises(DatasetNotFoundError) as err:
        load_text("wikitext2")
    assert isinstance(err.value, FileNotFoundError)
    for hint in ("hf download Salesforce/wikitext", str(caches / "hub"), "HF_HOME", "assets/corpus"):
        assert hint in str(err.value)


# ---- windows and calibration samples ----

def test_ppl_windows_cut_the_token_stream(tokenizer, text, caplog):
    with caplog.at_level(logging.WARNING):
        windows = ppl_windows(tokenizer, text, seq_len=50)
    assert "longer than the specified maximum" not in caplog.text
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    assert windows.shape == (ids.numel() // 50, 50) and windows.dtype == torch.long
    assert torch.equal(windows.flatten(), ids[: windows.numel()])
    assert torch.equal(ppl_windows(tokenizer, text, 50, max_windows=3), windows[:3])


def test_ppl_windows_need_one_window(tokenizer):
    with pytest.raises(ValueError, match="fewer than one window"):
        ppl_windows(tokenizer, "the quick brown fox", seq_len=50)


def test_calibration_samples_are_seeded_slices(tokenizer, text):
    every_slice = tokenizer(text, return_tensors="pt").input_ids[0].unfold(0, 32, 1)
    a = calibration_samples(tokenizer, text, n_samples=8, seq_len=32, seed=0)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, calibration_samples(tokenizer, text, n_samples=8, seq_len=32, seed=0))
    assert not torch.equal(a, calibration_samples(tokenizer, text, n_samples=8, seq_len=32, seed=1))
    assert all((every_slice == row).all(dim=1).any() for row in a)


def test_calibration_samples_need_enough_tokens(tokenizer):
    with pytest.raises(ValueError, match="fewer than one sample"):
        calibration_samples(tokenizer, "the quick brown fox", n_samples=1, seq_len=50, seed=0)
