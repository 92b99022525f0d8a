#!/usr/bin/env python
"""Perplexity of a model folder served by vLLM (CPU build), on the windows ``eval_ppl.py`` uses.

The serving-engine check of a deployed checkpoint: ``vllm.LLM`` loads the folder (bf16, or a
``compressed-tensors`` checkpoint from ``deploy.py``) with its own kernels, and every window is
sent as a token-id prompt with ``prompt_logprobs=0``, which returns, at each position after the
first, the log-probability of the token actually there. The windows (``cores.utils.data``:
``load_text`` + ``ppl_windows`` with the model's tokenizer) and the token average (all
``seq_len - 1`` predicted tokens of every window) are those of ``eval_ppl.py``, so the JSON files
compare directly.

The KV cache follows the checkpoint: ``kv_cache_dtype="fp8"`` when ``quantization_config`` has a
``kv_cache_scheme`` (vLLM then reads the ``k_scale`` / ``v_scale`` tensors), ``auto`` otherwise; vLLM
0.32 itself turns ``auto`` into ``fp8`` for a checkpoint with a KV scheme (``Attention.__init__``), and the
JSON records the dtype the engine ended up with (``kv_cache_dtype_used``). When vLLM refuses the
checkpoint, at load or at its first forward (a kernel without this dtype), the exact text of its error
is printed and stored under ``refused`` (``refused_stage``: load / forward) in the JSON, and the exit
code is 3. The JSON also lists, per layer, the quant method, compressed-tensors scheme and kernel
class vLLM picked (``layers``, counted in ``schemes``).

vLLM refuses a prompt as long as ``max_model_len`` for generation, so the engine gets ``seq_len + 1``.
Measured on vLLM's CPU build 0.32.0: W8A8 int8 runs on ``CPUInt8ScaledMMLinearKernel``, which on x86
with AMX (``torch.cpu._is_amx_tile_supported()``, K a multiple of 32, N of 16) takes the sgl kernel
``int8_scaled_mm_with_quant``, bfloat16 / float16 only: float32 is refused at the first forward ("expect
A to be bfloat16 or half"); without AMX it takes oneDNN, which runs float32 and bfloat16 (``layers`` /
``schemes`` name the path: ``sgl`` or ``onednn``). The sgl path ignores a static input scale: it passes
no ``input_scale`` to ``int8_scaled_mm_with_quant``, which quantizes the activations per token
(``vllm/model_executor/kernels/linear/scaled_mm/cpu.py``, ``_apply_weights_sgl``), so on AMX a static
W8A8 checkpoint is served as dynamic; when that happens a warning is printed and the JSON lists the
layers under ``ignored_static_input_scales``. ``--int8_kernel onednn`` switches the sgl path off (the
name ``check_cpu_sgl_kernel`` as that module imported it answers False, before the in-process engine
loads the model), and oneDNN applies the static scales. Its W4 kernel (``CPUWNA16LinearKernel``) runs
bfloat16 / float16 only and does not quantize activations; its fp8 KV-cache write rounds toward zero
(our C8 rounds to nearest), and int8 activation codes are ``round(x * (1 / scale))``.

Runs with the vLLM venv (``bash scripts/setup_vllm.sh``):

    .venv-vllm/bin/python scripts/check_serving.py --model outputs/serving/w8a8c8_dynamic_deployed \
        --dataset assets/corpus/eval.txt --seq_len 512 --max_windows 16 --output_json vllm.json
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXIT_REFUSED = 3

# In-process engine core: a refusal raises its own exception here (not "engine core initialization
# failed, see above"), and the model's modules can be inspected with LLM.apply_model.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the windows need a few MiB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder (float, or deployed compressed-tensors)")
    p.add_argument("--dataset", required=True, help="text file or folder, as eval_ppl.py takes it")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument("--seq_len", type=int, default=2048, help="window length in tokens (default: 2048)")
    p.add_argument("--max_windows", type=int, help="evaluate the first N windows (default: all)")
    p.add_argument("--output_json", help="write the result (or the refusal) here as JSON")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="vLLM compute dtype (default float32, the dtype of eval_ppl.py on CPU; W8A8 int8 on an AMX "
                        "CPU runs bfloat16 / float16 only)")
    p.add_argument("--kv_cache_dtype", default="follow",
                   help="follow (default: fp8 when the checkpoint has a kv_cache_scheme, else auto), or any "
                        "value vLLM takes (auto, fp8, fp8_e4m3, fp8_e5m2; a 16-bit cache of another dtype than "
                        "--dtype, e.g. bfloat16 under float32, computed garbage on vLLM 0.32 CPU)")
    p.add_argument("--batch_windows", type=int, default=4, help="windows per generate call (default 4)")
    p.add_argument("--int8_kernel", default="auto", choices=["auto", "onednn"],
                   help="auto (default: vLLM's choice, sgl on AMX, which ignores static input scales) or onednn "
                        "(the sgl path switched off: static input scales applied, float32 runs)")
    return p.parse_args(argv)


def quantization_config(model_dir: Path) -> dict | None:
    config = json.loads((model_dir / "config.json").read_text())
    return config.get("quantization_config")


def follow_kv_cache_dtype(qcfg: dict | None) -> str:
    """``fp8`` (e4m3, vLLM's CPU attention supports it on AVX-512 / AMX) for a checkpoint with a KV scheme."""
    if qcfg and qcfg.get("kv_cache_scheme"):
        return "fp8"
    return "auto"


def force_onednn_int8() -> None:
    """Make ``CPUInt8ScaledMMLinearKernel`` take oneDNN on every layer (vLLM 0.32 CPU).

    ``process_weights_after_loading`` takes the sgl kernel when ``check_cpu_sgl_kernel(N, K, dtype)`` holds,
    the name its module imported from ``vllm.model_executor.layers.utils``; only that binding is replaced,
    so the bf16 linears keep their own choice. It acts on this process only: the engine core must run here
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), and ``main`` checks afterwards that no int8 layer took sgl.
    """
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        raise RuntimeError("--int8_kernel onednn needs the in-process engine: VLLM_ENABLE_V1_MULTIPROCESSING=0")
    from vllm.model_executor.kernels.linear.scaled_mm import cpu

    if not hasattr(cpu, "check_cpu_sgl_kernel"):
        raise RuntimeError(f"{cpu.__name__} has no check_cpu_sgl_kernel: this vLLM picks its int8 path otherwise")
    cpu.check_cpu_sgl_kernel = lambda n, k, dtype: False


def describe_modules(model) -> dict:
    """Per linear layer: the compressed-tensors scheme vLLM picked and the kernel behind it."""
    layers = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "scheme", None)
        method = getattr(module, "quant_method", None)
        if scheme is None and method is None:
            continue
        entry = {"quant_method": type(method).__name__ if method is not None else None}
        if hasattr(module, "_k_scale_float"):  # an attention layer: what its cache holds, at which scales
            entry.update(kv_cache_dtype=getattr(module, "kv_cache_dtype", None), k_scale=module._k_scale_float,
                         v_scale=module._v_scale_float)
        if scheme is not None:
            entry["scheme"] = type(scheme).__name__
            kernel = getattr(scheme, "kernel", None)
            if kernel is not None:
                entry["kernel"] = type(kernel).__name__
                static = getattr(getattr(kernel, "config", None), "is_static_input_scheme", None)
                if static is not None:  # Int8ScaledMMLinearLayerConfig
                    entry["static_input"] = bool(static)
                path = getattr(getattr(kernel, "linear_method", None), "__name__", None)
                if path:  # CPUInt8ScaledMMLinearKernel: _apply_weights_sgl (AMX) or _apply_weights_onednn
                    entry["kernel_path"] = path.removeprefix("_apply_weights_")
        layers[name] = entry
    return layers


