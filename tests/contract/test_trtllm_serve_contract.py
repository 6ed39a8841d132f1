"""vlmforge's trtllm-serve backend against TensorRT-LLM's own definitions (trtllm_serve.json, read from the
release's source; README.md says where and how): the serve options of the command it runs, every key of the
options file it writes, the health and metrics endpoints it relies on, what trtllm-llmapi-launch does to the
command, and the command and options file of every catalog model the release's support matrix lists as
multimodal (the others are refused before anything starts)."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from vlmforge.deploy import trtllm_serve as ts
from vlmforge.deploy.launchers import base as launch_base
from vlmforge.deploy.launchers.trtllm import trtllm_ok
from vlmforge.errors import DeployError
from vlmforge.families import resolve
from vlmforge.specs.catalog import catalog_specs

CONTRACT = json.loads((Path(__file__).parent / "trtllm_serve.json").read_text())
OPTIONS = CONTRACT["serve"]["options"]
FLAGS = {flag: (name, option) for name, option in OPTIONS.items() for flag in option["flags"]}
FIELDS = CONTRACT["llm_api"]["fields"]
KV_FIELDS = CONTRACT["llm_api"]["KvCacheConfig"]
TYPES = {"int": int, "float": float, "bool": bool}


def serve_words(argv: list[str]) -> list[str]:
    """What follows ``trtllm-llmapi-launch`` in the container's command."""
    return argv[argv.index("trtllm-llmapi-launch") + 1:]


def parse_serve(words: list[str]) -> dict[str, Any]:
    """``trtllm-serve serve MODEL --opt VALUE ...`` parsed against the recorded options (AssertionError on any
    word the release would refuse)."""
    assert words[:2] == ["trtllm-serve", CONTRACT["serve"]["subcommand"]]
    model, rest = words[2], words[3:]
    assert not model.startswith("-"), "MODEL is serve's positional argument"
    parsed: dict[str, Any] = {"model": model}
    index = 0
    while index < len(rest):
        flag = rest[index]
        assert flag in FLAGS or flag == "--no-telemetry", f"{flag} is not an option of trtllm-serve serve"
        name, option = FLAGS.get(flag, ("telemetry", OPTIONS["telemetry"]))
        assert name not in parsed, f"{flag} given twice"
        if option["value"].startswith("flag"):
            parsed[name] = flag != "--no-telemetry"
            index += 1
            continue
        value = rest[index + 1]
        assert not value.startswith("--"), f"{flag} needs a value"
        if option["value"] in ("int", "float"):
            TYPES[option["value"]](value)
        if "choices" in option:
            assert value in option["choices"], f"{flag} {value} is not one of {option['choices']}"
        parsed[name] = value
        index += 2
    return parsed


def check_options(options: dict[str, Any]) -> None:
    """Every key of an options file is a TorchLlmArgs field (they forbid unknown keys) with a value of its type."""
    def check(value: Any, declared: dict[str, Any], path: str) -> None:
        base = declared["type"].removeprefix("Optional[").removesuffix("]")
        if base in TYPES:
            assert type(value) is TYPES[base] or (base == "float" and type(value) is int), f"{path}: {value!r}"
        if "ge" in declared:
            assert declared["ge"] <= value <= declared["le"], path

    for key, value in options.items():
        assert key in FIELDS, f"{key} is no LLM-API field: the release's options file refuses it"
        assert key not in CONTRACT["serve"]["server_only_yaml_keys"]
        if key == "kv_cache_config":
            for sub, subvalue in value.items():
                assert sub in KV_FIELDS, f"kv_cache_config.{sub} is no KvCacheConfig field"
                check(subvalue, KV_FIELDS[sub], f"kv_cache_config.{sub}")
        else:
            check(value, FIELDS[key], key)


def generated(limits: ts.ServeLimits, model: str = "m") -> tuple[list[str], dict[str, Any]]:
    argv = ts.serve_argv(model_name=model, ranks=limits.ranks, host="127.0.0.1", port=8123)
    return argv, yaml.safe_load(ts.llm_api_options(limits).to_yaml())


def test_the_command_uses_only_options_the_release_has_and_sets_each_value_in_one_place() -> None:
    limits = ts.ServeLimits(max_batch_size=4, max_seq_len=4096, tp=2, pp=2, kv_cache_fraction=0.5)
    argv, options = generated(limits)
    assert argv[:5] == ["mpirun", "-n", "4", "--allow-run-as-root", "--bind-to"]
    parsed = parse_serve(serve_words(argv))
    assert parsed["model"] == str(ts.MODELS_DIR / "m") and parsed["served_model_name"] == "m"
    assert parsed["extra_llm_api_options"] == str(ts.OPTIONS_PATH) and parsed["telemetry"] is False
    assert parsed["host"] == "127.0.0.1" and parsed["port"] == "8123"
    # an engine setting typed on the command line overrides the file and rebuilds kv_cache_config: none is typed
    engine = {"max_batch_size", "max_seq_len", "max_num_tokens", "tensor_parallel_size", "pipeline_parallel_size",
              "free_gpu_memory_fraction", "kv_cache_dtype"}
    assert not engine & set(parsed)
    check_options(options)
    assert options["tensor_parallel_size"] == 2 and options["pipeline_parallel_size"] == 2
    assert options["max_num_tokens"] >= options["max_seq_len"]
    assert options["kv_cache_config"] == {"free_gpu_memory_fraction": 0.5, "enable_block_reuse": False}


