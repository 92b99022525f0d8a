"""Quantization recipes: a versioned YAML file, validated with errors that name the file and line.

A recipe says, for one model, what to quantize and how (``version: 1``)::

    version: 1
    scheme: w8a8c8            # a registered scheme (cores.quantization.scheme_names())
    options:                  # per-run choices of the scheme
      act: dynamic            # static | dynamic
      kv_format: fp8          # int8 | fp8 (C8 schemes)
      act_format: int8        # int8 | fp8
      group_size: 64          # W4 schemes
      act_zero_point: false   # true: static int8 activations with a zero point (asymmetric)
    ignore:                   # kept in high precision (compressed-tensors semantics):
      - lm_head               #   an exact module name,
      - 're:.*mlp\\.gate$'    #   "re:<regex>" matched (re.match) against the full module name,
      - Embedding             #   or a module class name
    overrides:                # targets -> another scheme / activation mode / W4 group size, each deployed
      - targets: ["re:.*down_proj$"]   # as a config group of its own
        act: static
      - targets: ['re:model\\.layers\\.2[0-9]\\.mlp\\..*']   # single quotes: backslashes as written
        scheme: w4a8c8
        group_size: 64
    bf16_layers: ["22", "28-29"]   # decoder layers kept whole in BF16 (mixed precision)
    training:                 # options of main.py (cores.calibrator.trainer.TrainConfig)
      epochs: 5

:func:`load_recipe` parses and validates the structure; :func:`check_against_model`
checks what depends on the model (layers in range, every target matches a module).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..quantization import SchemeOverride, TargetSchemes, get_scheme, scheme_names

RECIPE_VERSION = 1
BF16 = "bfloat16"
ACT_MODES = ("static", "dynamic")
_OPTION_KEYS = ("act", "kv_format", "act_format", "group_size", "act_zero_point")
_TOP_KEYS = ("version", "scheme", "options", "ignore", "overrides", "bf16_layers", "training")
_OVERRIDE_KEYS = ("targets", "scheme", "act", "group_size")
TRAINING_RESERVED = ("model", "data_dir", "output_dir", "device", "scheme", "ignore", "overrides", *_OPTION_KEYS)
"""``TrainConfig`` fields a recipe's ``training`` may not set: paths and the device come from the command
line, the scheme, its options and the ignore list from the recipe's own keys."""


class RecipeError(ValueError):
    """A recipe file is invalid; the message names the file and line."""


