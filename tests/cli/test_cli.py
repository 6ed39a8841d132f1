"""The command line as a user meets it: JSON outputs, exit code 2 with one clear message on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.seed import normalize, parse_blocks


def vlmforge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vlmforge", *args], capture_output=True, text=True, timeout=120)


def test_plan_json_reproduces_the_seed_llava_commands() -> None:
    result = vlmforge("plan", "llava-1.5-7b-hf", "--dialect", "0.9", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert set(plan) >= {"spec", "derived", "steps"}
    assert plan["derived"]["max_multimodal_len"] == 576
    for step in plan["steps"]:
        assert set(step) >= {"name", "argv", "cwd", "image", "gpus", "inputs", "outputs"}
    steps = {step["name"]: step["argv"] for step in plan["steps"]}
    blocks = parse_blocks()
    seed_convert, seed_build = blocks[8].commands
    assert normalize(steps["convert"]) == normalize(seed_convert)
    assert normalize(steps["build-llm"]) == normalize(seed_build)
    assert normalize(steps["build-visual"]) == normalize(blocks[9].commands[0])


def test_plan_overrides_and_12_dialect() -> None:
    result = vlmforge("plan", "llava-1.5-7b-hf", "--tp", "2", "--max-batch-size", "2", "--visual-batch-size", "2", "--json")
    plan = json.loads(result.stdout)
    build = next(step["argv"] for step in plan["steps"] if step["name"] == "build-llm")
    assert build[build.index("--max_multimodal_len") + 1] == "1152"
    assert build[build.index("--max_seq_len") + 1] == "2560"
    assert "--max_output_len" not in build


def test_models_and_families_json() -> None:
    models = json.loads(vlmforge("models", "--json").stdout)
    assert {"llava-1.5-7b-hf", "nougat-small"} <= {row["name"] for row in models}
    families = json.loads(vlmforge("families", "--json").stdout)
    assert {"blip2-opt", "blip2-t5", "llava", "vila", "nougat"} <= {row["name"] for row in families}
    by_name = {row["name"]: row for row in families}
    assert by_name["llava"]["toolchains"]["hf"] == "build, validate, serve"
    assert by_name["llava"]["toolchains"]["trtllm"].startswith("plan (0.9, 1.2), build")
    assert by_name["llava_next"]["toolchains"] == {"hf": "build, validate, serve",
                                                   "trtllm": "plan (1.2), build (validated against hf)"}
    assert by_name["llava_next"]["tiny_source"] == "tiny://llava-next"
    assert by_name["qwen2_vl"]["toolchains"] == {
        "hf": "build, validate, serve (M-RoPE: eager decode, no static GPU path)",
        "trtllm": "plan (1.2), build (validated against hf)"}
    assert by_name["qwen2_vl"]["tiny_source"] == "tiny://qwen2-vl" and by_name["qwen2_vl"]["size_dependent_tokens"]
    onevision = by_name["llava_onevision"]
    assert onevision["toolchains"] == by_name["llava_next"]["toolchains"]
    assert (onevision["tiny_source"], onevision["num_visual_features"], onevision["default_max_image_size"],
            onevision["max_images_per_prompt"]) == ("tiny://llava-onevision", 8765, "2304x2304", None)
    assert "several images per prompt: one tile each (hf toolchain)" in onevision["description"]
    assert by_name["gemma3"]["toolchains"] == {
        "hf": "build, validate, serve",
        "trtllm": "no engine (plans refused); deploy --backend trtllm-serve serves its checkpoint"}
    assert (by_name["qwen2_vl"]["num_visual_features"], by_name["qwen2_vl"]["default_max_image_size"]) == (324, "504x504")
    assert by_name["qwen2_5_vl"]["toolchains"] == {
        "hf": "build, validate, serve (M-RoPE: eager decode, no static GPU path)",
        "trtllm": "no engine (plans refused); deploy --backend trtllm-serve serves its checkpoint"}
    assert by_name["qwen2_5_vl"]["tiny_source"] == "tiny://qwen2.5-vl"


def test_plan_explain_json_names_the_family_numbers() -> None:
    result = vlmforge("plan", "Qwen2-VL-7B-Instruct", "--explain", "--json")
    assert result.returncode == 0, result.stderr
    explain = {line["name"]: line for line in json.loads(result.stdout)["explain"]}
    assert explain["max_hw_dims"]["value"] == 1296 and explain["min_hw_dims"]["value"] == 16
    assert explain["num_visual_features"]["value"] == 324 and "smart_resize to 504x504" in explain["num_visual_features"]["formula"]
    refused = vlmforge("plan", "Qwen2-VL-7B-Instruct", "--dialect", "0.9")
    assert refused.returncode == 2 and "v1.2.1 builds it" in refused.stderr


def test_spec_schema_is_json_schema() -> None:
    schema = json.loads(vlmforge("spec", "schema").stdout)
    assert schema["title"] == "vlmforge build spec" and "limits" in schema["properties"]


def test_user_errors_exit_2_with_one_message(tmp_path: Path) -> None:
    result = vlmforge("plan", "llava-7b")
    assert result.returncode == 2
    assert "unknown model 'llava-7b'" in result.stderr and "llava-1.5-7b-hf" in result.stderr
    assert "Traceback" not in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfamily: llava\nsource: tiny://llava\nlimits: {max_batch_size: 4, max_multimodal_len: 100}\n")
    result = vlmforge("plan", str(bad))
    assert result.returncode == 2
    assert "max_batch_size x num_visual_features" in result.stderr and "Traceback" not in result.stderr
    bad.write_text("name: x\n  family: : llava\n")
    result = vlmforge("spec", "validate", str(bad))
    assert result.returncode == 2 and f"{bad}:2" in result.stderr


def test_a_yaml_alias_bomb_exits_2_with_a_message(tmp_path: Path) -> None:
    """Nine levels of nine aliases: `spec validate` once used 8.5 GB and died silently; the child here gets 3 GiB
    of address space (enough for the CLI's imports), so without the bound it fails instead of the machine."""
    import resource

    from tests.specs.test_input_safety import ALIAS_BOMB

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    result = subprocess.run([sys.executable, "-m", "vlmforge", "spec", "validate", str(bomb)], capture_output=True,
                            text=True, timeout=120,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "YAML aliases expand to more than" in result.stderr and "Traceback" not in result.stderr


def test_a_bad_option_value_is_a_usage_error_not_a_traceback() -> None:
    """typer vendors its own click: its parameter errors must end as click's usage errors (exit 2, one message)."""
    for args, option in ((["plan", "llava-1.5-7b-hf", "--dtype", "fp13"], "--dtype"),
                         (["serve", "/nonexistent", "--compile-mode", "reduce-overhead"], "--compile-mode"),
                         (["plan", "llava-1.5-7b-hf", "--no-such-option"], "--no-such-option")):
        result = vlmforge(*args)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and option in result.stderr and "Usage:" in result.stderr


def test_max_output_len_replaces_the_max_seq_len_of_a_spec_file(tmp_path: Path) -> None:
    """--max-output-len clears a spec's own max_seq_len so it is derived again (input + output)."""
    import yaml

    from vlmforge.specs.catalog import catalog_entry

    spec = catalog_entry("llava-1.5-7b-hf")
    spec["limits"] = {**spec.get("limits", {}), "max_input_len": 2048, "max_seq_len": 2560}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = vlmforge("plan", str(path), "--max-output-len", "100", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["derived"]["max_seq_len"] == 2148


def test_an_error_naming_a_path_with_brackets_prints_it_as_is() -> None:
    """Error messages carry user paths: rich markup in them ([x], [/y]) is printed, not interpreted."""
    result = vlmforge("plan", "/nonexistent/[x]/[/y].yaml")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "/nonexistent/[x]/[/y].yaml" in result.stderr


def test_vila_is_no_longer_refused_for_lack_of_a_reference() -> None:
    """VILA has a float reference now (its parts as transformers modules): a trtllm build of vila-7B gets past the
    family check and stops only where TensorRT-LLM is missing, before any work."""
    result = vlmforge("build", "vila-7B", "--toolchain", "trtllm")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "TensorRT-LLM is not installed here" in result.stderr and "reference" not in result.stderr


def test_checkpoint_writes_and_verifies_a_tensorrt_llm_checkpoint(tmp_path: Path) -> None:
    from vlmforge.families import get_family

    get_family("blip2-opt").make_tiny(tmp_path / "model")
    result = vlmforge("checkpoint", str(tmp_path / "model"), "--family", "blip2-opt", "--out", str(tmp_path / "ckpt"),
                      "--quant", "int8_wo", "--tp", "2", "--report", str(tmp_path / "report.json"), "--json")
    assert result.returncode == 0, result.stderr
    written = json.loads(result.stdout)  # stdout holds the JSON alone
    assert written == json.loads((tmp_path / "report.json").read_text())
    assert written["writer"] == "opt" and written["quant_algo"] == "W8A16"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "rank0.safetensors", "rank1.safetensors"]
    check = written["verification"]
    assert check["readback_vs_quantized"]["max_error"] <= check["tolerance"]
    assert check["readback_vs_reference"]["next_token_error"] <= check["max_logit_error_allowed"]


def test_checkpoint_refusals_exit_2(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    result = vlmforge("checkpoint", str(tmp_path / "model"), "--out", str(tmp_path / "ckpt"))
    assert result.returncode == 2 and "say its family with --family" in result.stderr
    result = vlmforge("checkpoint", "tiny-blip2-t5", "--out", str(tmp_path / "ckpt"), "--quant", "int8_wo")
    assert result.returncode == 2 and "encoder-decoder family" in result.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    result = vlmforge("checkpoint", "tiny-llava", "--out", str(tmp_path / "full"))
    assert result.returncode == 2 and "not empty" in result.stderr and (tmp_path / "full" / "x").read_text() == "keep"


@pytest.mark.slow
def test_a_published_build_is_reported_in_seconds_without_prefect(prefect_server: str, tmp_path: Path) -> None:
    """`vlmforge build` again with nothing changed: the store already holds the build and its alias, so it says so
    and exits 0 without reaching Prefect (the second run's API URL leads nowhere); --force and a new alias run the
    flow (on the session's real Prefect server)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    nowhere = {**env, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    args = ["build", "tiny-llava", "--store", str(tmp_path / "store"), "--workdir", str(tmp_path / "work")]

    def cli(*extra: str, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vlmforge", *args, *extra], capture_output=True, text=True,
                              timeout=600, env=environ)

    first = cli("--json", environ=env)
    assert first.returncode == 0, first.stderr[-3000:]
    built = json.loads(first.stdout)
    again = cli("--json", environ=nowhere)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert summary["already_published"] is True and summary["build_id"] == built["build_id"]
    assert summary["aliases"] == {"latest": built["build_id"]} and summary["fingerprint"] == built["fingerprint"]
    plain = cli(environ={**nowhere, "COLUMNS": "80"})
    assert plain.returncode == 0 and "is already published" in plain.stdout and built["build_id"] in plain.stdout
    forced = cli("--force", "--json", environ=env)  # the flow runs: every stage skipped, nothing uploaded
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert json.loads(forced.stdout)["stages"] and set(json.loads(forced.stdout)["stages"].values()) == {"skipped"}
    prod = cli("--alias", "prod", "--json", environ=env)  # the store holds the build, but prod must move: the flow
    assert prod.returncode == 0, prod.stderr[-3000:]
    assert json.loads(prod.stdout)["aliases"] == {"prod": built["build_id"]}
    assert json.loads(cli("--alias", "prod", "--json", environ=nowhere).stdout)["already_published"] is True


@pytest.mark.slow
def test_a_build_prints_one_progress_display_and_verbose_shows_the_rest(prefect_server: str, tmp_path: Path) -> None:
    """A build printed Prefect's run log, torch's ONNX exporter warnings (torchvision), FutureWarnings and
    transformers' per-file progress bars between its lines: now one progress display and the result; --verbose
    prints all of it as before."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    noise = ("Loading weights", "Writing model shards", "torchvision", "FutureWarning", "Finished in state",
             "INFO")

    def build(*extra: str, run: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vlmforge", "build", "tiny-llava", "--store",
                               str(tmp_path / run / "store"), "--workdir", str(tmp_path / run / "work"), *extra],
                              capture_output=True, text=True, timeout=600, env=env)

    quiet = build(run="quiet")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert not [word for word in noise if word in quiet.stderr + quiet.stdout], quiet.stderr
    for stage in ("fetch", "convert", "llm", "visual", "engine", "validate"):
        assert f"✓ {stage} done in" in quiet.stderr
    assert "7/7" in quiet.stderr and "engine tiny-llava#" in quiet.stdout and "validation: token agreement" in quiet.stdout
    verbose = build("--verbose", run="verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert {"Loading weights", "torchvision", "Finished in state"} <= {w for w in noise if w in verbose.stderr}
    assert "7/7" not in verbose.stderr and "engine tiny-llava#" in verbose.stdout


def test_plan_explains_each_derived_number() -> None:
    """`plan --explain`: each number with its formula (two images per prompt here); plain --json is unchanged."""
    args = ["plan", "llava-1.5-7b-hf", "--max-batch-size", "2", "--visual-batch-size", "4", "--json"]
    plain = vlmforge(*args)
    assert plain.returncode == 0, plain.stderr
    assert "explain" not in json.loads(plain.stdout)
    result = vlmforge(*args, "--explain")
    explained = {line["name"]: line for line in json.loads(result.stdout)["explain"]}
    assert explained["max_multimodal_len"]["value"] == 1152
    assert explained["max_multimodal_len"]["formula"] == "max_batch_size x num_visual_features = 2 x 576"
    assert explained["visual_max_batch_size"]["formula"] == "visual.max_batch_size"
    two = vlmforge(*args, "--max-images-per-prompt", "2", "--explain")
    explained = {line["name"]: line for line in json.loads(two.stdout)["explain"]}
    assert explained["max_multimodal_len"]["value"] == 2304
    assert explained["max_multimodal_len"]["formula"] == (
        "max_batch_size x max_images_per_prompt x num_visual_features = 2 x 2 x 576")
    text = vlmforge("plan", "llava-1.5-7b-hf", "--explain")
    assert text.returncode == 0 and "derived values" in text.stdout and "max_multimodal_len" in text.stdout
