"""``deploy --backend trtllm-serve`` of a *quantized* hf build: with ``artifacts.hf_checkpoint`` its ``hf/`` is
ModelOpt's unified export of the whole VLM (tiny-gemma3, a family of trtllm-serve's multimodal matrix, with int4_awq
and fp8 + FP8 KV cache, 4 calibration samples). Built by the real pipeline, published to a local store and to S3
(moto), dry-run deployed (the pulled folder and the options shown), pulled for trtllm-serve and checked as the
deploy checks it (its quant_algo reported), and read back here independently: the pulled tensors dequantized into
the transformers model of the whole VLM give the logits of the fake-quant LLM the build served and validated, and
its vision tower is the float model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers.deploy import cli
from tests.helpers.runners import publish_tiny
from vlmforge.artifacts.engine_config import HF_CHECKPOINT_DIR, HF_CHECKPOINT_EXTRA, EngineConfig
from vlmforge.deploy.trtllm_deploy import SERVE_LEAVES_OUT
from vlmforge.deploy.trtllm_serve import ServeLimits, check_checkpoint
from vlmforge.families import resolve
from vlmforge.specs.catalog import load_model_or_spec
from vlmforge.store import open_store

pytestmark = pytest.mark.slow
LOOSE = {"min_token_agreement": 0.0, "max_logit_error": 10.0}
"""A random tiny LLM under int4 moves next-token logits by up to ~1 (these tests check the folder, not accuracy)."""
CASES = {
    "int4_awq": ({"method": "int4_awq", "group_size": 32, "calibration": {"size": 4}}, "W4A16_AWQ", None),
    "fp8": ({"method": "fp8", "kv_cache_dtype": "fp8", "calibration": {"size": 4}}, "FP8", "FP8"),
}


def overrides(case: str) -> dict:
    return {"artifacts": {"hf_checkpoint": True}, "quantization": CASES[case][0], "validation": LOOSE}


@pytest.mark.parametrize("case", list(CASES))
def test_a_quantized_build_publishes_pulls_and_reads_back_its_unified_whole_model_folder(
        case: str, store_url: str, build_workdir: Path, tmp_path: Path) -> None:
    import torch

    from vlmforge.modeling import modelopt as mo
    from vlmforge.toolchains.quantize.calibration import golden_set, llm_batches
    from vlmforge.toolchains.quantize.llm import batch_logits, compare_logits, standalone_llm
    from vlmforge.toolchains.quantize.whole import read_back_whole

    algo, kv = CASES[case][1], CASES[case][2]
    engine, published = publish_tiny("tiny-gemma3", build_workdir, store_url, **overrides(case))
    manifest = published.manifest
    recorded = manifest.extra[HF_CHECKPOINT_EXTRA]
    assert recorded == {"path": "hf", "architecture": "Gemma3ForConditionalGeneration", "dtype": "float16",
                        "kind": "unified", "quant_algo": algo, **({"kv_cache_quant_algo": kv} if kv else {})}
    assert EngineConfig.read(engine).hf_checkpoint.kind == "unified"  # type: ignore[union-attr]
    paths = {f.path for f in manifest.files}
    assert {"hf/config.json", "hf/hf_quant_config.json", "hf/model.safetensors", "hf/chat_template.jinja"} <= paths

    state, cache = tmp_path / "state", tmp_path / "cache"
    shown = cli("deploy", "tiny-gemma3", "--backend", "trtllm-serve", "--store", store_url, "--dry-run", "--json",
                state=state, cache=cache)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    folder = cache / "engines" / "tiny-gemma3" / manifest.build_id / HF_CHECKPOINT_DIR
    assert f"{folder}:/models/tiny-gemma3:ro" in data["docker_run"]
    assert f"ModelOpt unified checkpoint, {algo}" in data["checked"] and not folder.exists()
    options = yaml.safe_load(data["options_yaml"])
    assert options["max_seq_len"] == manifest.derived["max_seq_len"]

    with open_store(store_url) as store:  # what deploy_trtllm_serve pulls, then checks before any container
        store.pull_engine(manifest.ref, folder.parent, exclude=SERVE_LEAVES_OUT)
    assert not (folder.parent / "llm").exists()
    facts = check_checkpoint(folder, ServeLimits(max_batch_size=1, max_seq_len=256))
    assert (facts.architecture, facts.quantization) == ("Gemma3ForConditionalGeneration", algo)
    quant = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
    assert quant["kv_cache_quant_algo"] == kv and "vision_tower*" in quant["exclude_modules"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"] and "vision_config" in config
    assert config["quantization_config"]["quant_method"] == "modelopt"

    # read back: the pulled folder (LLM dequantized, float16 float tensors) against the LLM the build served
    resolved = resolve(load_model_or_spec("tiny-gemma3", overrides(case)))
    family = resolved.family
    (fetched,) = (build_workdir / "tiny-gemma3").glob("fetch-*")
    model = family.load_model(fetched / "model", torch.float32)
    processor = family.load_processor(fetched / "model")
    llm = standalone_llm(family, model)
    golden = llm_batches(family, model, processor, llm, golden_set(family), batch_size=3)
    served = mo.load_fake_quant(type(llm), engine / "llm", torch.float32)
    mo.round_weights_as_exported(served)  # int8/FP8 codes on a rounding tie: as the exporters round them
    with mo.kv_cache_quantizers_off(served):  # the KV cache is quantized in the engine's attention, not the tensors
        expected = batch_logits(served, golden)
    whole, back, _ = read_back_whole(resolved, folder, tmp_path / "scratch", "cpu")
    read = batch_logits(back, golden)
    reference = batch_logits(llm, golden)
    vs_served = compare_logits(read, expected, golden)
    assert vs_served.next_token_agreement == 1.0, vs_served
    assert vs_served.max_error <= 0.01 * compare_logits(read, reference, golden).scale, vs_served
    loaded = whole.state_dict()
    for name, value in model.model.vision_tower.state_dict().items():  # float16 as stored, the float model's
        got = loaded[f"model.vision_tower.{name}"]
        assert torch.equal(got, value.half().float()), name
    # the quantize stage recorded its own read-back (in float32, before the cast): in the flow's manifest too
    results = [json.loads(p.read_text()) for p in (build_workdir / "tiny-gemma3").glob("quantize-*/_stage.json")]
    mine = [r["result"]["hf_checkpoint"] for r in results
            if (r.get("result") or {}).get("hf_checkpoint", {}).get("quant_algo") == algo]
    assert mine and mine[0]["readback_vs_exported"]["max_error"] <= mine[0]["tolerance"]
    assert mine[0]["float_tensors_checked"] > 0 and mine[0]["quantized_linears"] > 0
