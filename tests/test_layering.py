"""The package layering of ``cores/``, checked from the source (AST, no imports run).

Layers, low to high; a module imports only modules of its own layer or below:

================  =====================================================================
quantization      ``cores.quantization``: math, quantizers, QuantLinear, schemes, and
                  :mod:`cores.quantization.block` (quantize a block, its learned state)
utils             ``cores.utils``: io, logging, config, checkpoint reader, text data, distributed
models            ``cores.models``: shared parts, families, registry
formats           ``cores.formats``: the deployed (compressed-tensors) checkpoint format,
                  written by deploy and read by the runtime
runtime           ``cores.models.streaming`` (a checkpoint read block by block),
                  ``cores.models.deployed`` (a deployed block rebuilt from its stored codes),
                  ``cores.models.hidden_store`` (hidden states in RAM or a file) and
                  ``cores.models.run`` (running blocks over them, the NLL)
artifacts         ``cores.calibrator.dump`` (dump manifest) and ``cores.calibrator.params``
                  (param dir): the contracts the stages hand each other
stages            ``cores.calibrator`` (calibration, training), ``cores.deploy``, ``cores.eval``;
                  independent: a stage imports no other stage's modules (only artifacts)
recipes           ``cores.recipes``: recipes and the flow that chains the stages
cli               ``cores.cli``: the five commands (their flags and configs), their validation layer
                  and exit path
================  =====================================================================

Above them: the entry points (top-level ``*.py``, ``scripts/``), and the test / bench
tooling (``blockptq_assets/``, ``bench/``, ``tests/``), none of which ``cores`` imports.

Every import counts: module level, inside functions, under ``TYPE_CHECKING``,
relative or absolute. Importing ``a.b.c`` also runs ``a/b/__init__.py``, so a package
whose ``__init__`` imports something is a dependency of whoever imports below it.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("quantization", ("cores.quantization",)),
    ("utils", ("cores.utils",)),
    ("models", ("cores.models",)),
    ("formats", ("cores.formats",)),
    ("runtime", ("cores.models.streaming", "cores.models.deployed", "cores.models.hidden_store", "cores.models.run")),
    ("artifacts", ("cores.calibrator.dump", "cores.calibrator.params")),
    ("stages", ("cores.calibrator", "cores.deploy", "cores.eval")),
    ("recipes", ("cores.recipes",)),
    ("cli", ("cores.cli",)),
)
"""Layer name -> module prefixes, low to high; a module belongs to its longest matching prefix."""

STAGES = ("cores.calibrator", "cores.deploy", "cores.eval")
"""Stage packages, which import nothing of one another but artifacts."""

OUTSIDE = ("blockptq_assets", "bench", "tests", "scripts", "main", "deploy", "eval_ppl", "extract_calib_data",
           "quantize")
"""Top-level names of the repo that are not the library: ``cores`` imports none of them."""

ALIASES = ("cores.calibrator.quant_block", "cores.deploy.format", "cores.deploy.loader")
"""Old paths kept as re-exports for code outside the repo; ``cores`` itself uses the new ones."""


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    path: str  # its file, relative to the root
    line: int
    target: str  # imported module (or package)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def collect_imports(root: Path, package: str = "cores") -> tuple[set[str], list[Import]]:
    """Every module under ``root/package`` and every import statement in them (targets as written, resolved)."""
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    imports = []
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1])
                    parent = f"{base}.{node.module}" if node.module else base
                else:
                    parent = node.module
                # ``from pkg import name``: name is a submodule or an attribute of pkg
                targets = [f"{parent}.{a.name}" if f"{parent}.{a.name}" in files else parent for a in node.names]
            else:
                continue
            rel = str(path.relative_to(root))
            imports += [Import(mod, rel, node.lineno, t) for t in dict.fromkeys(targets)]
    return set(files), imports


def resolve(target: str, modules: set[str]) -> str | None:
    """The module of ours that ``target`` names (``pkg.attr`` -> ``pkg``), or None for a third-party one."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def edges(modules: set[str], imports: list[Import]) -> list[Import]:
    """The dependencies between our modules: each import, plus the package ``__init__`` files it runs.

    An ancestor package of the target counts when its ``__init__`` imports anything of ours
    and it is not an ancestor of the importer too (that one is running already).
    """
    busy_inits = {i.source for i in imports if resolve(i.target, modules)}
    out = []
    for imp in imports:
        target = resolve(imp.target, modules)
        if target is None:
            continue
        out.append(Import(imp.source, imp.path, imp.line, target))
        parts = target.split(".")
        for n in range(1, len(parts)):
            pkg = ".".join(parts[:n])
            if pkg in busy_inits and not (imp.source + ".").startswith(pkg + "."):
                out.append(Import(imp.source, imp.path, imp.line, pkg))
    return [e for e in out if e.target != e.source]


def layer_of(module: str, layers=LAYERS) -> int | None:
    best, index = -1, None
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, index = len(p), i
    return index


def stage_of(module: str, stages=STAGES) -> str | None:
    return next((s for s in stages if module == s or module.startswith(s + ".")), None)


