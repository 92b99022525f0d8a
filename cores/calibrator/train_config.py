"""The settings of a training run (``main.py``): :class:`TrainConfig` and the defaults it falls back on."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..quantization import DEFAULT_IGNORE, QuantScheme, SchemeOverride, TargetSchemes, get_scheme
from .fit import FitOptions
from .params import TRAIN_MODES


DEFAULT_LWC_LR = {4: 1e-2, 8: 2e-3}
"""Weight-clip learning rate by weight bits (why: ``docs/defaults.md``)."""


DEFAULT_LAC_LR = {"static": 1e-2, "dynamic": 2e-3}
"""Activation / KV clip learning rate by activation mode (why: ``docs/defaults.md``)."""


DEFAULT_ROUND_LR = 5e-3
"""Adam learning rate of the rounding offsets (in [-0.5, 0.5]); signed steps default to SignRound's
``1 / steps`` instead (:class:`~.fit.FitOptions`)."""

DEFAULT_ROUND_OPTIMIZER = {4: "sign", 8: "adam"}
"""Rounding-offset update by weight bits: signed steps keep no optimizer state and learned better at W4;
W8 keeps the Adam its measured numbers were trained with (why: ``docs/defaults.md``)."""

DEFAULT_SMOOTH_LR = 5e-3
"""Adam learning rate of the log smoothing scales."""

SMOOTH_ALPHAS = (0.5, 0.7, 0.85)
"""SmoothQuant migration strengths the initial smoothing search tries besides identity."""

LOSSES = ("norm_mse", "mse")

ROUND_OPTIMIZERS = ("adam", "sign")

TRAIN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""Compute dtypes of training by name. ``float32``: every forward in fp32 (the default). ``bfloat16``: the hidden
states, norms, attention and unquantized layers in bf16 (less activation memory; meant for GPUs, on a CPU it runs
about 10 % slower); quantized linears, the quantizers' learned tensors and the loss stay fp32. Not ``float16``
(massive activations overflow it) nor ``auto`` (a param dir's values would then depend on the device it was
trained on)."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one ``main.py`` run.

    Attributes:
        model: FP model folder (bf16 or FP8).
        data_dir: calibration dump from ``extract_calib_data.py``.
        output_dir: param dir.
        scheme: ``w8a8c16``, ``w8a8c8``, ``w4a8c16`` or ``w4a8c8``.
        act: ``dynamic`` (per-token, the default: what vLLM's int8 kernels run, and far better than a
            per-tensor scale on models with massive activations) or ``static`` (per-tensor input scale,
            searched then learned clip; NPU engines).
        kv_format: ``int8`` or ``fp8`` for C8 schemes.
        act_format: ``int8`` activation codes, or ``fp8`` (dynamic, int4 weights).
        act_zero_point: static int8 activations with a zero point (asymmetric ``[min, max]`` ranges).
        group_size: W4 group size (default 128).
        lwc: learn weight clipping.
        lac: learn clipping of static activation / KV scales.
        rounding: learn a rounding offset per weight (SignRound-style), jointly with the clips.
        smooth: learned smoothing (equivalent transformations) between each norm and the linears
            reading it, ``v_proj`` -> ``o_proj`` and ``up_proj`` -> ``down_proj``, initialised by a
            SmoothQuant search over :data:`SMOOTH_ALPHAS` (identity included) and folded into the
            checkpoint at deploy; None: on in block mode, off in the sub-block modes (it needs the
            whole block).
        smooth_lr: learning rate of the log smoothing scales; None: :data:`DEFAULT_SMOOTH_LR`.
        loss: ``norm_mse``: the block output's MSE after the norm that reads it next (the next
            block's input norm, or the final norm); ``mse``: on the raw residual stream.
        epochs: passes over the calibration samples.
        lr: AdamW learning rate of the activation / KV clipping logits (LAC); None:
            1e-2 with static activations, 2e-3 with dynamic ones (:data:`DEFAULT_LAC_LR`).
        lwc_lr: learning rate of the weight clipping logits (LWC); None: 1e-2 for
            4-bit weights, 2e-3 for 8-bit (:data:`DEFAULT_LWC_LR`).
        round_lr: learning rate of the rounding offsets; None: ``1 / steps`` with signed steps,
            :data:`DEFAULT_ROUND_LR` with Adam.
        round_optimizer: ``adam`` (the offsets in AdamW) or ``sign`` (SignRound's signed gradient
            descent: no optimizer state, 8 bytes per weight less); None: by weight bits
            (:data:`DEFAULT_ROUND_OPTIMIZER`).
        weight_decay: AdamW weight decay.
        batch_size: samples per step.
        start_block_idx: first block to train.
        end_block_idx: one past the last block (None: to the end).
        train_mode: ``block`` (the whole block jointly), ``mla`` (the attention
            sub-block and its KV cache) or ``moe`` (the MLP sub-block, expert by expert).
        min_expert_tokens: routed experts with fewer calibration tokens keep RTN weights.
        rtn: write round-to-nearest params, no training.
        sequential: feed each block the output of the quantized blocks before it.
        device: ``cpu`` or ``cuda:N``.
        dtype: compute dtype, ``float32`` or ``bfloat16`` (:data:`TRAIN_DTYPES`).
        seed: shuffling seed.
        ignore: module patterns kept in high precision.
        overrides: per-target schemes on full module names (a recipe's ``overrides``), each deployed as a
            config group of its own; the KV cache stays the scheme's.
    """

    model: str
    data_dir: str
    output_dir: str
    scheme: str = "w8a8c8"
    act: str = "dynamic"
    kv_format: str = "fp8"
    act_format: str = "int8"
    act_zero_point: bool = False
    group_size: int | None = None
    lwc: bool = True
    lac: bool = True
    rounding: bool = True
    smooth: bool | None = None
    smooth_lr: float | None = None
    loss: str = "norm_mse"
    epochs: int = 5
    lr: float | None = None
    lwc_lr: float | None = None
    round_lr: float | None = None
    round_optimizer: str | None = None
    weight_decay: float = 0.0
    batch_size: int = 1
    start_block_idx: int = 0
    end_block_idx: int | None = None
    train_mode: str = "block"
    min_expert_tokens: int = 32
    rtn: bool = False
    sequential: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    ignore: tuple[str, ...] = field(default=DEFAULT_IGNORE)
    overrides: tuple[SchemeOverride, ...] = ()

    def __post_init__(self):
        if self.train_mode not in TRAIN_MODES:
            raise ValueError(f"train_mode {self.train_mode!r}: choose one of {', '.join(TRAIN_MODES)}")
        if self.smooth and self.train_mode != "block":
            raise ValueError(f"--smooth folds scales across a whole block; with --train_mode {self.train_mode} "
                             "pass --no-smooth")
        if self.sequential and self.train_mode != "block":
            raise ValueError("--sequential feeds whole quantized blocks forward; it needs --train_mode block")
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if self.dtype not in TRAIN_DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: training computes in float32 (the default) or bfloat16, "
                             "whatever the device; choose one of them")
        if self.round_optimizer is not None and self.round_optimizer not in ROUND_OPTIMIZERS:
            raise ValueError(f"round_optimizer {self.round_optimizer!r}: choose one of {', '.join(ROUND_OPTIMIZERS)}")
        rates = [r for r in (self.lr, self.lwc_lr, self.round_lr, self.smooth_lr) if r is not None]
        if self.epochs < 0 or any(r <= 0 for r in rates) or self.batch_size < 1:
            raise ValueError(f"need epochs >= 0, lr > 0, lwc_lr > 0, batch_size >= 1 (got {self.epochs}, {self.lr}, "
                             f"{self.lwc_lr}, {self.batch_size})")
        if self.start_block_idx < 0 or (self.end_block_idx is not None and self.end_block_idx <= self.start_block_idx):
            raise ValueError(f"empty block range [--start_block_idx {self.start_block_idx}, "
                             f"--end_block_idx {self.end_block_idx})")
        self.target_schemes  # validate early

    @property
    def quant_scheme(self) -> QuantScheme:
        """The scheme these settings ask for (validated)."""
        return get_scheme(self.scheme, act_mode=self.act, kv_format=self.kv_format, group_size=self.group_size,
                          act_format=self.act_format, act_symmetric=not self.act_zero_point)

    @property
    def target_schemes(self) -> TargetSchemes | None:
        """The scheme with the overrides (None: no overrides, one scheme for every linear)."""
        return TargetSchemes(self.quant_scheme, tuple(self.overrides)) if self.overrides else None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The torch dtype of :attr:`dtype`."""
        return TRAIN_DTYPES[self.dtype]

    @property
    def fit_options(self) -> FitOptions:
        """How each block (or sub-block) learns: the rates, steps and searches these settings ask for."""
        w_bits = self.quant_scheme.w_bits
        return FitOptions(0 if self.rtn else self.epochs, self.lr or DEFAULT_LAC_LR[self.act], self.weight_decay,
                          self.batch_size, self.seed, self.lwc_lr or DEFAULT_LWC_LR[w_bits],
                          self.round_lr or (None if self.rounding_update == "sign" else DEFAULT_ROUND_LR),
                          self.rounding_update, SMOOTH_ALPHAS if self.learn_smooth else (),
                          self.smooth_lr or DEFAULT_SMOOTH_LR, clip_search=self.lac and not self.rtn)

    @property
    def rounding_update(self) -> str:
        """``adam`` or ``sign``: the asked-for update of the rounding offsets, else the default for the bits."""
        return self.round_optimizer or DEFAULT_ROUND_OPTIMIZER[self.quant_scheme.w_bits]

    @property
    def learn_rounding(self) -> bool:
        """Rounding offsets are learned (and stored): asked for, and there is training."""
        return self.rounding and not self.rtn and self.epochs > 0

    @property
    def learn_smooth(self) -> bool:
        """Smoothing scales are searched (and learned when there are epochs): asked for, and not RTN."""
        return (self.train_mode == "block" if self.smooth is None else self.smooth) and not self.rtn
