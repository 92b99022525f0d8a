"""Recipes: schema errors with lines, layer ranges, built-in selection, mixed-precision checkpoints, sensitivity."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from cores.deploy import DeployConfig, deploy
from cores.deploy.writer import DeployError
from cores.models import get_family
from cores.models.run import sequence_nll
from cores.models.streaming import StreamingModel
from cores.quantization import QuantLinear
from cores.recipes import (RecipeError, builtin_names, builtin_path, builtin_recipe, check_against_model,
                           format_layer_ranges, load_recipe, parse_layer_ranges, parse_recipe, recipe_name_for)
from blockptq_assets.tiny import make_tiny_checkpoint, save_tiny_tokenizer, tiny_config
from cores.recipes.mixed import restore_bf16_layers
from cores.recipes.sensitivity import SensitivityConfig, layer_sensitivity, recipe_yaml
from cores.utils.checkpoint import CheckpointReader


def _script(name: str):
    """A script of ``scripts/`` loaded as a module (its ``main`` is the entry point)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[2] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GOOD = """\
version: 1
scheme: w8a8c8
options:
  act: dynamic
ignore:
  - lm_head
  - "re:.*mlp\\\\.down_proj$"
bf16_layers: ["1"]
"""


def _error(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "r.yaml")
    return str(info.value)


# ---- schema ------------------------------------------------------------------------------------------------

def test_good_recipe_parses():
    r = parse_recipe(GOOD, "r.yaml")
    assert r.scheme == "w8a8c8" and r.options == {"act": "dynamic"}
    assert r.ignore_patterns() == ["lm_head", r"re:.*mlp\.down_proj$"]
    assert r.bf16_layers == (1,)
    assert r.quant_scheme().act_mode == "dynamic"
    assert r.block_ignore() == (r"re:.*mlp\.down_proj$",)


@pytest.mark.parametrize("text, where, words", [
    ("version: 1\nscheme: w8a8c8\nignor:\n  - lm_head\n", "r.yaml:3", "unknown key 'ignor'"),
    ("version: 1\nscheme: w8a8c8\nignore:\n  - lm_head\n  - 're:model.(('\n", "r.yaml:5", "bad regular expression"),
    ("version: 2\nscheme: w8a8c8\n", "r.yaml:1", "version 2 is not supported"),
    ("scheme: w8a8c8\n", "r.yaml:1", "no 'version'"),
    ("version: 1\nscheme: w3a8\n", "r.yaml:2", "not a registered scheme"),
    ("version: 1\nscheme: w8a8c8\noptions:\n  act: dyn\n", "r.yaml:4", "options.act"),
    ("version: 1\nscheme: w8a8c8\noptions:\n  act_zero_point: 1\n", "r.yaml:4", "true or false"),
    ("version: 1\nscheme: w8a8c8\nbf16_layers:\n  - '3'\n  - '9-4'\n", "r.yaml:5", "empty"),
    ("version: 1\nscheme: w8a8c8\nbf16_layers:\n  - 'x'\n", "r.yaml:4", "must be 'N' or 'A-B'"),
    ("version: 1\nscheme: w8a8c8\ntraining:\n  epochs: 2\n  epohcs: 3\n", "r.yaml:5", "unknown key 'epohcs'"),
    ("version: 1\nscheme: w8a8c8\ntraining:\n  model: x\n", "r.yaml:4", "the command line"),
    ("version: 1\nscheme: w8a8c8\noverrides:\n  - targets: [lm_head]\n    act: sometimes\n", "r.yaml:5",
     "override act"),
    ("version: 1\nscheme: w8a8c8\noverrides:\n  - targets: [lm_head]\n", "r.yaml:4", "needs a scheme, an act or a group_size"),
    ("version: 1\nscheme: w4a8c8\noptions:\n  group_size: 12\n", "r.yaml:3", "group_size"),
    ("version: 1\nscheme: w8a8c8\nignore: [lm_head\n", "r.yaml:", "not valid YAML"),
])
def test_schema_errors_name_the_line(text, where, words):
    message = _error(text)
    assert message.startswith(where), message
    assert words in message, message