def summarize(layers: dict) -> dict:
    """How many layers run under each (quant_method, scheme, kernel)."""
    counts = collections.Counter(
        " / ".join(str(v) for v in (e.get("quant_method"), e.get("scheme"), e.get("kernel"), e.get("kernel_path"),
                                    e.get("kv_cache_dtype") and f"kv cache {e['kv_cache_dtype']}") if v)
        for e in layers.values())
    return dict(sorted(counts.items()))


def ignored_static_scales(layers: dict) -> list[str]:
    """The layers with a static input scale that vLLM runs on the sgl path, which quantizes per token."""
    return sorted(name for name, e in layers.items()
                  if isinstance(e, dict) and e.get("static_input") and e.get("kernel_path") == "sgl")


def write(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def sequence_nll(llm, params, rows: list[list[int]], batch: int, TokensPrompt) -> tuple[float, int]:
    """Sum of the NLL of every token after the first of each window, and the number of those tokens."""
    nll, tokens = 0.0, 0
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in chunk], params, use_tqdm=False)
        for ids, out in zip(chunk, outs):
            logprobs = out.prompt_logprobs
            if len(logprobs) != len(ids) or logprobs[0] is not None:
                raise RuntimeError(f"vLLM returned {len(logprobs)} prompt logprobs for {len(ids)} tokens")
            for pos in range(1, len(ids)):  # position 0 predicts nothing
                nll -= logprobs[pos][ids[pos]].logprob
                tokens += 1
    return nll, tokens


def refusal_text(err: BaseException) -> str:
    """The exception and the chain of its causes, as vLLM worded them."""
    text = f"{type(err).__name__}: {err}"
    cause, seen = err.__cause__ or err.__context__, {id(err)}
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        text += f"\n  caused by {type(cause).__name__}: {cause}"
        cause = cause.__cause__ or cause.__context__
    return text