def test_every_field_vlmforge_writes_is_recorded_with_its_type() -> None:
    def recorded(model: type, table: dict[str, Any]) -> None:
        hints = typing.get_type_hints(model)
        for name in model.model_fields:
            assert name in table, f"{model.__name__}.{name} is not a recorded LLM-API field"
            declared = table[name]["type"].removeprefix("Optional[").removesuffix("]")
            if declared in TYPES:
                ours = typing.get_args(hints[name])[0] if typing.get_args(hints[name]) else hints[name]
                assert ours is TYPES[declared], name

    recorded(ts.LlmApiOptions, FIELDS)
    recorded(ts.KvCacheOptions, KV_FIELDS)


def test_health_and_metrics_are_what_the_release_serves() -> None:
    endpoints = CONTRACT["endpoints"]
    assert ts.HEALTH_PATH == endpoints["health"]["path"]
    assert "f\"{url}/health\"" in Path(launch_base.__file__).read_text()  # what wait_healthy polls
    assert trtllm_ok(200, b"") and not trtllm_ok(503, b"LLM is unavailable")
    assert ts.METRICS_PATHS == (endpoints["metrics"]["path"], endpoints["prometheus"]["path"])
    options = ts.llm_api_options(ts.ServeLimits(max_batch_size=1, max_seq_len=64))
    assert options.enable_iter_perf_stats and "enable_iter_perf_stats" in endpoints["metrics"]["needs"]
    assert options.return_perf_metrics and "return_perf_metrics" in endpoints["prometheus"]["needs"]


@pytest.mark.parametrize("word", ["my model", "a*b", "x?", "$HOME", "a'b", "tab\tx"])
def test_words_trtllm_llmapi_launch_would_split_or_expand_are_refused(word: str) -> None:
    assert "unquoted" in CONTRACT["launch"]["command"]
    with pytest.raises(DeployError, match="trtllm-llmapi-launch"):
        ts.serve_argv(model_name=word, ranks=1, host="127.0.0.1", port=8000)


def test_the_support_matrix_is_the_recorded_one() -> None:
    assert ts.MULTIMODAL_ARCHITECTURES == frozenset(CONTRACT["multimodal_architectures"])
    assert ts.RELEASE == CONTRACT["release"]["version"] and ts.default_image({}) == CONTRACT["release"]["image"]
    assert ts.default_image({ts.IMAGE_ENV: "mirror/trtllm:1.4.0rc1"}) == "mirror/trtllm:1.4.0rc1"


def catalog_architecture(spec: Any, tmp: Path) -> str:
    """A catalog model's config.json architecture: a tiny model is made and read; a real one is recorded."""
    if spec.is_tiny:
        folder = tmp / spec.name
        resolve(spec).family.make_tiny_source(spec.source, folder)
        return json.loads((folder / "config.json").read_text())["architectures"][0]
    table = CONTRACT["catalog_architectures"]
    assert spec.family in table, f"record the architecture of {spec.name}'s real checkpoint under {spec.family!r}"
    return table[spec.family]


def test_every_catalog_model_is_served_as_the_matrix_says(tmp_path: Path) -> None:
    served = []
    for spec in catalog_specs():
        architecture = catalog_architecture(spec, tmp_path)
        derived = resolve(spec).derived
        limits = ts.ServeLimits.from_manifest(spec.model_dump(mode="json"), derived.model_dump(mode="json"))
        if architecture not in CONTRACT["multimodal_architectures"]:
            config = tmp_path / "refused" / spec.name
            config.mkdir(parents=True)
            (config / "config.json").write_text(json.dumps({"architectures": [architecture]}))
            with pytest.raises(DeployError, match="does not list"):
                ts.check_checkpoint(config, limits)
            continue
        served.append(spec.name)
        argv, options = generated(limits, spec.name)
        parse_serve(serve_words(argv))
        check_options(options)
        assert options["max_batch_size"] == spec.limits.max_batch_size
        assert options["max_seq_len"] == derived.max_seq_len
        assert options["tensor_parallel_size"] == spec.parallel.tp
        assert argv[argv.index("-n") + 1] == str(derived.world_size)
    # Every family's real architecture is recorded (a new family without its row fails above). VILA1.5's layout
    # (LlavaLlamaModel), LLaVA-NeXT (LlavaNextForConditionalGeneration), Qwen2-VL
    # (Qwen2VLForConditionalGeneration, its tiny model built here), Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration,
    # idem), Gemma 3 (Gemma3ForConditionalGeneration) and Mistral-Small-3.1 (Mistral3ForConditionalGeneration) are in
    # the matrix; VILA 1.0, LLaVA-1.5, LLaVA-OneVision (LlavaOnevisionForConditionalGeneration), BLIP-2, Nougat,
    # Pix2Struct (Pix2StructForConditionalGeneration: DePlot, tiny-pix2struct) and Llama-3.2-Vision
    # (MllamaForConditionalGeneration) are not
    assert served == ["llava-v1.6-mistral-7b-hf", "llava-v1.6-vicuna-7b-hf", "Qwen2-VL-2B-Instruct",
                      "Qwen2-VL-7B-Instruct", "Qwen2.5-VL-3B-Instruct", "Qwen2.5-VL-7B-Instruct",
                      "Qwen2.5-VL-72B-Instruct", "gemma-3-4b-it", "gemma-3-12b-it", "gemma-3-27b-it",
                      "Mistral-Small-3.1-24B-Instruct-2503", "tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl",
                      "tiny-vila", "tiny-gemma3", "tiny-mistral3"]