def test_model_checks_name_the_line():
    family, config = get_family("llama"), tiny_config("llama")  # 2 layers
    out_of_range = parse_recipe("version: 1\nscheme: w8a8c8\nbf16_layers:\n  - '0'\n  - '1-2'\n", "r.yaml")
    with pytest.raises(RecipeError, match=r"^r\.yaml:5: bf16 layer 2 is out of range"):
        check_against_model(out_of_range, config, family)
    nothing = parse_recipe("version: 1\nscheme: w8a8c8\nignore:\n  - lm_head\n  - 're:.*kv_b_proj$'\n", "r.yaml")
    with pytest.raises(RecipeError, match=r"^r\.yaml:5: target 're:\.\*kv_b_proj\$' matches no module"):
        check_against_model(nothing, config, family)
    by_class = parse_recipe("version: 1\nscheme: w8a8c8\nignore: [Linear, model.layers.1.mlp.up_proj]\n", "r.yaml")
    assert "model.layers.1.mlp.up_proj" in check_against_model(by_class, config, family)


def test_positional_ignore_reaches_training():
    """Training matches full names as deploy does: one block's module in ``ignore`` reaches ``TrainConfig``;
    names outside the blocks do not."""
    r = parse_recipe("version: 1\nscheme: w8a8c8\nignore:\n  - lm_head\n  - model.layers.3.mlp.down_proj\n"
                     "  - 're:model\\.layers\\.4\\..*'\n", "r.yaml")
    assert r.train_options()["ignore"] == ("model.layers.3.mlp.down_proj", r"re:model\.layers\.4\..*")


def test_layer_ranges():
    assert parse_layer_ranges(["22", "28-29", 5, " 7 - 8 "]) == [5, 7, 8, 22, 28, 29]
    assert format_layer_ranges([29, 5, 22, 28, 7, 8]) == ["5", "7-8", "22", "28-29"]
    assert parse_layer_ranges(format_layer_ranges([0, 1, 2, 4, 9])) == [0, 1, 2, 4, 9]
    with pytest.raises(RecipeError):
        parse_layer_ranges(["-1"])


# ---- built-in recipes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_id, name", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "llama"),
    ("meta-llama/Llama-3.1-8B", "llama"),
    ("Qwen/Qwen3-8B", "qwen3"),
    ("Qwen/Qwen3-235B-A22B", "qwen3_moe"),
    ("Qwen/Qwen3-Coder-480B-A35B-Instruct", "qwen3_moe"),
    ("deepseek-ai/DeepSeek-V3", "deepseek_v3"),
    ("deepseek-ai/DeepSeek-V3.1", "deepseek_v3"),
    ("deepseek-ai/DeepSeek-V3.1-Terminus", "deepseek_v3"),
    ("deepseek-ai/DeepSeek-R1", "deepseek_v3"),
    ("deepseek-ai/DeepSeek-R1-0528", "deepseek_v3"),
    ("deepseek-ai/DeepSeek-V3.2-Exp", "deepseek_v32"),
    ("deepseek-ai/DeepSeek-V3.2", "deepseek_v32"),
])
def test_builtin_by_id(model_id, name):
    assert recipe_name_for(model_id) == name


def test_builtin_by_config():
    assert recipe_name_for(None, {"architectures": ["DeepseekV32ForCausalLM"]}) == "deepseek_v32"
    assert recipe_name_for("my-finetune", {"architectures": ["Qwen3MoeForCausalLM"]}) == "qwen3_moe"
    assert recipe_name_for(None, {"model_type": "qwen3"}) == "qwen3"
    with pytest.raises(RecipeError, match="no built-in recipe"):
        recipe_name_for("gpt2", {"model_type": "gpt2"})


@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen3_moe", "deepseek_v3", "deepseek_v32"])
def test_builtins_are_valid_for_their_family(name):
    assert name in builtin_names()
    recipe = load_recipe(builtin_path(name))
    check_against_model(recipe, tiny_config(name), get_family(name))
    assert "lm_head" in recipe.ignore_patterns()
    text = builtin_path(name).read_text()
    assert text.lstrip().startswith("#")  # says what stays high precision, and why
    if name.startswith("deepseek"):
        assert r"re:.*self_attn\.kv_b_proj$" in recipe.ignore_patterns()
    if name == "deepseek_v32":
        assert r"re:.*self_attn\.indexer\." in recipe.ignore_patterns()
    if "moe" in name or name.startswith("deepseek"):
        assert r"re:.*mlp\.gate$" in recipe.ignore_patterns()


