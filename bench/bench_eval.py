#!/usr/bin/env python
"""Benchmark the streaming evaluation, every number measured side by side in one run.

1. Peak RSS of ``eval_ppl.py`` on tiny random models of L and 4L layers (same
   width), next to a plain ``transformers`` full-model evaluation of the same
   models: ours should stay flat (goal ratio <= 1.3), the baseline grows.
2. Eval tokens/s of the streaming path against a plain ``transformers`` forward of
   SmolLM2-135M on the same windows (goal ratio >= 0.8), and their perplexities.

Usage:
    python bench/bench_eval.py [--layers 6] [--windows 8] [--seq_len 1024]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import peak_rss_mib  # noqa: E402

from blockptq_assets.assets import ensure_assets  # noqa: E402
from blockptq_assets.tiny import make_tiny_checkpoint  # noqa: E402
from cores.models.run import sequence_nll
from cores.models.streaming import StreamingModel  # noqa: E402
from cores.utils.data import load_text, ppl_windows  # noqa: E402

HF_EVAL = """
import math, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
sys.path.insert(0, {root!r})
from cores.utils.data import load_text, ppl_windows
model = AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained({model!r})
ids = ppl_windows(tok, load_text({data!r}, "test"), {seq_len}, {windows})
with torch.no_grad():
    nll = sum(float(model(w[None], labels=w[None]).loss) for w in ids) / len(ids)
print(math.exp(nll))
"""


def memory_bench(layers: int, assets, work: Path) -> None:
    print(f"\n== peak RSS vs depth (hidden 768, intermediate 3072, vocab 49152; L={layers} vs 4L={4 * layers}) ==")
    rows = []
    for n in (layers, 4 * layers):
        model = make_tiny_checkpoint(work / f"L{n}", "llama", hidden_size=768, intermediate_size=3072,
                                     num_attention_heads=12, num_key_value_heads=4, vocab_size=49152,
                                     num_hidden_layers=n, max_position_embeddings=2048, dtype=torch.bfloat16)
        for f in assets.model_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, model / f.name)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
        ours = peak_rss_mib([sys.executable, "eval_ppl.py", "--model", str(model), "--dataset",
                             str(assets.eval_text), "--seq_len", "512", "--max_windows", "4"])
        script = HF_EVAL.format(root=str(ROOT), model=str(model), data=str(assets.eval_text), seq_len=512, windows=4)
        plain = peak_rss_mib([sys.executable, "-c", script])
        rows.append((n, size, ours, plain))
        print(f"layers {n:3d}  checkpoint {size:7.1f} MiB  eval_ppl.py {ours:7.1f} MiB  transformers {plain:7.1f} MiB")
    (_, _, ours_l, plain_l), (_, _, ours_4l, plain_4l) = rows
    print(f"ratio 4L/L: eval_ppl.py {ours_4l / ours_l:.3f} (goal <= 1.3)   transformers {plain_4l / plain_l:.3f}")


def speed_bench(assets, windows: int, seq_len: int) -> None:
    print(f"\n== eval speed on SmolLM2-135M: {windows} windows x {seq_len} tokens, fp32 on CPU ==")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    ids = ppl_windows(tok, load_text(str(assets.eval_text), "test"), seq_len, windows)
    n_tokens = ids.numel()

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_nll = sum(float(model(w[None], labels=w[None]).loss) for w in ids) / len(ids)
    hf_s = time.perf_counter() - start
    del model

    start = time.perf_counter()
    nll, count = sequence_nll(StreamingModel(assets.model_dir, dtype="float32"), ids)
    ours_s = time.perf_counter() - start

    hf_ppl, ours_ppl = math.exp(hf_nll), math.exp(nll / count)
    print(f"transformers forward  {n_tokens / hf_s:8.1f} tokens/s  ppl {hf_ppl:.4f}  (load + forward {hf_s:.1f} s)")
    print(f"streaming eval        {n_tokens / ours_s:8.1f} tokens/s  ppl {ours_ppl:.4f}  (load + forward {ours_s:.1f} s)")
    print(f"speed ratio ours/transformers {hf_s / ours_s:.3f} (goal >= 0.8); "
          f"ppl difference {abs(ours_ppl - hf_ppl) / hf_ppl * 100:.4f} %")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=6, help="L for the memory benchmark (default 6)")
    p.add_argument("--windows", type=int, default=8, help="SmolLM2 windows for the speed benchmark")
    p.add_argument("--seq_len", type=int, default=1024, help="window length for the speed benchmark")
    args = p.parse_args()
    assets = ensure_assets()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as work:
        memory_bench(args.layers, assets, Path(work))
    speed_bench(assets, args.windows, args.seq_len)


if __name__ == "__main__":
    main()