def refuse(result: dict, err: BaseException, stage: str, start: float, output_json: str | None) -> int:
    text = refusal_text(err)
    print(traceback.format_exc(), file=sys.stderr)
    print(f"vLLM REFUSED {result['model']} ({stage}, dtype {result['dtype']}):\n{text}")
    result.update(refused=text, refused_stage=stage, seconds=time.perf_counter() - start)
    write(output_json, result)
    return EXIT_REFUSED


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import vllm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from cores.utils.data import load_text, ppl_windows

    model_dir = Path(args.model)
    qcfg = quantization_config(model_dir)
    kv_cache_dtype = follow_kv_cache_dtype(qcfg) if args.kv_cache_dtype == "follow" else args.kv_cache_dtype
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    windows = ppl_windows(tokenizer, load_text(args.dataset, args.split), args.seq_len, args.max_windows)
    result = {"model": str(model_dir), "dataset": args.dataset, "split": args.split, "seq_len": args.seq_len,
              "windows": int(windows.shape[0]), "backend": "vllm", "vllm_version": vllm.__version__,
              "torch_version": torch.__version__, "dtype": args.dtype, "kv_cache_dtype": kv_cache_dtype,
              "checkpoint_quant_method": (qcfg or {}).get("quant_method"),
              "checkpoint_format": (qcfg or {}).get("format"),
              "checkpoint_kv_cache_scheme": (qcfg or {}).get("kv_cache_scheme")}
    result["int8_kernel"] = args.int8_kernel
    if args.int8_kernel == "onednn":
        force_onednn_int8()
    start = time.perf_counter()
    try:
        # max_model_len: the window plus the one token generate() has to produce
        llm = LLM(model=str(model_dir), tokenizer=str(model_dir), dtype=args.dtype, kv_cache_dtype=kv_cache_dtype,
                  max_model_len=args.seq_len + 1, max_num_seqs=args.batch_windows,
                  max_num_batched_tokens=max(args.seq_len + 1, 2048), enforce_eager=True,
                  enable_prefix_caching=False, seed=0, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - any refusal of the engine is the result
        return refuse(result, err, "load", start, args.output_json)
    load_seconds = time.perf_counter() - start

    try:
        layers = llm.apply_model(describe_modules)[0]
    except Exception as err:  # noqa: BLE001 - introspection is a bonus, never the result
        layers = {"error": f"{type(err).__name__}: {err}"}
    model_config = llm.llm_engine.model_config
    result.update(
        quantization=getattr(model_config, "quantization", None),
        kv_cache_dtype_used=llm.llm_engine.vllm_config.cache_config.cache_dtype,
        served_dtype=str(getattr(model_config, "dtype", args.dtype)),
        schemes=summarize(layers) if "error" not in layers else layers,
        layers=layers)
    paths = sorted({e["kernel_path"] for e in layers.values() if isinstance(e, dict) and "kernel_path" in e})
    result["int8_kernel_paths"] = paths
    if args.int8_kernel == "onednn" and ("error" in layers or "sgl" in paths):
        raise RuntimeError(f"--int8_kernel onednn did not take effect: int8 kernel paths {paths or layers}")
    ignored = ignored_static_scales(layers)
    result["ignored_static_input_scales"] = ignored
    if ignored:
        print(f"WARNING: vLLM ignores the static input scales of {len(ignored)} int8 layers (e.g. {ignored[0]}): "
              "on this AMX CPU they run the sgl kernel int8_scaled_mm_with_quant, which quantizes activations "
              "per token (vllm/model_executor/kernels/linear/scaled_mm/cpu.py, _apply_weights_sgl); the ppl "
              "below is that of a dynamic checkpoint. --int8_kernel onednn applies the static scales.",
              file=sys.stderr, flush=True)

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    eval_start = time.perf_counter()
    try:
        nll, tokens = sequence_nll(llm, params, windows.tolist(), args.batch_windows, TokensPrompt)
    except Exception as err:  # noqa: BLE001 - a kernel that loads but cannot run this dtype is a refusal too
        return refuse(result, err, "forward", start, args.output_json)
    eval_seconds = time.perf_counter() - eval_start
    result.update(ppl=math.exp(nll / tokens), nll=nll / tokens, tokens=tokens, load_seconds=load_seconds,
                  eval_seconds=eval_seconds, seconds=time.perf_counter() - start,
                  tokens_per_s=tokens / eval_seconds)
    print(f"{model_dir}: vLLM ppl {result['ppl']:.4f} over {tokens} tokens in {result['windows']} windows "
          f"({args.dtype}, kv {result['kv_cache_dtype_used']}, int8 path {'/'.join(paths) or '-'}, "
          f"load {load_seconds:.1f} s, eval {eval_seconds:.1f} s)")
    if ignored:
        print(f"  WARNING: static input scales of {len(ignored)} layers ignored (sgl path): served as dynamic")
    for what, n in result["schemes"].items() if isinstance(result["schemes"], dict) else ():
        print(f"  {n:4d} x {what}")
    write(args.output_json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
