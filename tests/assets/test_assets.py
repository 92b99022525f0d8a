"""The real offline assets: the SmolLM2 bf16 folder and the corpus splits."""

import hashlib
import json
import time

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from blockptq_assets.assets import SHAKESPEARE, build_corpus, clean_text, ensure_assets
from cores.utils.data import load_text


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_model_folder_is_a_bf16_llama_with_tied_embeddings(assets):
    config = json.loads((assets.model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["dtype"] == "bfloat16" and config["tie_word_embeddings"]
    assert "quantization_config" not in config
    with safe_open(assets.model_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
    assert "lm_head.weight" not in keys and len(keys) == 2 + 30 * 9


def test_model_loads_and_answers(assets):
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"


def test_tokenizer_is_the_real_one(assets):
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    assert tokenizer.vocab_size == 49152 and tokenizer.model_max_length == 8192
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    text = "To be, or not to be, that is the question:"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_corpus_splits_are_disjoint_and_sizable(assets):
    manifest = json.loads((assets.train_text.parent / "manifest.json").read_text())
    files = {split: {f["path"] for f in info["files"]} for split, info in manifest["splits"].items()}
    assert not files["train"] & files["eval"]
    assert not any(name.endswith("_gut_f.txt") for name in files["train"] | files["eval"])
    assert len(files["eval"]) == 6 and all(name.startswith("shksprdata/texts/") for name in files["eval"])
    for split, path, least in (("train", assets.train_text, 5_000_000), ("eval", assets.eval_text, 500_000)):
        text = load_text(path)
        assert len(text) == manifest["splits"][split]["chars"] > least
        assert sha256(path) == manifest["splits"][split]["sha256"]
        assert "gutenberg" not in text.lower()


def test_ensure_assets_is_cached_and_corpus_deterministic(assets, tmp_path):
    before = sha256(assets.train_text), sha256(assets.eval_text)
    start = time.perf_counter()
    assert ensure_assets() == assets
    assert time.perf_counter() - start < 1.0
    assert (sha256(assets.train_text), sha256(assets.eval_text)) == before
    build_corpus(assets.model_dir.parent / "downloads" / SHAKESPEARE.filename, tmp_path)
    assert (sha256(tmp_path / "train.txt"), sha256(tmp_path / "eval.txt")) == before


def test_clean_text_cuts_licence_and_scan_markup():
    modern = ("The Project Gutenberg EBook of Hamlet\r\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
              "HAMLET  \r\n\r\n\r\n\r\nEnter Ghost.\r\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nlicence")
    old = ("**The Project Gutenberg Etext**\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*\n"
           "HAMLET\nEnd of Project Gutenberg's Hamlet\n")
    scan = "### START: a.tif.txt ###\n#### Source: http://x\n\np.772:0\n\nShakespeare, William\n### END: a.tif.txt ###"
    assert clean_text(modern) == "HAMLET\n\nEnter Ghost."
    assert clean_text(old) == "HAMLET"
    assert clean_text(scan) == "Shakespeare, William"
