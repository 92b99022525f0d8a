#!/usr/bin/env python
"""Rank decoder layers by quantization sensitivity and write a recipe keeping the top N in BF16.

Each layer alone is quantized (round-to-nearest, dynamic activations) and the model compared with
the float one on a few calibration windows (KL of the next-token distributions, and perplexity);
see cores/recipes/sensitivity.py. Example:

    python scripts/sensitivity.py --model assets/smollm2-135m --dataset assets/corpus/train.txt \
        --budget 2 --output_dir outputs/sensitivity

Writes sensitivity.json (scores, ranking), recipe.yaml (the base recipe with bf16_layers set to
the pick) and sensitivity.png when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cores.cli import at_least, check_device, check_output_dir, run_main
from cores.recipes import builtin_recipe, check_against_model, load_recipe, parse_recipe
from cores.recipes.sensitivity import SensitivityConfig, layer_sensitivity, recipe_yaml, write_plot
from cores.utils.io import atomic_write_text
from cores.utils.logging import setup_logging

log = logging.getLogger("sensitivity")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="FP model folder")
    p.add_argument("--model_name", help="Hugging Face id, to pick the built-in recipe (default: from config.json)")
    p.add_argument("--recipe", help="base recipe file (default: the built-in one for the model)")
    p.add_argument("--dataset", required=True, help="calibration text: a .txt file, a folder or wikitext2")
    p.add_argument("--split", default="train", help="dataset split (default: train)")
    p.add_argument("--seq_len", type=at_least(2), default=512, help="window length (default: 512)")
    p.add_argument("--windows", type=at_least(1), default=4, help="calibration windows (default: 4)")
    p.add_argument("--budget", type=at_least(0), default=2, help="layers to keep in BF16 (default: 2)")
    p.add_argument("--output_dir", required=True, help="folder for sensitivity.json, recipe.yaml, sensitivity.png")
    p.add_argument("--dev", default="cpu", help="cpu, cuda:N or N (default: cpu)")
    p.add_argument("--offload_dir", help="keep the hidden states in files here")
    a = p.parse_args(argv)
    check_output_dir("--output_dir", a.output_dir)
    a.dev = check_device("--dev", a.dev)
    return a


def _run(a: argparse.Namespace) -> int:
    from cores.models.streaming import StreamingModel

    model = StreamingModel(a.model)
    base = load_recipe(a.recipe) if a.recipe else builtin_recipe(a.model_name, model.reader.config)
    check_against_model(base, model.config, model.family)
    cfg = SensitivityConfig(model=a.model, dataset=a.dataset, split=a.split, seq_len=a.seq_len, windows=a.windows,
                            scheme=base.scheme, ignore=base.block_ignore(), device=a.dev, offload_dir=a.offload_dir)
    result = layer_sensitivity(cfg)
    pick = result.pick(a.budget)
    print(result.table())
    print(f"budget {a.budget}: keep layers {pick} in BF16")
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sensitivity.json", json.dumps({**result.to_json(), "budget": a.budget, "pick": pick},
                                                          indent=2) + "\n")
    note = (f"Written by scripts/sensitivity.py from {base.path}: the {a.budget} layers whose RTN quantization\n"
            f"alone moves the output most (KL vs float on {result.tokens} tokens of {a.dataset}) stay in BF16.\n"
            "Ranking (layer: KL): " + ", ".join(f"{s.layer}: {s.kl:.4g}" for s in result.ranking()[:8]))
    text = recipe_yaml(base, pick, note)
    parse_recipe(text, str(out / "recipe.yaml"))  # what is written reads back
    atomic_write_text(out / "recipe.yaml", text)
    if write_plot(result, out / "sensitivity.png", pick):
        log.info("wrote %s", out / "sensitivity.png")
    log.info("wrote %s and %s", out / "sensitivity.json", out / "recipe.yaml")
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    return run_main(lambda: _run(parse_args(argv)), log)


if __name__ == "__main__":
    sys.exit(main())
