"""Contracts of the checkpoint step: config.json's fields are TensorRT-LLM 1.2's (trtllm_checkpoint_config.json,
read from its source), and every 1.2 plan's ``vlmforge checkpoint`` argv is one vlmforge's own CLI takes and that
reproduces the plan's spec."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import click
import pytest
import typer

from tests.contract.test_trtllm_flags import PLANS
from vlmforge.families import get_family
from vlmforge.modeling.trtllm import config as trt
from vlmforge.specs.schema import Dialect

pytestmark = pytest.mark.container  # runs inside NVIDIA's TensorRT-LLM 1.2 image: CI runs it again there

RECORD = json.loads(Path(__file__).with_name("trtllm_checkpoint_config.json").read_text())
CHECKPOINT_STEPS = [(label, plan, step) for label, plan in PLANS if plan.dialect is Dialect.V1_2
                    for step in plan.steps if step.name == "checkpoint"]


def test_the_field_lists_are_the_recorded_ones() -> None:
    record = RECORD["pretrained_config"]
    assert list(trt.PRETRAINED_REQUIRED) == record["required"]
    assert trt.PRETRAINED_OPTIONAL == record["optional"]
    assert list(trt.ALWAYS_WRITE) == record["non_obvious_defaults"]
    assert trt.QUANT_CONFIG_FIELDS == RECORD["quant_config"]["fields"]
    assert list(trt.QUANT_ALGOS) == RECORD["quant_algo"]
    assert list(trt.KV_CACHE_QUANT_ALGOS) == RECORD["kv_cache_quant_algo"]
    assert list(trt.POSITION_EMBEDDING_TYPES) == RECORD["position_embedding_type"]
    assert list(trt.MAPPING_KEYS) == RECORD["mapping"]["keys_written"]
    assert all("@" in source or "file id" in source or "functional.py" in source for source in RECORD["sources"].values())
    # what vlmforge writes for each quantization is a QuantAlgo (INT8 only ever for the KV cache)
    assert {a for a in trt.QUANT_ALGO.values() if a} <= set(RECORD["quant_algo"]) - set(RECORD["quant_algo_not_for_weights"])
    assert {a for a in trt.KV_CACHE_QUANT_ALGO.values() if a} <= set(RECORD["kv_cache_quant_algo"])


@functools.cache
def _cli() -> click.Command:
    from vlmforge.cli import _register
    from vlmforge.cli.app import app

    _register()
    return typer.main.get_command(app)


def test_every_12_plan_writes_its_checkpoint_with_vlmforge() -> None:
    assert len(CHECKPOINT_STEPS) > 60
    for label, plan, step in CHECKPOINT_STEPS:
        assert step.argv[:2] == ["vlmforge", "checkpoint"] and step.tool == "vlmforge", label
        build = next(s.argv for s in plan.steps if s.name == "build-llm")
        report = next(a.removeprefix("--report=") for a in step.argv if a.startswith("--report="))
        assert step.outputs == [build[build.index("--checkpoint_dir") + 1], report], label  # what trtllm-build reads
        assert "/trt_models/" not in report, label  # the flow removes trt_models/ after the build
    for label, plan in PLANS:
        names = [step.name for step in plan.steps]
        if plan.dialect is Dialect.V1_2 and not plan.derived.encoder_decoder:
            if getattr(get_family(plan.spec.family), "release_converter", False):  # no vlmforge writer: the release's converter
                assert "checkpoint" not in names and ("convert" in names or "quantize" in names), label
                continue
            assert "convert" not in names and "quantize" not in names, label  # only trtllm-build etc. stay in the image


@pytest.mark.parametrize("index", range(len(CHECKPOINT_STEPS)))
def test_the_argv_parses_with_the_cli_and_reproduces_the_spec(index: int) -> None:
    from vlmforge.cli.checkpoint import checkpoint_overrides, checkpoint_spec

    label, plan, step = CHECKPOINT_STEPS[index]
    command = _cli().commands["checkpoint"]  # type: ignore[attr-defined]
    with command.make_context("checkpoint", list(step.argv[2:])) as ctx:
        params: dict[str, Any] = dict(ctx.params)
    assert params["model_or_spec"] == step.inputs[0] and str(params["out"]) == step.outputs[0]
    assert str(params["report"]) == step.outputs[1]
    overrides = checkpoint_overrides(**{k: params[k] for k in (
        "quant", "kv_cache_dtype", "group_size", "calib_source", "calib_size", "calib_batch_size", "calib_seed",
        "tp", "pp", "dtype", "max_logit_error")})
    rebuilt, local = _spec_for_dir(checkpoint_spec, params["family"], overrides, Path(step.inputs[0]))
    spec = plan.spec
    assert local is not None and rebuilt.family == spec.family and rebuilt.dtype == spec.dtype, label
    assert rebuilt.parallel == spec.parallel, label
    assert rebuilt.validation.max_logit_error == spec.validation.max_logit_error, label
    expected = spec.quantization
    got = rebuilt.quantization
    assert (got.method, got.kv_cache_dtype) == (expected.method, expected.kv_cache_dtype), label
    if expected.method.grouped and expected.method.value != "int4_wo":
        assert got.group_size == expected.group_size, label
    if expected.needs_calibration:
        assert got.calibration == expected.calibration, label


def _spec_for_dir(checkpoint_spec: Any, family: str, overrides: dict[str, Any], model_dir: Path) -> Any:
    """checkpoint_spec on a stand-in directory with a config.json (the container's path does not exist here)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        stand_in = Path(tmp) / model_dir.name
        stand_in.mkdir()
        (stand_in / "config.json").write_text("{}")
        return checkpoint_spec(str(stand_in), family, overrides)


def test_values_that_look_like_options_stay_values() -> None:
    from vlmforge.plans.checkpoint import checkpoint_argv
    from vlmforge.specs.catalog import load_model_or_spec

    spec = load_model_or_spec("tiny-llava", {"quantization.method": "fp8", "quantization.calibration.source": "-set"})
    argv = checkpoint_argv(spec, "-model", "-out")
    with _cli().commands["checkpoint"].make_context("checkpoint", argv[2:]) as ctx:  # type: ignore[attr-defined]
        assert (ctx.params["model_or_spec"], str(ctx.params["out"]), ctx.params["calib_source"]) == ("-model", "-out", "-set")


def test_a_flag_the_cli_lacks_is_caught() -> None:
    command = _cli().commands["checkpoint"]  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="No such option: --calib_size"):  # typer's own copy of click's UsageError
        command.make_context("checkpoint", ["/m", "--family", "llava", "--out", "/o", "--calib_size", "4"])
