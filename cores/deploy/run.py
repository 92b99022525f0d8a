"""One deploy: options, the scheme and its params, export, verification, commit.

Without a param dir the weights are rounded to nearest (absmax per channel or
group) and activations are quantized dynamically per token: static input scales
and KV-cache scales must be calibrated, which ``main.py --rtn`` does in a minute
without training; deploy then takes its ``--param_dir``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..calibrator.params import open_params, smooth_dtype
from ..formats.compressed_tensors import quantization_config
from ..models.registry import UnsupportedModelError, get_family
from ..models.run import BlockTransform
from ..models.streaming import StreamingModel
from ..quantization import DEFAULT_IGNORE, QuantScheme, TargetSchemes, get_scheme, scheme_names, serving_notes
from ..quantization.block import quantize_block
from ..quantization.fp8_block import Fp8BlockConfig
from ..utils.checkpoint import SCALE_INV_SUFFIX, CheckpointReader, model_fingerprint
from ..utils.io import atomic_write_text, load_json
from .export import AS_STORED, Passthrough, export_units, plan_export
from .fp8 import bf16_config, export_bf16, fp8_weights, with_dtype
from .fp8_block import export_fp8, fp8_config, plan_fp8
from .fp8_stats import ActStats, check_dump, collect_act_stats, dump_identity
from .verify import BANDS, FP8_BANDS, fp8_recommendations, log_table, sample, summary
from .writer import REPORT_NAME, DeployError, StagedOutput, parse_size

log = logging.getLogger(__name__)

BF16 = "bfloat16"
FP8 = "fp8"
_FP8_OPTIONS = ("fp8_mode", "fp8_k", "fp8_percentile", "fp8_grid", "calib_dir")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
"""``--dtype`` choices besides ``auto`` (as stored)."""


def quant_types() -> list[str]:
    """Every ``--quant_type``: ``bfloat16``, the registered schemes and ``fp8`` (last, so that the schemes' list
    reads as before)."""
    return [BF16, *scheme_names(), FP8]


@dataclass(frozen=True)
class DeployConfig:
    """Settings of one ``deploy.py`` run.

    Attributes:
        input_weight_path: FP model folder (bf16 or FP8).
        output_weight_path: Folder to create.
        quant_type: ``bfloat16`` or a scheme name (``w8a8c8`` ...).
        param_dir: Learned params from ``main.py``; None deploys round-to-nearest.
        mla_param_path: ``--train_mode mla`` params kept in a dir of their own (the seed's spelling).
        moe_param_path: ``--train_mode moe`` params kept in a dir of their own.
        act: ``static`` or ``dynamic``; with a param dir it must agree with it,
            without one it defaults to ``dynamic`` (static needs calibration).
        kv_format: ``int8`` or ``fp8`` for C8 schemes (checked against the param dir).
        act_format: ``int8`` or ``fp8`` activations (checked against the param dir; default int8).
        group_size: W4 group size (checked against the param dir).
        overwrite: Replace an existing output folder.
        verify_samples: Verify this many quantized tensors, drawn at random (None: all).
        max_shard_size: Output shard limit, e.g. ``5GB``.
        seed: Sampling seed of the verification.
        fp8_mode: ``fp8``: how tile scales are chosen (``max`` default, ``rms``, ``percentile``, ``mse``).
        fp8_k: ``fp8`` ``rms``: the clip in tile rms units.
        fp8_percentile: ``fp8`` ``percentile``: the clip as a percentile of ``|w|``.
        fp8_grid: ``fp8`` ``mse``: clip factors tried.
        calib_dir: ``fp8``: a calibration dump (``extract_calib_data.py``) whose activation statistics weight
            the scales' error per input channel (activation-aware; not with ``max``).
        dtype: what the float tensors written unquantized (embeddings, norms, ``lm_head``, biases, routers,
            ignored linears; ``bfloat16``: the dequantized weights too) are written in, and the dtype
            ``config.json`` declares: ``auto`` (as stored; bf16 for FP8 weights dequantized), ``bfloat16``,
            ``float16`` or ``float32``. Scales, and the tensors a family keeps in fp32 (DeepSeek's router
            bias), are written as stored.
    """

    input_weight_path: str
    output_weight_path: str
    quant_type: str
    param_dir: str | None = None
    mla_param_path: str | None = None
    moe_param_path: str | None = None
    act: str | None = None
    kv_format: str | None = None
    act_format: str | None = None
    group_size: int | None = None
    overwrite: bool = False
    verify_samples: int | None = None
    max_shard_size: str = "5GB"
    seed: int = 0
    fp8_mode: str | None = None
    fp8_k: float | None = None
    fp8_percentile: float | None = None
    fp8_grid: int | None = None
    calib_dir: str | None = None
    dtype: str = "auto"

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise DeployError(f"unknown dtype {self.dtype!r}; valid: auto, {', '.join(DTYPES)}")
        if self.quant_type not in quant_types():
            raise DeployError(f"unknown quant_type {self.quant_type!r}; valid: {', '.join(quant_types())}")
        fp8_given = [k for k in _FP8_OPTIONS if getattr(self, k) is not None]
        if self.quant_type != FP8 and fp8_given:
            raise DeployError(f"{', '.join('--' + k for k in fp8_given)} only apply to --quant_type fp8, "
                              f"not {self.quant_type}")
        if self.quant_type == FP8:
            given = [k for k in ("param_dir", "mla_param_path", "moe_param_path", "act", "kv_format", "act_format",
                                 "group_size") if getattr(self, k) is not None]
            if given:
                raise DeployError(f"fp8 quantizes weights to e4m3 tiles (dynamic activations) and takes no "
                                  f"{', '.join(given)}; activation statistics come from --calib_dir")
            cfg = self.fp8_block_config()
            if self.calib_dir is not None and cfg.mode == "max":
                raise DeployError("--fp8_mode max has no clip to choose and takes no --calib_dir: use rms, "
                                  "percentile or mse with activation statistics")
        if self.quant_type == BF16:
            given = [k for k in ("param_dir", "mla_param_path", "moe_param_path", "act", "kv_format", "act_format",
                                 "group_size")
                     if getattr(self, k) is not None]
            if given:
                raise DeployError(f"bfloat16 dequantizes an FP8 checkpoint and takes no {', '.join(given)}")
        if self.verify_samples is not None and self.verify_samples < 1:
            raise DeployError(f"verify_samples must be positive, got {self.verify_samples}")
        if Path(self.input_weight_path).resolve() == Path(self.output_weight_path).resolve():
            raise DeployError("the output folder must differ from the input folder")
        parse_size(self.max_shard_size)

    def passthrough(self, reader: CheckpointReader) -> Passthrough:
        """The dtype of the tensors this deploy writes unquantized (:attr:`dtype`), for ``reader``'s model.

        Raises:
            UnsupportedModelError: for a ``--dtype`` on a model type we do not know (its fp32 tensors unknown).
        """
        if self.dtype == "auto":
            return AS_STORED
        return Passthrough(DTYPES[self.dtype], (SCALE_INV_SUFFIX, *get_family(reader.config.get("model_type"))
                                                .fp32_suffixes))

    def fp8_block_config(self) -> Fp8BlockConfig:
        """The tile-scale settings of an ``fp8`` deploy (defaults of :class:`Fp8BlockConfig` where not given).

        Raises:
            DeployError: On an unknown mode or a value out of range.
        """
        given = {"mode": self.fp8_mode, "k": self.fp8_k, "percentile": self.fp8_percentile, "grid": self.fp8_grid}
        try:
            return Fp8BlockConfig(**{k: v for k, v in given.items() if v is not None})
        except ValueError as err:
            raise DeployError(str(err)) from None


@dataclass(frozen=True)
class DeployResult:
    """What a deploy wrote.

    Attributes:
        output: The final folder.
        quant_type: ``bfloat16`` or the scheme name.
        shards: Number of safetensors files.
        input_bytes: Size of the source safetensors.
        output_bytes: Size of the written safetensors.
        seconds: Wall time.
        verify: The verification summary (:func:`cores.deploy.verify.summary`).
    """

    output: Path
    quant_type: str
    shards: int
    input_bytes: int
    output_bytes: int
    seconds: float
    verify: dict

    @classmethod
    def from_report(cls, out: Path, seconds: float) -> DeployResult:
        """The result of the deploy that wrote ``out``, from its report."""
        report = load_json(out / REPORT_NAME, DeployError, "Deploy again with --overwrite.")
        return cls(out, report["quant_type"], len(list(out.glob("*.safetensors"))), report["input_bytes"],
                   report["output_bytes"], seconds, report["summary"])

    def line(self) -> str:
        v = self.verify
        return (f"deployed {self.quant_type} to {self.output}: {self.shards} shard(s), "
                f"{_size(self.output_bytes)} from {_size(self.input_bytes)}, "
                f"verify {v['GOOD']} GOOD / {v['WARN']} WARN / {v['FAIL']} FAIL of {v['checked']} tensors, "
                f"{self.seconds:.1f} s")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def resolve_scheme(cfg: DeployConfig, model: StreamingModel
                   ) -> tuple[QuantScheme, list[str], BlockTransform, dict, TargetSchemes | None]:
    """The scheme, ignore patterns, quantizing transform, param identity and per-target schemes of a deploy.

    The transform is :meth:`ParamDir.block_transform`, the one the fake-quant
    evaluation uses, without the freeze: :func:`~cores.deploy.pack.iter_weight_qparams`
    quantizes each weight once from that state.

    Raises:
        DeployError: When the options contradict the param dir, or ask RTN for
            scales that need calibration.
        ParamDirError: When the params belong to another model or miss blocks.
    """
    params = open_params(cfg.param_dir, cfg.mla_param_path, cfg.moe_param_path)
    if params is None:
        act = cfg.act or "dynamic"
        scheme = get_scheme(cfg.quant_type, act_mode=act, kv_format=cfg.kv_format, group_size=cfg.group_size,
                            act_format=cfg.act_format)
        if act == "static" or scheme.kv_bits is not None:
            need = "static input scales" if act == "static" else "KV-cache scales"
            raise DeployError(
                f"{cfg.quant_type} with {act} activations needs calibrated {need}, which round-to-nearest deploy "
                f"cannot make: run `main.py --rtn --scheme {cfg.quant_type} --act {act} ...` (calibration only, "
                "no training) and pass its output as --param_dir")
        log.info("no --param_dir: round-to-nearest weights, dynamic per-token activations")

        def rtn(idx: int, block: nn.Module) -> nn.Module:
            return quantize_block(block, scheme, DEFAULT_IGNORE, lwc=False, lac=False)

        return scheme, list(DEFAULT_IGNORE), rtn, {}, None
    identity, scheme = params.identity(), params.scheme()
    asked = {"quant_type": (cfg.quant_type, scheme.name), "act": (cfg.act, scheme.act_mode),
             "kv_format": (cfg.kv_format, scheme.kv_format), "act_format": (cfg.act_format, scheme.act_format),
             "group_size": (cfg.group_size, scheme.group_size)}
    clash = [f"--{k} {mine} but the params are {theirs}" for k, (mine, theirs) in asked.items()
             if mine is not None and mine != theirs]
    if clash:
        raise DeployError(f"{', '.join(map(str, params.paths))} was trained as {scheme.name} (act "
                          f"{scheme.act_mode} {scheme.act_format}, kv {scheme.kv_format}, group {scheme.group_size}): "
                          f"{'; '.join(clash)}")
    params.check_model(model_fingerprint(model.reader))
    # refuses a param dir with blocks missing
    learned = params.block_transform(model.num_blocks, frozen=False, block_prefix=model.family.block_prefix)
    files = {f"{i}/{p.name}": [p.stat().st_size, p.stat().st_mtime_ns] for i, d in enumerate(params.paths)
             for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".")}
    return scheme, list(identity["ignore"]), learned, {"run": identity, "files": files}, params.target_schemes()


def _identity(cfg: DeployConfig, reader: CheckpointReader, extra: dict) -> dict:
    files = {f: (reader.model_dir / f).stat().st_size for f in sorted(set(reader.weight_map.values()))}
    opts = {k: v for k, v in asdict(cfg).items() if k not in ("output_weight_path", "overwrite", "input_weight_path",
                                                              "param_dir", "mla_param_path", "moe_param_path",
                                                              "calib_dir")}
    return {"deploy": opts, "source": {"fingerprint": model_fingerprint(reader), "files": files}, "params": extra}


def _safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def storage_dtype(reader: CheckpointReader) -> torch.dtype:
    """The dtype the 2-D weights are read in (bf16 for FP8), or fp32 when they differ.

    Blocks are loaded in it, so a bf16 weight is quantized straight from the
    memory-mapped shard, and no value is rounded before it is quantized.
    """
    dtypes = {dtype for key in reader.keys if key.endswith(".weight") and not key.endswith(SCALE_INV_SUFFIX)
              for dtype, shape in [reader.spec(key)] if len(shape) == 2 and dtype.is_floating_point}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _export(cfg: DeployConfig) -> tuple[StagedOutput, CheckpointReader, QuantScheme | None, list[str]]:
    """Write the shards, index and ``config.json`` into the staged folder.

    Returns:
        The staged folder, the source reader, the scheme (None for bfloat16) and
        the names of the tensors that could be verified (quantized linears, or
        dequantized FP8 weights).
    """
    source = Path(cfg.input_weight_path)
    if cfg.quant_type == BF16:
        reader = CheckpointReader(source)
        staged = StagedOutput(cfg.output_weight_path, _identity(cfg, reader, {}), cfg.overwrite)
        to_verify, scheme = fp8_weights(reader), None
        if staged.committed:
            return staged, reader, scheme, to_verify
        export_bf16(reader, staged, sample(to_verify, cfg.verify_samples, cfg.seed), cfg.passthrough(reader))
        config = bf16_config(reader.config, DTYPES.get(cfg.dtype, torch.bfloat16))
    elif cfg.quant_type == FP8:
        reader = CheckpointReader(source)
        layer_prefix = _layer_prefix(reader)
        plan = plan_fp8(reader, layer_prefix, cfg.fp8_block_config().block)
        to_verify, scheme = plan.converted, None
        calib = {}
        if cfg.calib_dir is not None:  # refused before anything is staged; its files identify the deploy
            check_dump(reader, cfg.calib_dir)
            calib = {"calib": dump_identity(cfg.calib_dir)}
        staged = StagedOutput(cfg.output_weight_path, _identity(cfg, reader, calib), cfg.overwrite)
        if staged.committed:
            return staged, reader, scheme, to_verify
        block_cfg = cfg.fp8_block_config()
        with tempfile.TemporaryDirectory(prefix="fp8-act-stats-") as tmp:
            stats = None
            if cfg.calib_dir is not None:
                collect_act_stats(source, cfg.calib_dir, Path(tmp))
                stats = ActStats(Path(tmp), layer_prefix)
            export_fp8(reader, staged, plan, block_cfg, stats, set(sample(to_verify, cfg.verify_samples, cfg.seed)),
                       cfg.passthrough(reader))
        config = fp8_config(reader.config, plan, block_cfg)
    else:
        reader = CheckpointReader(source)
        model = StreamingModel(source, device="cpu", dtype=storage_dtype(reader))
        if model.deployed:
            raise DeployError(f"{source} is already a compressed-tensors checkpoint; deploy from the FP model")
        scheme, ignore, transform, params, targets = resolve_scheme(cfg, model)
        plan = plan_export(model, scheme, ignore, transform, smooth=smooth_dtype(params.get("run", {})),
                           targets=targets, passthrough=cfg.passthrough(reader))
        to_verify = plan.quantized
        plan.check = set(sample(to_verify, cfg.verify_samples, cfg.seed))
        staged = StagedOutput(cfg.output_weight_path, _identity(cfg, model.reader, params), cfg.overwrite)
        if staged.committed:
            return staged, reader, scheme, to_verify
        export_units(plan.units, staged, parse_size(cfg.max_shard_size))
        config = {k: v for k, v in reader.config.items() if k != "quantization_config"}
        config["quantization_config"] = quantization_config(scheme, plan.kept, plan.schemes if targets else None)
    if cfg.dtype != "auto":
        config = with_dtype(config, DTYPES[cfg.dtype])
    atomic_write_text(staged.partial / "config.json", json.dumps(config, indent=2) + "\n")
    staged.copy_side_files(source)
    return staged, reader, scheme, to_verify


def _layer_prefix(reader: CheckpointReader) -> str:
    """The decoder layers' name prefix of the source's family (``model.layers.`` when it has none registered)."""
    try:
        return get_family(reader.config.get("model_type", "")).layer_prefix
    except UnsupportedModelError:
        return "model.layers."


def serving_warnings(scheme: QuantScheme | None, quantized: list[str]) -> list[str]:
    """What vLLM refuses or runs otherwise in a checkpoint of ``scheme`` whose quantized linears are ``quantized``
    (:func:`~cores.quantization.serving_notes`; routed experts are those under ``.mlp.experts.``, MLA attention
    the one with a ``kv_a_proj_with_mqa``)."""
    if scheme is None:
        return []
    return serving_notes(scheme, moe=any(".mlp.experts." in n for n in quantized),
                         mla=any(n.endswith(".kv_a_proj_with_mqa") for n in quantized))


def deploy(cfg: DeployConfig) -> DeployResult:
    """Run one deploy: export, verify, write the report, commit (see the module and :class:`DeployConfig`).

    Raises:
        DeployError, CheckpointError, ParamDirError, ValueError: With a message
            that says what to change; nothing is left under the output name.
    """
    start = time.perf_counter()
    staged, reader, scheme, to_verify = _export(cfg)
    if staged.committed:
        staged.finish_commit()
        log.info("%s is this deploy already (same inputs and settings): nothing to do", staged.out)
        return DeployResult.from_report(staged.out, time.perf_counter() - start)
    warnings = serving_warnings(scheme, to_verify)
    for warning in warnings:
        log.warning("%s", warning)
    written = CheckpointReader(staged.partial)
    checks = staged.checks()
    summ = summary(checks)
    log_table(summ, len(to_verify))
    if cfg.quant_type == FP8:
        summ["recommendations"] = fp8_recommendations(summ, cfg.fp8_block_config().mode, cfg.calib_dir is not None)
        for line in summ["recommendations"]:
            log.warning("fp8: %s", line)
    result = DeployResult(Path(cfg.output_weight_path), cfg.quant_type, len(staged.shard_files),
                          _safetensors_bytes(reader.model_dir), _safetensors_bytes(staged.partial),
                          time.perf_counter() - start, summ)
    report = {"quant_type": cfg.quant_type, "scheme": asdict(scheme) if scheme else None,
              "source": cfg.input_weight_path, "param_dirs": [
                  p for p in (cfg.param_dir, cfg.mla_param_path, cfg.moe_param_path) if p],
              "source_fingerprint": model_fingerprint(reader), "output_fingerprint": model_fingerprint(written),
              "input_bytes": result.input_bytes, "output_bytes": result.output_bytes,
              "seconds": round(result.seconds, 3),
              "bands": {f"int{bits}": {"GOOD": good, "WARN": warn} for bits, (good, warn) in BANDS.items()}
              | {"fp8": {"GOOD": FP8_BANDS[0], "WARN": FP8_BANDS[1]}, "bf16": "GOOD when all finite"},
              "fp8": {"calibration": cfg.fp8_block_config().describe(), "calib_dir": cfg.calib_dir}
              if cfg.quant_type == FP8 else None,
              "serving_warnings": warnings, "summary": summ, "tensors": [asdict(c) for c in checks],
              "identity": staged.identity, "files": staged.file_records()}
    atomic_write_text(staged.partial / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    staged.commit()
    if summ["FAIL"]:
        log.error("%d tensor(s) FAIL verification: see %s", summ["FAIL"], result.output / REPORT_NAME)
    return result