# ---- mixed precision ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_deployed(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("mix")
    src = make_tiny_checkpoint(root / "src", "llama", dtype=torch.bfloat16, num_hidden_layers=3)
    save_tiny_tokenizer(src, "the quick brown fox jumps over the lazy dog " * 50, 300)
    deploy(DeployConfig(str(src), str(root / "w8a8"), "w8a8c16"))
    return src, root / "w8a8"


def test_mixed_checkpoint_reads_back(tiny_deployed, tmp_path):
    src, deployed = tiny_deployed
    result = restore_bf16_layers(deployed, src, [2], tmp_path / "mix")
    linears = [f"model.layers.2.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert sorted(result.restored) == sorted(linears)
    ignore = json.loads((tmp_path / "mix" / "config.json").read_text())["quantization_config"]["ignore"]
    assert set(linears) <= set(ignore) and "lm_head" in ignore
    assert not any(n.startswith("model.layers.1.") for n in ignore)
    out, source = CheckpointReader(tmp_path / "mix"), CheckpointReader(src)
    assert not any(k.startswith("model.layers.2.") and k.endswith(("weight_scale", "input_scale")) for k in out.keys)
    for name in linears:
        stored = out.read([name + ".weight"])[name + ".weight"]
        assert stored.dtype == torch.bfloat16
        assert torch.equal(stored, source.read([name + ".weight"])[name + ".weight"])
    assert out.read(["model.layers.1.mlp.up_proj.weight"])["model.layers.1.mlp.up_proj.weight"].dtype == torch.int8
    assert result.deployed_bytes < result.output_bytes < result.source_bytes + result.deployed_bytes
    model = StreamingModel(tmp_path / "mix")  # checks the recorded file checksums too
    assert isinstance(model.load_block(2).self_attn.q_proj, nn.Linear)
    assert not isinstance(model.load_block(2).self_attn.q_proj, QuantLinear)
    assert isinstance(model.load_block(1).self_attn.q_proj, QuantLinear)
    ids = torch.randint(0, 300, (1, 16))
    nll, count = sequence_nll(model, ids)
    assert count == 15 and torch.isfinite(torch.tensor(nll))
    with safe_open(tmp_path / "mix" / out.weight_map["model.layers.2.mlp.up_proj.weight"], "pt") as f:
        assert "model.layers.2.mlp.up_proj.weight_scale" not in f.keys()
    again = restore_bf16_layers(deployed, src, [2], tmp_path / "mix")  # resumable: nothing to do
    assert again.restored == result.restored


def test_mixed_refuses_bad_inputs(tiny_deployed, tmp_path):
    src, deployed = tiny_deployed
    with pytest.raises(DeployError, match="out of range"):
        restore_bf16_layers(deployed, src, [3], tmp_path / "mix")
    with pytest.raises(DeployError, match="not a compressed-tensors"):
        restore_bf16_layers(src, src, [0], tmp_path / "mix")
    assert _script("mix_bf16").main(["--deployed", str(deployed), "--source", str(src), "--output", str(tmp_path / "m2"),
                       "--bf16_layers", "7"]) == 2
    assert not (tmp_path / "m2").exists()


def test_sensitivity_and_written_recipe(tiny_deployed, tmp_path):
    src, _ = tiny_deployed
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    result = layer_sensitivity(SensitivityConfig(model=str(src), dataset=str(text), seq_len=32, windows=2))
    assert [s.layer for s in result.scores] == [0, 1, 2]
    assert all(s.kl >= 0 and s.ppl > 0 for s in result.scores)
    pick = result.pick(2)
    assert len(pick) == 2 and set(pick) <= {0, 1, 2}
    assert result.ranking()[0].kl >= result.ranking()[-1].kl
    written = parse_recipe(recipe_yaml(builtin_recipe(None, {"model_type": "llama"}), pick, "note\nline"), "w.yaml")
    assert written.bf16_layers == tuple(pick) and written.scheme == "w8a8c8"


# ---- one-command flow --------------------------------------------------------------------------------------

def test_flow_runs_and_resumes(tiny_deployed, tmp_path, caplog):
    from cores.recipes.flow import FlowConfig, run_flow

    src, _ = tiny_deployed
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nscheme: w8a8c16\noptions: {act: dynamic}\nignore: [lm_head, 're:.*norm$']\n"
                      "bf16_layers: ['1']\ntraining: {rtn: true}\n")
    cfg = FlowConfig(model_path=str(src), save_path=str(tmp_path / "run"), recipe=str(recipe),
                     calib_dataset=str(text), eval_dataset=str(text), n_samples=2, seq_len=16, eval_seq_len=16,
                     eval_windows=2)
    out = run_flow(cfg)
    assert set(out["ppl"]) == {"bf16", "deployed", "mixed"}
    ignore = json.loads((tmp_path / "run" / "mixed" / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.1.mlp.down_proj" in ignore
    with caplog.at_level("INFO"):
        again = run_flow(cfg)
    assert again["ppl"] == out["ppl"]
    assert "this deploy already" in caplog.text and "done already" in caplog.text


TRAINED = "version: 1\nscheme: w8a8c16\noptions: {act: dynamic}\nignore: [lm_head]\ntraining: {epochs: 1}\n"


def _flow_cfg(src, tmp_path, name: str, jobs: int):
    from cores.recipes.flow import FlowConfig

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    (tmp_path / "trained.yaml").write_text(TRAINED)
    return FlowConfig(model_path=str(src), save_path=str(tmp_path / name), recipe=str(tmp_path / "trained.yaml"),
                      calib_dataset=str(text), n_samples=2, seq_len=16, jobs=jobs)


def test_flow_jobs_train_what_one_job_trains(tiny_deployed, tmp_path):
    """``jobs=2``: two processes train the three blocks into one param dir, tensor for tensor and loss for loss
    what one process trains (CPU training is deterministic); the summary table has a row per stage."""
    from cores.calibrator.params import ParamDir
    from cores.recipes.flow import run_flow, summary_table

    src, _ = tiny_deployed
    one = run_flow(_flow_cfg(src, tmp_path, "one", 1))
    two = run_flow(_flow_cfg(src, tmp_path, "two", 2))
    a, b = ParamDir(one["params"]), ParamDir(two["params"])
    assert a.done_blocks() == b.done_blocks() == [0, 1, 2]
    for idx in range(3):
        ta, tb = a.load_block(idx), b.load_block(idx)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    ra, rb = a.records(), b.records()
    assert [r["loss_learned"] for r in ra] == [r["loss_learned"] for r in rb]
    assert [r["loss_rtn"] for r in ra] == [r["loss_rtn"] for r in rb]
    assert all(r["epochs"] == 1 and not r["rtn"] for r in rb)
    assert two["train"].endswith("(2 jobs)") and "3 blocks in" in two["train"]
    table = summary_table(two, tmp_path / "two").splitlines()
    assert [row.split()[0] for row in table] == ["stage", "dump", "train", "deploy"]
    assert two["params"] in table[2] and "(2 jobs)" in table[2]


def test_flow_jobs_refuse_sequential(tiny_deployed, tmp_path, caplog):
    import quantize

    from cores.calibrator.jobs import run_training_jobs
    from cores.calibrator.trainer import TrainConfig
    from cores.recipes.flow import resolve_recipe

    src, _ = tiny_deployed
    (tmp_path / "seq.yaml").write_text("version: 1\nscheme: w8a8c16\ntraining: {sequential: true}\n")
    cfg = dataclasses.replace(_flow_cfg(src, tmp_path, "run", 2), recipe=str(tmp_path / "seq.yaml"))
    with pytest.raises(RecipeError, match=r"seq\.yaml: training\.sequential .* cannot train in --jobs 2 parallel"):
        resolve_recipe(cfg)
    assert resolve_recipe(dataclasses.replace(cfg, jobs=1)).training == {"sequential": True}
    assert quantize.main(["--model_path", str(src), "--save_path", str(tmp_path / "o"), "--recipe",
                          str(tmp_path / "seq.yaml"), "--jobs", "3"]) == 2
    assert "cannot train in --jobs 3 parallel jobs; use --jobs 1" in caplog.text
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="cannot be split over jobs"):
        run_training_jobs(TrainConfig(model=str(src), data_dir="none", output_dir="none", sequential=True), 2)


def test_plan_jobs_shares_blocks_and_devices(monkeypatch):
    """Every jobs-th block per job, no more jobs than blocks; cuda round-robin, cuda:K for all, cpu threads split."""
    import os

    from cores.calibrator.jobs import plan_jobs
    from cores.calibrator.trainer import TrainConfig

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = TrainConfig(model="m", data_dir="d", output_dir="o", start_block_idx=1, end_block_idx=8)
    plan = plan_jobs(dataclasses.replace(cfg, device="cuda"), 3, num_blocks=30)
    assert [job.blocks for job in plan] == [(1, 4, 7), (2, 5), (3, 6)]
    assert [job.device for job in plan] == ["cuda:0", "cuda:1", "cuda:0"] and {job.threads for job in plan} == {None}
    assert [job.ranks.local_rank for job in plan] == [0, 1, 0] and not any(job.ranks.grouped for job in plan)
    assert [job.ranks.device("cuda") for job in plan] == ["cuda:0", "cuda:1", "cuda:0"]  # what run_training picks
    assert {job.ranks.device("cuda:1") for job in plan_jobs(dataclasses.replace(cfg, device="cuda:1"), 2, 30)} \
        == {"cuda:1"}
    cpu = plan_jobs(cfg, 16, num_blocks=5)  # blocks 1-4: four jobs
    assert [job.blocks for job in cpu] == [(1,), (2,), (3,), (4,)]
    assert {job.device for job in cpu} == {"cpu"} and {job.threads for job in cpu} == {max(1, os.cpu_count() // 4)}


def test_flow_failed_job_names_itself_and_resumes(tiny_deployed, tmp_path, capsys, caplog):
    """A job that fails (a folder where block 1's params go) fails the flow naming the job, its blocks and its
    error; the other job's blocks are kept, and a rerun (``quantize.py --jobs 2``) trains only block 1."""
    import quantize

    from cores.calibrator.jobs import TrainJobError
    from cores.calibrator.params import ParamDir
    from cores.recipes.flow import run_flow

    src, _ = tiny_deployed
    cfg = _flow_cfg(src, tmp_path, "run", 2)
    blocker = tmp_path / "run" / "params" / "block_001.safetensors"
    blocker.mkdir(parents=True)
    with pytest.raises(TrainJobError, match=r"^train job 2/2 \(blocks 1; unfinished: 1\) failed: IsADirectoryError: "
                                            r".*block_001\.safetensors.* rerun to resume$"):
        run_flow(cfg)
    params = ParamDir(tmp_path / "run" / "params")
    assert params.done_blocks() == [0, 2]
    kept = {p.name: p.read_bytes() for p in params.files() if not p.is_dir()}
    blocker.rmdir()
    caplog.set_level("INFO", "cores.calibrator.jobs")
    assert quantize.main(["--model_path", str(src), "--save_path", cfg.save_path, "--recipe", cfg.recipe,
                          "--calib_dataset", cfg.calib_dataset, "--n_samples", "2", "--seq_len", "16",
                          "--jobs", "2"]) == 0
    assert params.done_blocks() == [0, 1, 2]
    assert "train: 1 of 3 blocks left, in 1 jobs (cpu)" in caplog.text  # job 1/2's blocks 0 and 2: not restarted
    assert all((params.path / name).read_bytes() == data for name, data in kept.items())
    printed = capsys.readouterr().out
    result, table = printed.split("\n\n")
    assert json.loads(result)["train"].endswith("(2 jobs)")
    assert [row.split()[0] for row in table.splitlines()] == ["stage", "dump", "train", "deploy"]


def test_fp8_source_trains_sequentially_unless_the_recipe_says(tiny_deployed, tmp_path, caplog):
    """The flow puts an FP8 source on the more precise path (sequential blocks) unless the recipe sets
    ``sequential``, is RTN or trains sub-blocks; with ``--jobs 2`` it asks for ``sequential: false``."""
    import shutil

    from blockptq_assets.tiny import fp8_twins
    from cores.calibrator.params import ParamDir
    from cores.recipes.flow import flow_train_options, run_flow

    src, _ = tiny_deployed
    fp8, _ = fp8_twins(src, tmp_path / "fp8")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, fp8 / name)
    assert CheckpointReader(fp8).is_fp8 and not CheckpointReader(src).is_fp8
    recipe = load_recipe_text(tmp_path, TRAINED)
    assert flow_train_options(recipe, True)["sequential"] is True
    assert "sequential" not in flow_train_options(recipe, False)
    for training in ("{epochs: 1, sequential: false}", "{rtn: true}", "{train_mode: mla, smooth: false}"):
        other = load_recipe_text(tmp_path, TRAINED.replace("{epochs: 1}", training))
        assert not flow_train_options(other, True).get("sequential", False), training
    cfg = _flow_cfg(fp8, tmp_path, "run", 2)
    with pytest.raises(RecipeError, match=r"is an FP8 checkpoint, which the flow trains sequentially .* put "
                                          r"'sequential: false' under training in .*trained\.yaml"):
        run_flow(cfg)
    caplog.set_level("INFO", "cores.recipes.flow")
    out = run_flow(dataclasses.replace(cfg, jobs=1))
    assert "is an FP8 checkpoint: training sequentially" in caplog.text
    records = ParamDir(out["params"]).records()
    assert len(records) == 3 and all(r["sequential"] for r in records)


def load_recipe_text(tmp_path, text: str):
    from cores.recipes import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(text)
    return load_recipe(path)


def test_flow_refuses_what_it_cannot_deploy(tiny_deployed, tmp_path):
    from cores.recipes.flow import FlowConfig, resolve_recipe

    src, _ = tiny_deployed
    cases = {
        "version: 1\nscheme: w8a8c8\nbf16_layers: ['1']\n": r"r\.yaml:3: bf16_layers with an 8-bit KV cache",
        "version: 1\nscheme: w8a8c16\noverrides:\n  - targets: ['re:.*q_proj$']\n    act: static\n":
            r"r\.yaml:4: overrides: .*one fused layer in vLLM",
        "version: 1\nscheme: w8a8c16\noverrides:\n  - targets: ['re:.*down_proj$']\n    scheme: w4a8c8\n":
            r"r\.yaml:4: override w4a8c8 .*the KV cache is one scheme",
    }
    for text, match in cases.items():
        (tmp_path / "r.yaml").write_text(text)
        with pytest.raises(RecipeError, match=match):
            resolve_recipe(FlowConfig(model_path=str(src), save_path=str(tmp_path / "o"),
                                      recipe=str(tmp_path / "r.yaml")))


def test_mixed_sharded_deploy(tiny_deployed, tmp_path):
    """A deploy cut into several shards: each restored layer lands in a shard, the index lists every tensor."""
    src, _ = tiny_deployed
    deploy(DeployConfig(str(src), str(tmp_path / "w8a8"), "w8a8c16", max_shard_size="20KB"))
    assert len(list((tmp_path / "w8a8").glob("*.safetensors"))) > 1
    result = restore_bf16_layers(tmp_path / "w8a8", src, [0, 2], tmp_path / "mix")
    assert len(result.restored) == 14
    index = json.loads((tmp_path / "mix" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.down_proj.weight" in index and "model.layers.1.mlp.down_proj.weight_scale" in index
    assert not any(k.startswith(("model.layers.0.", "model.layers.2.")) and k.endswith("weight_scale") for k in index)
    model = StreamingModel(tmp_path / "mix")
    assert isinstance(model.load_block(1).mlp.down_proj, QuantLinear)
    assert not isinstance(model.load_block(0).mlp.down_proj, QuantLinear)


@pytest.mark.slow
def test_mixed_fp8_deepseek(tiny_deepseek, tmp_path):
    """An FP8 MLA + MoE source: restored layers are its bf16 dequantization, block outputs equal the float ones;
    compressed-tensors reads the mixed checkpoint: its config, its ignore list, the layers left quantized."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from compressed_tensors.utils.match import match_name

    from cores.formats.compressed_tensors import dequantize_codes, weight_codes

    src = tiny_deepseek.fp8_dir
    deploy(DeployConfig(str(src), str(tmp_path / "w8a8"), "w8a8c16"))
    restore_bf16_layers(tmp_path / "w8a8", src, [1], tmp_path / "mix")
    qcfg = json.loads((tmp_path / "mix" / "config.json").read_text())["quantization_config"]
    ignore = qcfg["ignore"]
    assert "model.layers.1.mlp.experts.0.up_proj" in ignore and "model.layers.1.self_attn.q_a_proj" in ignore
    QuantizationConfig.model_validate(qcfg)
    group = qcfg["config_groups"]["group_0"]
    compressor = BaseCompressor.get_value_from_registry(group["format"])
    scheme = QuantizationScheme.model_validate(group)
    reader = CheckpointReader(tmp_path / "mix")
    for layer, quantized in ((1, False), (2, True)):
        for name in ("mlp.experts.3.down_proj", "mlp.shared_experts.gate_proj", "self_attn.q_a_proj",
                     "self_attn.o_proj"):
            full = f"model.layers.{layer}.{name}"
            tensors = {k[len(full) + 1:]: v for k, v in reader.read([k for k in reader.keys
                                                                     if k.startswith(full + ".")]).items()}
            assert any(match_name(full, target) for target in ignore) is not quantized, full
            if quantized:  # compressed-tensors' decompression = ours
                assert torch.equal(compressor.decompress(dict(tensors), scheme)["weight"],
                                   dequantize_codes(*weight_codes(tensors, "", 8)))
            else:
                assert set(tensors) == {"weight"} and tensors["weight"].dtype == torch.bfloat16
    mix, ref = StreamingModel(tmp_path / "mix"), StreamingModel(src)
    x = torch.randn(1, 16, ref.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = ref.rotary(16)
    assert torch.equal(mix.load_block(1)(x, cos, sin), ref.load_block(1)(x, cos, sin))
    assert not torch.equal(mix.load_block(2)(x, cos, sin), ref.load_block(2)(x, cos, sin))


def test_sensitivity_cli_writes_recipe(tiny_deployed, tmp_path, caplog):
    cli = _script("sensitivity")
    src, _ = tiny_deployed
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    out = tmp_path / "sens"
    assert cli.main(["--model", str(src), "--dataset", str(text), "--seq_len", "32", "--windows", "2",
                     "--budget", "1", "--output_dir", str(out)]) == 0
    report = json.loads((out / "sensitivity.json").read_text())
    assert len(report["pick"]) == 1 and report["pick"][0] == report["ranking"][0]
    recipe = load_recipe(out / "recipe.yaml")
    assert list(recipe.bf16_layers) == report["pick"] and recipe.scheme == "w8a8c8"  # the built-in llama recipe
    png = (out / "sensitivity.png").read_bytes()  # matplotlib comes with the test extra
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_quantize_cli_refuses_a_bad_recipe(tiny_deployed, tmp_path, caplog):
    import quantize

    src, _ = tiny_deployed
    (tmp_path / "r.yaml").write_text("version: 1\nscheme: w8a8c16\nbf16_layers: ['9']\n")
    assert quantize.main(["--model_path", str(src), "--save_path", str(tmp_path / "o"),
                          "--recipe", str(tmp_path / "r.yaml")]) == 2
    assert "r.yaml:3: bf16 layer 9 is out of range" in caplog.text


OVERRIDES = """\
version: 1
scheme: w8a8c16
options: {act: dynamic}
ignore: [lm_head]
overrides:
  - targets: ['re:.*down_proj$']
    act: static
  - targets: ['re:model\\.layers\\.1\\.mlp\\.(gate|up)_proj$']
    scheme: w4a8c16
    group_size: 32
bf16_layers: ['2']
training: {rtn: true}
"""


def test_flow_deploys_per_target_schemes(tiny_deployed, tmp_path):
    """Overrides train and deploy as config groups of their own; the deployed model computes the fake-quant one."""
    from compressed_tensors.quantization import QuantizationConfig

    from cores.recipes.flow import FlowConfig, run_flow
    from cores.eval.perplexity import PplConfig, evaluate_ppl

    src, _ = tiny_deployed
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    (tmp_path / "r.yaml").write_text(OVERRIDES)
    cfg = FlowConfig(model_path=str(src), save_path=str(tmp_path / "run"), recipe=str(tmp_path / "r.yaml"),
                     calib_dataset=str(text), eval_dataset=str(text), n_samples=2, seq_len=16, eval_seq_len=16,
                     eval_windows=2, eval_bf16=False)
    out = run_flow(cfg)
    qcfg = json.loads((tmp_path / "run" / "deployed" / "config.json").read_text())["quantization_config"]
    groups = qcfg["config_groups"]
    assert [g["targets"] for g in groups.values()] == [
        ["Linear"], [f"model.layers.{i}.mlp.down_proj" for i in range(3)],
        ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]]
    assert groups["group_1"]["input_activations"]["dynamic"] is False and groups["group_2"]["weights"]["num_bits"] == 4
    QuantizationConfig.model_validate(qcfg)
    reader = CheckpointReader(tmp_path / "run" / "deployed")
    assert "model.layers.0.mlp.down_proj.input_scale" in reader.keys
    assert "model.layers.0.mlp.up_proj.input_scale" not in reader.keys
    assert "model.layers.1.mlp.up_proj.weight_packed" in reader.keys
    fake = evaluate_ppl(PplConfig(model=str(src), dataset=str(text), seq_len=16, max_windows=2,
                                  param_dir=str(tmp_path / "run" / "params"))).ppl
    assert abs(out["ppl"]["deployed"] / fake - 1) < 1e-6  # what was trained is what is shipped
    block = StreamingModel(tmp_path / "run" / "deployed").load_block(1)
    assert block.mlp.up_proj.weight_quantizer.bits == 4 and block.mlp.down_proj.input_quantizer.mode == "static"
    mixed = json.loads((tmp_path / "run" / "mixed" / "config.json").read_text())["quantization_config"]
    assert mixed["config_groups"]["group_1"]["targets"] == ["model.layers.0.mlp.down_proj",
                                                            "model.layers.1.mlp.down_proj"]
    QuantizationConfig.model_validate(mixed)
    assert out["ppl"]["mixed"] > 0


def test_main_py_trains_a_recipes_overrides(tiny_deployed, tmp_path, caplog):
    """``main.py --recipe``: the recipe's scheme, overrides and training options, flags above them; deploy
    then writes the same groups as the flow."""
    import deploy as deploy_cli
    import main as main_cli

    from cores.calibrator.extract import ExtractConfig, extract_calibration
    from cores.calibrator.params import ParamDir

    src, _ = tiny_deployed
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    dump = tmp_path / "dump"
    extract_calibration(ExtractConfig(model=str(src), output_dir=str(dump), dataset=str(text), n_samples=2,
                                      seq_len=16))
    (tmp_path / "r.yaml").write_text(OVERRIDES)
    params = tmp_path / "params"
    assert main_cli.main(["--model", str(src), "--data_dir", str(dump), "--output_dir", str(params),
                          "--recipe", str(tmp_path / "r.yaml"), "--end_block_idx", "2"]) == 0
    identity = ParamDir(params).identity()
    assert identity["scheme"]["name"] == "w8a8c16" and len(identity["overrides"]) == 2
    assert identity["modes"]["block"]["rtn"]
    assert "bf16_layers [2] are not trained or deployed by main.py" in caplog.text
    assert main_cli.main(["--model", str(src), "--data_dir", str(dump), "--output_dir", str(params),
                          "--recipe", str(tmp_path / "r.yaml"), "--start_block_idx", "2"]) == 0
    out = tmp_path / "deployed"
    assert deploy_cli.main(["--model", str(src), "--output_dir", str(out), "--scheme", "w8a8c16",
                            "--param_dir", str(params)]) == 0
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 3 and groups["group_2"]["weights"]["num_bits"] == 4
    (tmp_path / "bad.yaml").write_text(OVERRIDES.replace("bf16_layers: ['2']", "bf16_layers: ['7']"))
    assert main_cli.main(["--model", str(src), "--data_dir", str(dump), "--output_dir", str(tmp_path / "p2"),
                          "--recipe", str(tmp_path / "bad.yaml")]) == 2
    assert "bad.yaml:11: bf16 layer 7 is out of range" in caplog.text
    assert main_cli.main(["--data_dir", str(dump), "--output_dir", str(tmp_path / "p3"),
                          "--recipe", str(tmp_path / "r.yaml")]) == 2
    assert "missing required option --model: --recipe needs it" in caplog.text
