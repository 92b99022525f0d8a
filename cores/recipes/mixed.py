"""Mixed precision: a deployed checkpoint with some decoder layers restored to BF16 from the source.

:func:`restore_bf16_layers` reads a compressed-tensors checkpoint written by ``deploy.py``
and writes a copy in which every tensor of the chosen layers is the source's (BF16;
an FP8 source is dequantized), their quantized tensors (``weight`` codes,
``weight_scale``, ``weight_packed``, ``weight_shape``, ``input_scale``) dropped, and
the full names of their linears added to ``quantization_config.ignore``, so that
vLLM, SGLang and our loader (:mod:`cores.models.deployed`) run them unquantized.

Whole layers are restored, norms included: a deploy with learned smoothing folds
scales into the norms and linears of a block, so a linear alone taken from the
source would not match its smoothed norm. An 8-bit KV cache is one scheme for
every layer (``kv_cache_scheme``): a restored layer keeps its ``k_scale`` /
``v_scale`` and its cache stays 8-bit. Those scales were calibrated on the smoothed
values when the deploy smoothed ``v_proj`` / ``o_proj``, so a C8 deploy with
smoothing is refused (the restored values would be cached with the wrong scale).

The output is written shard by shard into ``<out>.partial`` and renamed when
complete (:class:`~cores.deploy.writer.StagedOutput`); a rerun resumes from the
shards already written, and finds a finished output of the same inputs done.

CLI (``scripts/mix_bf16.py``)::

    python scripts/mix_bf16.py --deployed outputs/smollm2-w8a8 --source assets/smollm2-135m \
        --bf16_layers 28-29 --output outputs/smollm2-w8a8-mix
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..deploy.writer import REPORT_NAME, DeployError, StagedOutput, TensorSpec
from ..formats.compressed_tensors import WEIGHT_NAMES
from ..models.registry import get_family
from ..utils.checkpoint import SCALE_INV_SUFFIX, CheckpointReader, model_fingerprint
from ..utils.io import atomic_file, atomic_write_text, load_json
from .schema import format_layer_ranges

log = logging.getLogger(__name__)

MIX_REPORT = "mix_report.json"
_QUANT_SUFFIXES = tuple(sorted({"." + n for names in WEIGHT_NAMES.values() for n in names} | {".input_scale", ".input_zero_point"}))
_KV_SUFFIXES = (".k_scale", ".v_scale")


@dataclass(frozen=True)
class MixResult:
    """What a mixed-precision rewrite wrote.

    Attributes:
        output: The folder.
        layers: The layers restored to BF16.
        restored: Full names of the linears restored.
        deployed_bytes: Safetensors bytes of the deployed input.
        output_bytes: Safetensors bytes written.
        source_bytes: Safetensors bytes of the source.
    """

    output: Path
    layers: tuple[int, ...]
    restored: tuple[str, ...]
    deployed_bytes: int
    output_bytes: int
    source_bytes: int

    def line(self) -> str:
        mib = 2**20
        return (f"wrote {self.output}: layers {','.join(format_layer_ranges(self.layers))} in BF16 "
                f"({len(self.restored)} linears), {self.output_bytes / mib:.1f} MiB "
                f"(quantized {self.deployed_bytes / mib:.1f} MiB, source {self.source_bytes / mib:.1f} MiB)")


def _layer_of(key: str, layer_prefix: str) -> int | None:
    if not key.startswith(layer_prefix):
        return None
    idx = key[len(layer_prefix):].split(".", 1)[0]
    return int(idx) if idx.isdigit() else None


def _bytes(reader: CheckpointReader) -> int:
    return sum((reader.model_dir / f).stat().st_size for f in sorted(set(reader.weight_map.values())))


def _check_inputs(deployed: CheckpointReader, source: CheckpointReader, layers: list[int]) -> None:
    qcfg = deployed.config.get("quantization_config") or {}
    if qcfg.get("quant_method") != "compressed-tensors":
        raise DeployError(f"{deployed.model_dir} is not a compressed-tensors checkpoint: mix from a deploy.py output")
    report = load_json(deployed.model_dir / REPORT_NAME, DeployError, "Deploy the checkpoint again.")
    if report.get("source_fingerprint") not in (None, model_fingerprint(source)):
        raise DeployError(f"{deployed.model_dir} was not deployed from {source.model_dir} (its deploy_report.json "
                          "records another source): pass the folder it was deployed from as --source")
    run = ((report.get("identity") or {}).get("params") or {}).get("run") or {}
    if run.get("smooth") and qcfg.get("kv_cache_scheme") is not None:
        raise DeployError(f"{deployed.model_dir} was trained with learned smoothing and has an 8-bit KV cache: the "
                          "restored BF16 layers would be cached with scales calibrated on smoothed values. Train "
                          "with --no-smooth, or use a c16 scheme, to mix precisions")
    n = int(deployed.config.get("num_hidden_layers", 0))
    bad = [i for i in layers if i >= n]
    if bad:
        raise DeployError(f"layers {bad} are out of range: the model has {n} layers, 0 to {n - 1}")
    if not layers:
        raise DeployError("no layers to restore to BF16")


def restore_bf16_layers(deployed_dir: str | Path, source_dir: str | Path, layers: list[int], output_dir: str | Path,
                        overwrite: bool = False) -> MixResult:
    """Write ``deployed_dir`` with decoder ``layers`` restored to BF16 from ``source_dir`` (see the module).

    Args:
        deployed_dir: A compressed-tensors checkpoint from ``deploy.py``.
        source_dir: The FP model it was deployed from (bf16, or FP8: dequantized).
        layers: Decoder layer indices to keep in BF16.
        output_dir: The folder to write.
        overwrite: Replace an existing output made otherwise.

    Returns:
        What was written.

    Raises:
        DeployError: On inputs that do not belong together, layers out of range, or an existing output.
    """
    deployed, source = CheckpointReader(deployed_dir), CheckpointReader(source_dir)
    layers = sorted(set(layers))
    _check_inputs(deployed, source, layers)
    family = get_family(deployed.config["model_type"])
    prefix = family.layer_prefix
    chosen = set(layers)
    identity = {"mix": {"deployed": model_fingerprint(deployed), "source": model_fingerprint(source),
                        "layers": layers}}
    staged = StagedOutput(output_dir, identity, overwrite)
    out = Path(output_dir)
    source_keys = [k for k in source.keys if _layer_of(k, prefix) in chosen and not k.endswith(SCALE_INV_SUFFIX)]
    by_shard: dict[str, list[str]] = {}
    for key in deployed.keys:
        by_shard.setdefault(deployed.weight_map[key], []).append(key)
    # each source tensor goes to the shard that held the first tensor of its layer
    layer_shard = {}
    for key in deployed.keys:
        layer = _layer_of(key, prefix)
        if layer in chosen:
            layer_shard.setdefault(layer, deployed.weight_map[key])
    restored_linears = sorted(k.removesuffix(".weight") for k in source_keys
                              if k.endswith(".weight") and len(source.spec(k)[1]) == 2)
    if not staged.committed:
        done = set(staged.shards)
        for shard, keys in sorted(by_shard.items()):
            if shard in done:
                continue
            kept = [k for k in keys if _layer_of(k, prefix) not in chosen or k.endswith(_KV_SUFFIXES)]
            tensors = deployed.read(kept, dequantize=False)
            added = [k for k in source_keys if layer_shard.get(_layer_of(k, prefix)) == shard]
            for key, tensor in source.read(added).items():
                tensors[key] = tensor.to(torch.bfloat16) if tensor.dtype.itemsize == 1 else tensor
            with atomic_file(staged.partial / shard) as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
            staged.record_shard(shard, [TensorSpec.of(k, v) for k, v in tensors.items()], [])
            log.info("%s: %d tensors (%d restored from %s)", shard, len(tensors), len(added), source.model_dir)
            del tensors
        staged.write_index()
        config = json.loads(json.dumps(deployed.config))
        qcfg = config["quantization_config"]
        qcfg["ignore"] = sorted(set(qcfg.get("ignore") or ()) | set(restored_linears))
        restored = set(restored_linears)
        for key, group in list(qcfg.get("config_groups", {}).items()):  # groups that name their linears
            if group.get("targets") != ["Linear"]:
                group["targets"] = [t for t in group["targets"] if t not in restored]
                if not group["targets"]:
                    del qcfg["config_groups"][key]
        atomic_write_text(staged.partial / "config.json", json.dumps(config, indent=2) + "\n")
        staged.copy_side_files(deployed.model_dir)
        old = load_json(deployed.model_dir / REPORT_NAME, DeployError, "Deploy the checkpoint again.")
        written = CheckpointReader(staged.partial)
        mix = {"deployed": str(deployed.model_dir), "source": str(source.model_dir), "bf16_layers": layers,
               "restored_linears": restored_linears, "deployed_bytes": _bytes(deployed),
               "output_bytes": _bytes(written), "source_bytes": _bytes(source)}
        atomic_write_text(staged.partial / MIX_REPORT, json.dumps(mix, indent=2) + "\n")
        report = {**{k: old[k] for k in ("quant_type", "scheme", "source", "param_dirs", "source_fingerprint")
                     if k in old},
                  "output_fingerprint": model_fingerprint(written), "input_bytes": mix["source_bytes"],
                  "output_bytes": mix["output_bytes"], "summary": old.get("summary"), "mixed_precision": mix,
                  "identity": staged.identity, "files": staged.file_records()}
        atomic_write_text(staged.partial / REPORT_NAME, json.dumps(report, indent=2) + "\n")
        staged.commit()
    else:
        staged.finish_commit()
        log.info("%s is this mix already: nothing to do", out)
    mix = load_json(out / MIX_REPORT, DeployError, "Mix again with --overwrite.")
    return MixResult(out, tuple(layers), tuple(mix["restored_linears"]), mix["deployed_bytes"], mix["output_bytes"],
                     mix["source_bytes"])
