"""The one-command flow: dump -> train -> deploy -> (mix BF16 layers) -> eval, driven by a recipe.

Every stage is one call of the function behind its own command
(:func:`~cores.calibrator.extract.extract_calibration`,
:func:`~cores.calibrator.jobs.run_training_jobs`, :func:`~cores.deploy.deploy`,
:func:`~cores.recipes.mixed.restore_bf16_layers`,
:func:`~cores.eval.perplexity.evaluate_ppl`), each of which resumes on its own:
a finished dump, param block, deploy or mix is found and skipped, and a folder
made with other settings is refused. An evaluation is skipped when its JSON holds
a result of the same model and settings. With ``jobs > 1`` the blocks train in that
many processes at once (not with ``sequential`` training, whose blocks chain). An FP8
source trains sequentially unless its recipe says otherwise (:func:`flow_train_options`).
:func:`summary_table` formats what a run produced. Layout under ``save_path``::

    calib/        the calibration dump
    params/       the learned params
    deployed/     the compressed-tensors checkpoint
    recipe.yaml   the recipe the run used
    ppl_*.json    perplexities (bf16 source, deployed, mixed)
    flow.json     the config and what :func:`run_flow` returned

and the mixed-precision checkpoint at ``mix_path`` (``save_path/mixed`` by default)
when the recipe keeps layers in BF16.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..quantization import TargetSchemes
from .schema import Recipe, RecipeError, check_against_model, load_recipe
from .select import builtin_path, recipe_name_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlowConfig:
    """Settings of one flow.

    Attributes:
        model_path: FP model folder.
        save_path: Folder for every stage's output.
        model_name: Hugging Face id, to pick the built-in recipe (else ``config.json`` picks it).
        recipe: Recipe file (default: the built-in one for the model).
        mix_path: Where to write the mixed-precision checkpoint (default ``save_path/mixed``).
        calib_dataset: Calibration text.
        eval_dataset: Evaluation text (None: no evaluation).
        n_samples: Calibration windows.
        seq_len: Calibration window length.
        eval_seq_len: Evaluation window length.
        eval_windows: Evaluation windows (None: all).
        eval_bf16: Also evaluate the source model.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        jobs: Training processes, each taking every ``jobs``-th block (on ``cuda`` job ``i`` uses
            ``cuda:{i % device_count}``; on ``cpu`` each gets ``cpu_count // jobs`` threads).
    """

    model_path: str
    save_path: str
    model_name: str | None = None
    recipe: str | None = None
    mix_path: str | None = None
    calib_dataset: str = "wikitext2"
    eval_dataset: str | None = None
    n_samples: int = 128
    seq_len: int = 2048
    eval_seq_len: int = 2048
    eval_windows: int | None = None
    eval_bf16: bool = True
    device: str = "cpu"
    jobs: int = 1

    def __post_init__(self):
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1:
            raise ValueError(f"jobs must be an integer of at least 1, got {self.jobs!r}")


def resolve_recipe(cfg: FlowConfig) -> Recipe:
    """The recipe of a flow, checked against its model.

    Raises:
        RecipeError: When none fits, it does not match the model, or its BF16 layers cannot be mixed into its
            scheme as trained.
    """
    return _resolve(cfg)[0]


def _resolve(cfg: FlowConfig) -> tuple[Recipe, dict]:
    """:func:`resolve_recipe` and the ``main.py`` options the flow trains with (:func:`flow_train_options`)."""
    from ..models.streaming import StreamingModel

    model = StreamingModel(cfg.model_path)
    if model.deployed:
        raise RecipeError(f"{cfg.model_path} is a deployed checkpoint: the flow starts from the FP model")
    path = Path(cfg.recipe) if cfg.recipe else builtin_path(recipe_name_for(cfg.model_name, model.reader.config))
    recipe = _checked(load_recipe(path), model)
    if recipe.bf16_layers and recipe.quant_scheme().kv_bits is not None and recipe.training.get("smooth", None) \
            is not False and not recipe.training.get("rtn", False):
        raise RecipeError(f"{recipe.bf16_where[recipe.bf16_layers[0]]}: bf16_layers with an 8-bit KV cache need "
                          "training without learned smoothing (its v_scale is calibrated on smoothed values): "
                          "add 'smooth: false' under training, or use a c16 scheme")
    if cfg.mix_path and not recipe.bf16_layers:
        raise RecipeError(f"{path}: --mix_path given but the recipe keeps no bf16_layers")
    fp8 = model.reader.is_fp8
    options = flow_train_options(recipe, fp8)
    if cfg.jobs > 1 and options.get("sequential", False):
        if "sequential" in recipe.training:
            raise RecipeError(f"{path}: training.sequential feeds each block the outputs of the quantized blocks "
                              f"before it, so its blocks cannot train in --jobs {cfg.jobs} parallel jobs; use --jobs "
                              "1, or drop sequential")
        raise RecipeError(f"{cfg.model_path} is an FP8 checkpoint, which the flow trains sequentially (each block "
                          "on the outputs of the quantized blocks before it: the more precise path), so its blocks "
                          f"cannot train in --jobs {cfg.jobs} parallel jobs; use --jobs 1, or put 'sequential: "
                          f"false' under training in {path} to train the blocks independently")
    if fp8 and options.get("sequential") and "sequential" not in recipe.training:
        log.info("flow: %s is an FP8 checkpoint: training sequentially, the more precise path ('sequential: false' "
                 "under training in the recipe trains the blocks independently)", cfg.model_path)
    return recipe, options


def flow_train_options(recipe: Recipe, fp8_source: bool) -> dict:
    """The ``main.py`` options the flow trains a recipe with: :meth:`Recipe.train_options`, and for an FP8 source
    ``sequential`` training unless the recipe says otherwise.

    An FP8 checkpoint was quantized once already, so requantizing it adds a second error on top of the first
    in every block; sequential training (each block learns on the outputs of the quantized blocks before it)
    compensates what accumulates, and cut the W4A8 error from +6.41 % to +4.36 % on SmolLM2 (README). It
    applies where the recipe learns whole blocks (not ``rtn``, ``train_mode`` block) and does not set
    ``sequential`` itself.
    """
    options = recipe.train_options()
    if fp8_source and "sequential" not in recipe.training and not options.get("rtn", False) \
            and options.get("train_mode", "block") == "block":
        options["sequential"] = True
    return options


def training_recipe(path: str | Path, model_path: str) -> Recipe:
    """The recipe of ``main.py --recipe``: read and checked against the model (layers in range, targets that
    match, overrides every block can take).

    Raises:
        RecipeError: Naming the file and line.
    """
    from ..models.streaming import StreamingModel

    return _checked(load_recipe(path), StreamingModel(model_path))


def _checked(recipe: Recipe, model) -> Recipe:
    check_against_model(recipe, model.config, model.family)
    if recipe.overrides:
        _check_overrides(recipe, model)
    return recipe


def _check_overrides(recipe: Recipe, model) -> None:
    """Build every block's linears on meta with the recipe's per-target schemes, so that a fused group split
    between schemes (q/k/v, gate/up) or a group size that does not fit is refused before anything runs.

    Raises:
        RecipeError: Naming the first override's line and the problem.
    """
    import torch

    from ..quantization.block import quantize_block

    targets = TargetSchemes(recipe.quant_scheme(), recipe.override_schemes())
    for idx in range(model.num_blocks):
        with torch.device("meta"):
            block = model.family.build_block(model.config, idx)
            try:
                quantize_block(block, targets.default, recipe.block_ignore(), False, False, targets=targets,
                               prefix=model.family.block_prefix(idx))
            except ValueError as err:
                raise RecipeError(f"{recipe.overrides[0].where}: overrides: {err}") from None


def _eval(model: str, out: Path, cfg: FlowConfig) -> float:
    from ..eval.perplexity import PplConfig, evaluate_ppl
    from ..utils.io import atomic_write_text

    ppl_cfg = PplConfig(model=model, dataset=cfg.eval_dataset, seq_len=cfg.eval_seq_len, device=cfg.device,
                        max_windows=cfg.eval_windows)
    if out.is_file():
        old = json.loads(out.read_text())
        if old.get("model") == model and old.get("dataset") == str(cfg.eval_dataset) \
                and old.get("seq_len") == cfg.eval_seq_len and old.get("max_windows") == cfg.eval_windows:
            log.info("eval: %s done already (ppl %.4f)", out, old["ppl"])
            return old["ppl"]
    result = evaluate_ppl(ppl_cfg)
    atomic_write_text(out, json.dumps(asdict(result) | {"max_windows": cfg.eval_windows}, indent=2) + "\n")
    log.info("eval: %s ppl %.4f", model, result.ppl)
    return result.ppl


def run_flow(cfg: FlowConfig) -> dict:
    """Run (or resume) every stage.

    Returns:
        What each stage produced: paths (``calib``, ``params``, ``deployed``, ``mixed``), result lines (``dump``,
        ``train``, ``deploy``, ``mix``), perplexities by checkpoint (``ppl``) and wall seconds by stage
        (``seconds``); also written to ``save_path/flow.json`` with the config.

    Raises:
        TrainJobError: when a parallel training job failed (its finished blocks are kept).
    """
    from ..calibrator.extract import ExtractConfig, extract_calibration
    from ..calibrator.jobs import run_training_jobs
    from ..calibrator.trainer import TrainConfig, summarize
    from ..deploy import DeployConfig, deploy
    from ..utils.io import atomic_write_text
    from .mixed import restore_bf16_layers

    recipe, train_options = _resolve(cfg)
    save = Path(cfg.save_path)
    save.mkdir(parents=True, exist_ok=True)
    atomic_write_text(save / "recipe.yaml", Path(recipe.path).read_text())
    out: dict = {"recipe": recipe.path}
    seconds: dict[str, float] = {}
    log.info("flow: recipe %s (scheme %s, bf16 layers %s)", recipe.path, recipe.scheme, list(recipe.bf16_layers))
    calib = save / "calib"
    start = time.perf_counter()
    manifest = extract_calibration(ExtractConfig(model=cfg.model_path, output_dir=str(calib),
                                                 dataset=cfg.calib_dataset, n_samples=cfg.n_samples,
                                                 seq_len=cfg.seq_len, device=cfg.device))
    seconds["dump"] = time.perf_counter() - start
    out["calib"] = str(calib)
    out["dump"] = f"{manifest.n_samples} windows x {manifest.seq_len} tokens of {manifest.dataset}"
    params = save / "params"
    start = time.perf_counter()
    trained = run_training_jobs(TrainConfig(model=cfg.model_path, data_dir=str(calib), output_dir=str(params),
                                            device=cfg.device, **train_options), cfg.jobs)
    seconds["train"] = time.perf_counter() - start
    out["params"] = str(params)
    out["train"] = summarize(trained) + (f" ({cfg.jobs} jobs)" if cfg.jobs > 1 else "")
    deployed = save / "deployed"
    start = time.perf_counter()
    result = deploy(DeployConfig(cfg.model_path, str(deployed), recipe.scheme, param_dir=str(params)))
    seconds["deploy"] = time.perf_counter() - start
    out["deployed"] = str(deployed)
    out["deploy"] = result.line()
    checkpoints = {"deployed": str(deployed)}
    if recipe.bf16_layers:
        mixed = Path(cfg.mix_path) if cfg.mix_path else save / "mixed"
        start = time.perf_counter()
        mix = restore_bf16_layers(deployed, cfg.model_path, list(recipe.bf16_layers), mixed)
        seconds["mix"] = time.perf_counter() - start
        out["mixed"] = str(mixed)
        out["mix"] = mix.line()
        checkpoints["mixed"] = str(mixed)
    if cfg.eval_dataset:
        if cfg.eval_bf16:
            checkpoints = {"bf16": cfg.model_path, **checkpoints}
        out["ppl"] = {}
        for name, path in checkpoints.items():
            start = time.perf_counter()
            out["ppl"][name] = _eval(path, save / f"ppl_{name}.json", cfg)
            seconds[f"eval {name}"] = time.perf_counter() - start
    out["seconds"] = {stage: round(value, 3) for stage, value in seconds.items()}
    atomic_write_text(save / "flow.json", json.dumps({"config": asdict(cfg), **out}, indent=2) + "\n")
    return out


def summary_table(out: dict, save_path: str | Path | None = None) -> str:
    """A plain-text table of a flow's result (what :func:`run_flow` returns): one row per stage with what it
    wrote, its wall time and its result; one eval row per checkpoint, with the change against the bf16 source
    when that was evaluated.

    Args:
        out: :func:`run_flow`'s result.
        save_path: The flow's ``save_path``, to name the ``ppl_*.json`` files (None: the eval rows name none).
    """
    seconds = out.get("seconds", {})
    rows = [("stage", "output", "time", "result")]

    def add(stage: str, output: str, result: str) -> None:
        took = seconds.get(stage)
        lines = result.splitlines() or [""]
        rows.append((stage, output, "" if took is None else f"{took:.1f} s", lines[0]))
        rows.extend(("", "", "", line) for line in lines[1:])

    add("dump", out["calib"], out["dump"])
    add("train", out["params"], out["train"])
    add("deploy", out["deployed"], out["deploy"])
    if "mixed" in out:
        add("mix", out["mixed"], out["mix"])
    ppl = out.get("ppl", {})
    base = ppl.get("bf16")
    for name, value in ppl.items():
        change = f" ({(value / base - 1) * 100:+.2f} % vs bf16)" if base and name != "bf16" else ""
        add(f"eval {name}", str(Path(save_path) / f"ppl_{name}.json") if save_path is not None else "",
            f"ppl {value:.4f}{change}")
    widths = [max(len(row[col]) for row in rows) for col in range(3)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3]
                     for row in rows)
