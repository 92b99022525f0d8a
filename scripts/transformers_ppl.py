#!/usr/bin/env python
"""Perplexity of a model folder through plain ``transformers``, on the windows ``eval_ppl.py`` uses.

The consumer-side check of a deployed checkpoint: ``AutoModelForCausalLM.from_pretrained``
(with ``compressed-tensors`` installed for a deployed folder) runs it, whole, in fp32,
with no code of this project in the forward. The windows and the token average are
those of ``eval_ppl.py``, so the two JSON files compare directly (``scripts/ppl_table.py``).

Example:
    python scripts/transformers_ppl.py --model outputs/default/w8a8c8_dynamic_deployed \
        --dataset assets/corpus/eval.txt --seq_len 512 --max_windows 16 --output_json hf.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores.utils.data import load_text, ppl_windows  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder (float, or deployed compressed-tensors)")
    p.add_argument("--dataset", required=True, help="text file or folder, as eval_ppl.py takes it")
    p.add_argument("--split", default="test")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--max_windows", type=int, help="evaluate the first N windows (default: all)")
    p.add_argument("--output_json", help="write ppl, nll, tokens, windows here")
    args = p.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    windows = ppl_windows(tokenizer, load_text(args.dataset, args.split), args.seq_len, args.max_windows)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    nll = 0.0
    with torch.no_grad():
        for window in windows:  # every window predicts seq_len - 1 tokens: the mean of means is the token mean
            nll += float(model(window[None], labels=window[None]).loss) * (window.numel() - 1)
    tokens = sum(w.numel() - 1 for w in windows)
    result = {"ppl": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens, "windows": len(windows),
              "seq_len": args.seq_len, "seconds": time.perf_counter() - start, "model": args.model,
              "dataset": args.dataset, "backend": "transformers", "dtype": "float32"}
    print(f"{args.model}: ppl {result['ppl']:.4f} over {tokens} tokens (transformers, fp32)")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