def violations(modules: set[str], imports: list[Import], layers=LAYERS, stages=STAGES) -> list[str]:
    """One line per forbidden import: upward, across stages, or out of the library."""
    names = [name for name, _ in layers]
    out = []
    for imp in imports:
        top = imp.target.split(".")[0]
        if top in OUTSIDE and resolve(imp.target, modules) is None:
            out.append(f"{imp.path}:{imp.line}: {imp.source} imports {imp.target}, which is outside the library")
        if imp.target in ALIASES and imp.source not in ALIASES:
            out.append(f"{imp.path}:{imp.line}: {imp.source} imports {imp.target}, an old path kept for outside "
                       "code; import what it re-exports")
    for e in edges(modules, imports):
        src, dst = layer_of(e.source, layers), layer_of(e.target, layers)
        if src is None:
            out.append(f"{e.path}:{e.line}: {e.source} is in no layer; add it to LAYERS in tests/test_layering.py")
        elif dst is None:
            out.append(f"{e.path}:{e.line}: {e.source} imports {e.target}, which is in no layer")
        elif dst > src:
            out.append(f"{e.path}:{e.line}: {e.source} ({names[src]}) imports {e.target} ({names[dst]}), "
                       "a higher layer")
        elif src == dst and stage_of(e.source, stages) != stage_of(e.target, stages):
            out.append(f"{e.path}:{e.line}: stage {e.source} imports {e.target} of another stage; move what both "
                       "need into an artifact or a lower layer")
    return sorted(set(out))


def cycles(modules: set[str], imports: list[Import]) -> list[list[str]]:
    """The import cycles (strongly connected components of more than one module), Tarjan's algorithm."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges(modules, imports):
        graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _cycle_message(component: list[str], imports: list[Import], modules: set[str]) -> str:
    inside = set(component)
    lines = [f"  {e.path}:{e.line}: {e.source} -> {e.target}" for e in edges(modules, imports)
             if e.source in inside and e.target in inside]
    return "import cycle among " + ", ".join(component) + ":\n" + "\n".join(sorted(set(lines)))


def test_cores_layering():
    modules, imports = collect_imports(ROOT)
    problems = violations(modules, imports)
    assert not problems, "imports that break the layering:\n" + "\n".join(problems)
    found = cycles(modules, imports)
    assert not found, "\n".join(_cycle_message(c, imports, modules) for c in found)
    assert all(layer_of(m) is not None for m in modules if m != "cores")


# The check itself, on a synthetic package that breaks every rule once.

def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.fixture
def bad_tree(tmp_path):
    _write(tmp_path, {
        "cores/__init__.py": "",
        "cores/utils/__init__.py": "",
        "cores/utils/io.py": "import os\n",
        "cores/models/__init__.py": "",
        "cores/models/streaming.py": """\
            from ..utils import io

            def load():
                from ..deploy.loader import thing  # lazy, upward
                return thing
            """,
        "cores/deploy/__init__.py": "from .run import deploy\n",
        "cores/deploy/run.py": "import cores.models.streaming\ndeploy = 1\n",
        "cores/deploy/loader.py": "from cores.models import streaming\nthing = 1\n",
        "cores/deploy/format.py": "NAME = 1\n",
        "cores/eval/__init__.py": "",
        "cores/eval/ppl.py": "from cores.deploy import run\n",
        "cores/utils/data.py": """\
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from blockptq_assets.tiny import make  # outside the library
            """,
        "cores/utils/config.py": "from ..deploy.format import NAME  # runs cores/deploy/__init__.py\n",
    })
    return tmp_path


def test_check_reports_lazy_relative_and_package_imports(bad_tree):
    modules, imports = collect_imports(bad_tree)
    layers = (("utils", ("cores.utils",)), ("models", ("cores.models",)),
              ("stages", ("cores.deploy", "cores.eval")))
    problems = violations(modules, imports, layers, stages=("cores.deploy", "cores.eval"))
    text = "\n".join(problems)
    assert "cores/models/streaming.py:4: cores.models.streaming (models) imports cores.deploy.loader (stages)" in text
    assert "cores/utils/data.py:3: cores.utils.data imports blockptq_assets.tiny, which is outside" in text
    # the package __init__ that ``from ..deploy.format import`` runs is a dependency too
    assert "cores/utils/config.py:1: cores.utils.config (utils) imports cores.deploy (stages)" in text
    assert "cores/utils/config.py:1: cores.utils.config (utils) imports cores.deploy.format (stages)" in text
    assert "cores/eval/ppl.py:1: stage cores.eval.ppl imports cores.deploy.run of another stage" in text
    assert not any(p.startswith("cores/deploy/run.py") for p in problems)  # downward: allowed


def test_check_finds_cycles(bad_tree):
    modules, imports = collect_imports(bad_tree)
    found = cycles(modules, imports)
    (component,) = [c for c in found if "cores.models.streaming" in c]
    assert {"cores.deploy.loader", "cores.models.streaming"} <= set(component)
    message = _cycle_message(component, imports, modules)
    assert "cores/models/streaming.py:4: cores.models.streaming -> cores.deploy.loader" in message
    assert "cores/deploy/loader.py:1: cores.deploy.loader -> cores.models.streaming" in message


def test_layer_of_takes_the_longest_prefix():
    assert LAYERS[layer_of("cores.models.streaming")][0] == "runtime"
    assert LAYERS[layer_of("cores.models.dense")][0] == "models"
    assert LAYERS[layer_of("cores.calibrator.params")][0] == "artifacts"
    assert LAYERS[layer_of("cores.calibrator.trainer")][0] == "stages"
    assert layer_of("numpy") is None
