"""The hf toolchain builds and serves every quantization of a tiny model: int8/int4 weight-only on torch's low-bit
kernels, AWQ, W4A8, SmoothQuant, FP8 and quantized KV caches as ModelOpt's calibrated fake-quant LLM; the spec's
accuracy gate applies to each."""

from __future__ import annotations

from typing import Any

import pytest

from vlmforge.build.pipeline import HfPipeline
from vlmforge.build.workdir import Workdir
from vlmforge.errors import SpecError, ToolchainUnavailable, ValidationFailed
from vlmforge.families import resolve
from vlmforge.specs.catalog import load_model_or_spec
from vlmforge.toolchains.hf.stages import check_supported

# (model, method, KV cache, min agreement, max logit error): thresholds with room over what these random tiny LLMs
# measured on the CPU with 4 calibration samples (agreement / next-token logit error in the comments). They are
# fragile under int4 (top-2 logit gaps of 0.003), so agreement is low by nature; the logit error is the sharper gate.
CASES = [
    ("tiny-llava", "int8_wo", "auto", 0.9, 0.06),    # 1.0 / 0.029
    ("tiny-llava", "int4_wo", "auto", 0.4, 0.5),     # 0.69 / 0.27
    ("tiny-llava", "int4_awq", "auto", 0.3, 0.5),    # 0.5 / 0.30
    ("tiny-llava", "w4a8_awq", "auto", 0.3, 0.6),    # 0.5 / 0.35
    ("tiny-llava", "int8_sq", "auto", 0.4, 0.6),     # 0.73 / 0.35
    ("tiny-llava", "fp8", "fp8", 0.25, 0.3),         # 0.48 / 0.11
    ("tiny-llava", "none", "int8", 0.5, 0.05),       # 0.79 / 0.0099
    ("tiny-blip2-opt", "int4_awq", "auto", 0.4, 0.5),  # 0.67 / 0.30
    ("tiny-blip2-opt", "int8_wo", "auto", 0.5, 0.06),  # 0.67 / 0.019
    # VILA's tiny LLaMA (init 0.08, larger logits, more near-ties): both on-disk layouts
    ("tiny-vila", "int4_awq", "auto", 0.1, 1.2),
    ("tiny-vila1.0", "int8_sq", "auto", 0.1, 1.0),  # 0.19 / 0.68
    # the later families, calibrated on their own prefixes (anyres tiles and newlines, M-RoPE positions, Gemma3's
    # bidirectional image blocks); measured 2026-12-05
    ("tiny-llava-next", "int4_awq", "auto", 0.3, 0.6),        # 0.47 / 0.32
    ("tiny-llava-onevision", "int8_wo", "auto", 0.8, 0.12),   # 1.0 / 0.070
    ("tiny-qwen2-vl", "int4_awq", "auto", 0.3, 0.9),          # 0.53 / 0.58
    ("tiny-gemma3", "int8_wo", "auto", 0.8, 0.1),             # 1.0 / 0.049
    ("tiny-gemma3", "int4_awq", "auto", 0.05, 1.0),           # 0.14 / 0.64
    ("tiny-qwen2.5-vl", "int8_wo", "auto", 0.8, 0.07),        # 0.98 / 0.035
    ("tiny-mistral3", "int4_awq", "auto", 0.2, 0.7),          # 0.41 / 0.41
    ("tiny-fuyu", "int8_wo", "auto", 0.8, 0.12),              # 0.94 / 0.071
    ("tiny-kosmos-2", "int4_awq", "auto", 0.6, 0.8),          # 0.92 / 0.54
    ("tiny-mllama", "fp8", "auto", 0.3, 0.2),                 # 0.52 / 0.13 (cross-attention states calibrated too)
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Workdir:
    return Workdir(tmp_path_factory.mktemp("quantized-builds"))


def build(workdir: Workdir, model: str, **overrides: Any) -> tuple[HfPipeline, Any, Any, Any]:
    spec = load_model_or_spec(model, {"quantization.group_size": 64, "quantization.calibration.size": 4, **overrides})
    pipeline = HfPipeline(spec, workdir, device="cpu")
    fetched = pipeline.fetch()
    converted = pipeline.convert(fetched)
    quantized = pipeline.quantize(converted)
    llm = pipeline.build_llm(converted, quantized)
    engine = pipeline.assemble(pipeline.build_visual(fetched), llm, converted)
    return pipeline, quantized, engine, pipeline.validate(engine, fetched)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-kv{c[2]}")
def test_each_quantization_builds_validates_and_serves(case: tuple[Any, ...], workdir: Workdir) -> None:
    from vlmforge.modeling import modelopt as mo
    from vlmforge.modeling.quantized import lowbit_kernels
    from vlmforge.runner.engine import HfEngine

    model, method, kv, agreement, error = case
    _, quantized, engine, validation = build(workdir, model, **{
        "quantization.method": method, "quantization.kv_cache_dtype": kv,
        "validation.min_token_agreement": agreement, "validation.max_logit_error": error})
    result = quantized.result
    lowbit = method.endswith("_wo")
    assert result["format"] == ("lowbit" if lowbit else "modelopt")
    assert (result["calibration"] is None) == lowbit and (result["modelopt"] is None) == lowbit
    assert validation.result["passed"] and validation.result["token_agreement"] >= agreement
    served = HfEngine(engine.path, device="cpu")
    assert served.config.llm.format == result["format"] and served.config.llm.kv_cache_dtype == kv
    if lowbit:
        assert result["bytes_after"] < (0.75 if method == "int8_wo" else 0.6) * result["bytes_before"]  # float head and embeddings
        kernel = "_weight_int8pack_mm" if method == "int8_wo" else "_weight_int4pack_mm_for_cpu"
        assert set(lowbit_kernels(served.llm)) == {kernel, "float"}
    else:
        summary = mo.quantizer_summary(served.llm)
        assert ("k_bmm" in summary and "v_bmm" in summary) == (kv != "auto")
        assert ("weight" in summary) == (method != "none")


def test_the_gate_refuses_a_quantized_build(workdir: Workdir) -> None:
    with pytest.raises(ValidationFailed, match="nothing is published"):
        build(workdir, "tiny-llava", **{"quantization.method": "int4_awq", "validation.max_logit_error": 0.01})


def test_other_calibration_data_redoes_only_the_quantization(workdir: Workdir) -> None:
    base = {"quantization.method": "fp8", "validation.min_token_agreement": 0.0, "validation.max_logit_error": 5.0}
    first, quantized, _, _ = build(workdir, "tiny-llava", **base)
    spec = load_model_or_spec("tiny-llava", {"quantization.group_size": 64, "quantization.calibration.size": 4,
                                             "quantization.calibration.seed": 7, **base})
    again = HfPipeline(spec, workdir, device="cpu")
    converted = again.convert(again.fetch())
    assert converted.skipped
    other = again.quantize(converted)
    assert not other.skipped and other.record.fingerprint != quantized.record.fingerprint
    assert other.result["calibration"]["digest"] != quantized.result["calibration"]["digest"]


def test_what_the_hf_toolchain_refuses(workdir: Workdir) -> None:
    with pytest.raises(ToolchainUnavailable, match="weight-only LLMs on real int8/int4 kernels with a float KV cache"):
        check_supported(resolve(load_model_or_spec("tiny-llava", {"quantization.method": "int4_wo",
                                                                  "quantization.kv_cache_dtype": "int8"})))
    with pytest.raises(SpecError, match="encoder-decoder"):
        resolve(load_model_or_spec("tiny-nougat", {"quantization.method": "int8_wo"}))
    # the int4 groups are checked against the LLM's layers before calibration
    with pytest.raises(SpecError, match="group_size 128 does not divide the LLM's layer input widths") as err:
        build(workdir, "tiny-llava", **{"quantization.method": "int4_awq", "quantization.group_size": 128})
    assert err.value.path == "quantization.group_size"