@dataclass(frozen=True)
class Where:
    """A place in a recipe file (1-based line)."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Target:
    """One ``ignore`` / override target: an exact module name, ``re:<regex>`` or a class name."""

    pattern: str
    where: Where

    @property
    def is_regex(self) -> bool:
        return self.pattern.startswith("re:")

    def matches(self, name: str, class_name: str = "") -> bool:
        """Whether the module ``name`` (full dotted name) of class ``class_name`` is targeted."""
        if self.is_regex:
            return re.match(self.pattern[3:], name) is not None
        return self.pattern == name or self.pattern == class_name


@dataclass(frozen=True)
class Override:
    """Targets quantized otherwise than the recipe's scheme.

    Attributes:
        targets: What it applies to.
        scheme: Another registered scheme, ``bfloat16`` (kept in high precision), or None (same scheme).
        act: Another activation mode, or None.
        group_size: The group size of a W4 override (None: the recipe's ``options.group_size`` when its scheme
            is W4 too, else 128).
        where: Its line.
    """

    targets: tuple[Target, ...]
    scheme: str | None
    act: str | None
    where: Where
    group_size: int | None = None


@dataclass(frozen=True)
class Recipe:
    """A validated recipe (see the module docstring).

    Attributes:
        path: The file it was read from (``<string>`` when parsed from text).
        scheme: Registered scheme name.
        options: ``act`` / ``kv_format`` / ``act_format`` / ``group_size`` as given.
        ignore: Targets kept in high precision.
        overrides: Per-target scheme / activation overrides.
        bf16_layers: Decoder layers kept whole in BF16, sorted.
        bf16_where: Line of each ``bf16_layers`` entry, by layer (for range errors).
        training: ``main.py`` options.
    """

    path: str
    scheme: str
    options: Mapping[str, Any] = field(default_factory=dict)
    ignore: tuple[Target, ...] = ()
    overrides: tuple[Override, ...] = ()
    bf16_layers: tuple[int, ...] = ()
    bf16_where: Mapping[int, Where] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)

    def quant_scheme(self):
        """The :class:`~cores.quantization.QuantScheme` of the scheme with its options."""
        o = self.options
        return get_scheme(self.scheme, act_mode=o.get("act"), kv_format=o.get("kv_format"),
                          group_size=o.get("group_size"), act_format=o.get("act_format"),
                          act_symmetric=not o.get("act_zero_point", False))

    def override_schemes(self) -> tuple[SchemeOverride, ...]:
        """The overrides as schemes: each takes the recipe's options, its own ``scheme`` and ``act`` replacing
        theirs (``group_size`` applies to a W4 override only; ``act_format`` fp8 to a dynamic W4 one;
        ``act_zero_point`` to a static one).

        Raises:
            RecipeError: Naming the line of an override whose scheme cannot take the options, or whose KV cache
                differs from the recipe's scheme (the KV cache is one scheme for the model).
        """
        base, out = self.quant_scheme(), []
        for o in self.overrides:
            patterns = tuple(t.pattern for t in o.targets)
            if o.scheme == BF16:
                out.append(SchemeOverride(patterns, None))
                continue
            name = o.scheme or self.scheme
            act = o.act or base.act_mode
            w4 = get_scheme(name).w_bits == 4
            fmt = base.act_format if w4 and act == "dynamic" else "int8"
            group = o.group_size or (self.options.get("group_size") if w4 and base.w_bits == 4 else None)
            try:
                scheme = get_scheme(name, act_mode=act, kv_format=base.kv_format, group_size=group, act_format=fmt,
                                    act_symmetric=base.act_symmetric or act != "static")
                TargetSchemes(base, (SchemeOverride(patterns, scheme),))
            except ValueError as err:
                raise RecipeError(f"{o.where}: override {name} act {act}: {err}") from None
            out.append(SchemeOverride(patterns, scheme))
        return tuple(out)

    def ignore_patterns(self) -> list[str]:
        """The ``ignore`` entries as written."""
        return [t.pattern for t in self.ignore]

    def block_ignore(self) -> tuple[str, ...]:
        """The ignore patterns that can name linears of a decoder block (for ``TrainConfig.ignore``).

        Training matches them as deploy does, on full module names (and on block-relative ones), so
        position-independent regexes (``re:.*<suffix>``) and entries naming one block's modules
        (``model.layers.3.mlp.down_proj``, ``re:model\\.layers\\.3\\..*``) carry over; names outside the
        blocks (``lm_head``, embeddings) and class names are dropped.
        """
        return tuple(t.pattern for t in self.ignore
                     if (t.is_regex and t.pattern.startswith("re:.*")) or re.search(r"layers(\\)?\.", t.pattern))

    def train_options(self) -> dict[str, Any]:
        """``TrainConfig`` fields from the recipe: scheme, options, block ignore list and ``training``."""
        overrides = {"overrides": self.override_schemes()} if self.overrides else {}
        return {"scheme": self.scheme, **self.options, "ignore": self.block_ignore(), **overrides, **self.training}


def parse_layer_ranges(items: Iterable[Any], where: Where | None = None) -> list[int]:
    """``["22", "28-29", 5]`` -> ``[5, 22, 28, 29]``.

    Raises:
        RecipeError: On an entry that is not ``N`` or ``A-B`` with ``A <= B`` (naming ``where``).
    """
    out: set[int] = set()
    for item in items:
        text = str(item).strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", text)
        if isinstance(item, bool) or m is None:
            raise RecipeError(f"{where or '<recipe>'}: layer range {item!r} must be 'N' or 'A-B' (e.g. '22', "
                              "'28-29')")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise RecipeError(f"{where or '<recipe>'}: layer range {item!r} is empty ({lo} > {hi})")
        out.update(range(lo, hi + 1))
    return sorted(out)


def format_layer_ranges(layers: Iterable[int]) -> list[str]:
    """``[5, 22, 28, 29]`` -> ``["5", "22", "28-29"]`` (the inverse of :func:`parse_layer_ranges`)."""
    out, run = [], []
    for layer in sorted(set(layers)):
        if run and layer == run[-1] + 1:
            run.append(layer)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [layer]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return out


# ---- parsing ---------------------------------------------------------------------------------------------------

def _where(file: str, node: yaml.Node) -> Where:
    return Where(file, node.start_mark.line + 1)


def _scalar(file: str, node: yaml.Node, what: str) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise RecipeError(f"{_where(file, node)}: {what} must be a single value, got a "
                          f"{'list' if isinstance(node, yaml.SequenceNode) else 'mapping'}")
    return yaml.safe_load(yaml.serialize(node))


def _mapping(file: str, node: yaml.Node, what: str,
             keys: Iterable[str] | None) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """``key -> (key node, value node)`` of a mapping node; unknown or repeated keys are refused."""
    if not isinstance(node, yaml.MappingNode):
        raise RecipeError(f"{_where(file, node)}: {what} must be a mapping of key: value")
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    valid = None if keys is None else tuple(keys)
    for key_node, value_node in node.value:
        key = _scalar(file, key_node, f"a key of {what}")
        if not isinstance(key, str):
            raise RecipeError(f"{_where(file, key_node)}: key {key!r} of {what} must be a string")
        if valid is not None and key not in valid:
            raise RecipeError(f"{_where(file, key_node)}: unknown key {key!r} in {what}; valid: {', '.join(valid)}")
        if key in out:
            raise RecipeError(f"{_where(file, key_node)}: {key!r} is given twice in {what}")
        out[key] = (key_node, value_node)
    return out


def _sequence(file: str, node: yaml.Node, what: str) -> list[yaml.Node]:
    if not isinstance(node, yaml.SequenceNode):
        raise RecipeError(f"{_where(file, node)}: {what} must be a list")
    return list(node.value)


def _targets(file: str, node: yaml.Node, what: str) -> tuple[Target, ...]:
    out = []
    for item in _sequence(file, node, what):
        pattern = _scalar(file, item, f"an entry of {what}")
        where = _where(file, item)
        if not isinstance(pattern, str) or not pattern:
            raise RecipeError(f"{where}: entry {pattern!r} of {what} must be a module name, 're:<regex>' or a "
                              "class name")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise RecipeError(f"{where}: bad regular expression {pattern[3:]!r} in {what}: {err}") from None
        out.append(Target(pattern, where))
    return tuple(out)


def _options(file: str, node: yaml.Node) -> dict[str, Any]:
    out = {}
    for key, (_, value_node) in _mapping(file, node, "options", _OPTION_KEYS).items():
        value = _scalar(file, value_node, f"options.{key}")
        where = _where(file, value_node)
        if key == "act" and value not in ACT_MODES:
            raise RecipeError(f"{where}: options.act {value!r} must be one of {', '.join(ACT_MODES)}")
        if key in ("kv_format", "act_format") and value not in ("int8", "fp8"):
            raise RecipeError(f"{where}: options.{key} {value!r} must be int8 or fp8")
        if key == "act_zero_point" and not isinstance(value, bool):
            raise RecipeError(f"{where}: options.act_zero_point {value!r} must be true or false")
        if key == "group_size" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RecipeError(f"{where}: options.group_size {value!r} must be a positive integer")
        out[key] = value
    return out


def _training(file: str, node: yaml.Node) -> dict[str, Any]:
    from ..calibrator.trainer import TrainConfig

    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in TRAINING_RESERVED]
    out = {}
    for key, (key_node, value_node) in _mapping(file, node, "training", None).items():
        if key in TRAINING_RESERVED:
            home = ("the command line" if key in ("model", "data_dir", "output_dir", "device")
                    else f"the recipe's top-level {key if key in ('scheme', 'ignore', 'overrides') else 'options'}")
            raise RecipeError(f"{_where(file, key_node)}: training.{key} is not set here; it comes from {home}")
        if key not in fields:
            raise RecipeError(f"{_where(file, key_node)}: unknown key {key!r} in training; valid: {', '.join(fields)}")
        out[key] = _scalar(file, value_node, f"training.{key}")
    return out


def _check_scheme(file: str, node: yaml.Node, what: str, allow_bf16: bool) -> str:
    name = _scalar(file, node, what)
    valid = [*scheme_names(), *([BF16] if allow_bf16 else [])]
    if name not in valid:
        raise RecipeError(f"{_where(file, node)}: {what} {name!r} is not a registered scheme; valid: "
                          f"{', '.join(valid)}")
    return name


def _overrides(file: str, node: yaml.Node) -> tuple[Override, ...]:
    out = []
    for item in _sequence(file, node, "overrides"):
        keys = _mapping(file, item, "an override", _OVERRIDE_KEYS)
        where = _where(file, item)
        if "targets" not in keys:
            raise RecipeError(f"{where}: an override needs targets")
        if "scheme" not in keys and "act" not in keys and "group_size" not in keys:
            raise RecipeError(f"{where}: an override needs a scheme, an act or a group_size to change")
        scheme = _check_scheme(file, keys["scheme"][1], "override scheme", True) if "scheme" in keys else None
        act = None
        if "act" in keys:
            act = _scalar(file, keys["act"][1], "override act")
            if act not in ACT_MODES:
                raise RecipeError(f"{_where(file, keys['act'][1])}: override act {act!r} must be one of "
                                  f"{', '.join(ACT_MODES)}")
            if scheme == BF16:
                raise RecipeError(f"{_where(file, keys['act'][1])}: a bfloat16 override has no activation mode")
        group = None
        if "group_size" in keys:
            group = _scalar(file, keys["group_size"][1], "override group_size")
            if scheme == BF16 or isinstance(group, bool) or not isinstance(group, int) or group < 1:
                raise RecipeError(f"{_where(file, keys['group_size'][1])}: override group_size {group!r} must be a "
                                  "positive integer, for a W4 scheme")
        out.append(Override(_targets(file, keys["targets"][1], "override targets"), scheme, act, where, group))
    return tuple(out)


def parse_recipe(text: str, file: str = "<string>") -> Recipe:
    """Parse and validate recipe text (structure, names, regexes; not the model: see :func:`check_against_model`).

    Raises:
        RecipeError: Naming ``file`` and the line of the first problem.
    """
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{file}{line}: not valid YAML: {getattr(err, 'problem', None) or err}") from None
    if root is None:
        raise RecipeError(f"{file}:1: empty recipe; it needs at least 'version: {RECIPE_VERSION}' and a scheme")
    keys = _mapping(file, root, "the recipe", _TOP_KEYS)
    if "version" not in keys:
        raise RecipeError(f"{file}:{root.start_mark.line + 1}: the recipe has no 'version'; this tool reads "
                          f"version {RECIPE_VERSION}")
    version = _scalar(file, keys["version"][1], "version")
    if version != RECIPE_VERSION:
        raise RecipeError(f"{_where(file, keys['version'][1])}: recipe version {version!r} is not supported; "
                          f"this tool reads version {RECIPE_VERSION}")
    if "scheme" not in keys:
        raise RecipeError(f"{file}:{root.start_mark.line + 1}: the recipe has no 'scheme'; valid: "
                          f"{', '.join(scheme_names())}")
    scheme = _check_scheme(file, keys["scheme"][1], "scheme", False)
    options = _options(file, keys["options"][1]) if "options" in keys else {}
    bf16, bf16_where = [], {}
    if "bf16_layers" in keys:
        for item in _sequence(file, keys["bf16_layers"][1], "bf16_layers"):
            where = _where(file, item)
            for layer in parse_layer_ranges([_scalar(file, item, "a bf16_layers entry")], where):
                bf16_where.setdefault(layer, where)
        bf16 = sorted(bf16_where)
    recipe = Recipe(
        path=file, scheme=scheme, options=options,
        ignore=_targets(file, keys["ignore"][1], "ignore") if "ignore" in keys else (),
        overrides=_overrides(file, keys["overrides"][1]) if "overrides" in keys else (),
        bf16_layers=tuple(bf16), bf16_where=bf16_where,
        training=_training(file, keys["training"][1]) if "training" in keys else {},
    )
    try:
        recipe.quant_scheme()
    except ValueError as err:
        line = keys["options"][0].start_mark.line + 1 if "options" in keys else keys["scheme"][0].start_mark.line + 1
        raise RecipeError(f"{file}:{line}: scheme {scheme} with options {options}: {err}") from None
    recipe.override_schemes()
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate the recipe file ``path`` (see :func:`parse_recipe`).

    Raises:
        RecipeError: When the file is missing or invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    return parse_recipe(path.read_text(), str(path))


# ---- checks against a model ------------------------------------------------------------------------------------

def model_modules(config, family) -> dict[str, str]:
    """Full module name -> class name of every module of the model of ``config`` (blocks built on meta).

    Top-level modules are named as their checkpoint keys are (``model.embed_tokens``, ``model.norm``,
    ``lm_head``); blocks under ``family.block_prefix(i)``.
    """
    import torch

    out = {family.embed_key.removesuffix(".weight"): "Embedding", family.norm_key.removesuffix(".weight"): "RMSNorm",
           family.lm_head_key.removesuffix(".weight"): "Linear"}
    for idx in range(config.num_hidden_layers):
        with torch.device("meta"):
            block = family.build_block(config, idx)
        prefix = family.block_prefix(idx)
        out[prefix.rstrip(".")] = type(block).__name__
        out.update({prefix + n: type(m).__name__ for n, m in block.named_modules() if n})
    return out


def check_against_model(recipe: Recipe, config, family) -> dict[str, str]:
    """Check what the recipe says about a model: layers in range, every target matching a module.

    Args:
        recipe: A parsed recipe.
        config: The model's ``transformers`` config.
        family: Its :class:`~cores.models.ModelFamily`.

    Returns:
        The model's modules (:func:`model_modules`).

    Raises:
        RecipeError: Naming the line of a layer out of range or a target that matches nothing.
    """
    n = config.num_hidden_layers
    for layer in recipe.bf16_layers:
        if layer >= n:
            raise RecipeError(f"{recipe.bf16_where[layer]}: bf16 layer {layer} is out of range: the model has "
                              f"{n} layers, 0 to {n - 1}")
    modules = model_modules(config, family)
    targets = [*recipe.ignore, *(t for o in recipe.overrides for t in o.targets)]
    for t in targets:
        if not any(t.matches(name, cls) for name, cls in modules.items()):
            raise RecipeError(f"{t.where}: target {t.pattern!r} matches no module of this {config.model_type} "
                              f"model (full names such as {family.block_prefix(0)}self_attn.o_proj, 're:' regexes "
                              "matched from the start of the name, or class names such as Linear)")
    return modules
