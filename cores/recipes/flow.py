"""The one-command flow: dump -> train -> deploy -> (mix BF16 layers) -> eval, driven by a recipe.

Every stage is one call of the function behind its own command
(:func:`~cores.calibrator.extract.extract_calibration`,
:func:`~cores.calibrator.trainer.run_training`, :func:`~cores.deploy.deploy`,
:func:`~cores.recipes.mixed.restore_bf16_layers`,
:func:`~cores.eval.perplexity.evaluate_ppl`), each of which resumes on its own:
a finished dump, param block, deploy or mix is found and skipped, and a folder
made with other settings is refused. An evaluation is skipped when its JSON holds
a result of the same model and settings. Layout under ``save_path``::

    calib/        the calibration dump
    params/       the learned params
    deployed/     the compressed-tensors checkpoint
    recipe.yaml   the recipe the run used
    ppl_*.json    perplexities (bf16 source, deployed, mixed)

and the mixed-precision checkpoint at ``mix_path`` (``save_path/mixed`` by default)
when the recipe keeps layers in BF16.
"""

from __future__ import annotations

import json
import logging
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
        device: ``cpu`` or ``cuda:N``.
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


def resolve_recipe(cfg: FlowConfig) -> Recipe:
    """The recipe of a flow, checked against its model.

    Raises:
        RecipeError: When none fits, it does not match the model, or its BF16 layers cannot be mixed into its
            scheme as trained.
    """
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
    return recipe


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
    """Run (or resume) every stage; returns what each produced (paths, perplexities)."""
    from ..calibrator.extract import ExtractConfig, extract_calibration
    from ..calibrator.trainer import TrainConfig, run_training
    from ..deploy import DeployConfig, deploy
    from ..utils.io import atomic_write_text
    from .mixed import restore_bf16_layers

    recipe = resolve_recipe(cfg)
    save = Path(cfg.save_path)
    save.mkdir(parents=True, exist_ok=True)
    atomic_write_text(save / "recipe.yaml", Path(recipe.path).read_text())
    out: dict = {"recipe": recipe.path}
    log.info("flow: recipe %s (scheme %s, bf16 layers %s)", recipe.path, recipe.scheme, list(recipe.bf16_layers))
    calib = save / "calib"
    extract_calibration(ExtractConfig(model=cfg.model_path, output_dir=str(calib), dataset=cfg.calib_dataset,
                                      n_samples=cfg.n_samples, seq_len=cfg.seq_len, device=cfg.device))
    out["calib"] = str(calib)
    params = save / "params"
    run_training(TrainConfig(model=cfg.model_path, data_dir=str(calib), output_dir=str(params), device=cfg.device,
                             **recipe.train_options()))
    out["params"] = str(params)
    deployed = save / "deployed"
    result = deploy(DeployConfig(cfg.model_path, str(deployed), recipe.scheme, param_dir=str(params)))
    out["deployed"] = str(deployed)
    out["deploy"] = result.line()
    checkpoints = {"deployed": str(deployed)}
    if recipe.bf16_layers:
        mixed = Path(cfg.mix_path) if cfg.mix_path else save / "mixed"
        mix = restore_bf16_layers(deployed, cfg.model_path, list(recipe.bf16_layers), mixed)
        out["mixed"] = str(mixed)
        out["mix"] = mix.line()
        checkpoints["mixed"] = str(mixed)
    if cfg.eval_dataset:
        if cfg.eval_bf16:
            checkpoints = {"bf16": cfg.model_path, **checkpoints}
        out["ppl"] = {name: _eval(path, save / f"ppl_{name}.json", cfg) for name, path in checkpoints.items()}
    atomic_write_text(save / "flow.json", json.dumps({"config": asdict(cfg), **out}, indent=2) + "\n")
    return out
