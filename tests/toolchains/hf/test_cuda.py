"""The hf hooks with the model on a GPU: every tensor made where the model is, results back on the CPU.

Skipped where torch sees no CUDA device (CI, laptops).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.tiny import HF_FAMILIES, pack_features
from vlmforge.families import get_family
from vlmforge.modeling.generation import compare_generations
from vlmforge.modeling.quantized import load_quantized, lowbit_kernels, quantize_and_save
from vlmforge.specs.catalog import catalog_specs
from vlmforge.toolchains.hf.onnx import compare_onnx, export_onnx
from vlmforge.toolchains.hf.saving import save_pretrained_as

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MAX_NEW_TOKENS = 8


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_split_pipeline_on_cuda(name: str, tmp_path: Path) -> None:
    family = get_family(name)
    family.make_tiny(tmp_path / "model")
    model = family.load_model(tmp_path / "model", torch.float32, device="cuda")
    processor = family.load_processor(tmp_path / "model")
    prompt = family.format_prompt(family.golden_prompt)
    images = family.golden_images()
    inputs = family.visual_inputs(processor, images)  # anyres: every image's tiles; Qwen2-VL, Mistral3: patch rows
    pixel_values = inputs.pixels
    assert pixel_values.device.type == "cpu" and pixel_values.dtype == torch.float32
    visual = family.visual_module(model)
    inputs.pixels = pixel_values.to("cuda")
    with torch.no_grad():  # as the visual engine is run: several-input families on their own feeds
        outputs = family.visual_outputs(visual, inputs)
    assert outputs.device.type == "cuda"
    features = pack_features(family, processor, images, outputs, model, tmp_path / "extras")  # one per image

    llm_dir = save_pretrained_as(family.extract_llm(model), tmp_path / "llm", torch.float32)
    llm = family.llm_class().from_pretrained(llm_dir, dtype=torch.float32).to("cuda").eval()
    for i, image in enumerate(images):
        ref = family.reference_generate(model, processor, image, prompt, MAX_NEW_TOKENS)
        got = family.generate(llm, processor, features[i], prompt, MAX_NEW_TOKENS)
        assert got.logits.device.type == "cpu" and got.logits.dtype == torch.float32
        comparison = compare_generations(ref, got)
        assert comparison.exact and comparison.prefix_logit_error < 1e-3

    if not family.visual_engine_axes:  # several-input engines are exported on their feeds (their family tests)
        info = export_onnx(visual, tmp_path / "visual.onnx", pixel_values[:2])
        report = compare_onnx(info.path, visual, pixel_values)
        assert report["max_rel_to_scale"] < family.logit_scale_tolerance, report

    if family.quantizable:  # torch's int8/int4 kernels on the GPU compute what they compute on the CPU
        float_llm = family.llm_class().from_pretrained(llm_dir, dtype=torch.float32).eval()
        for weights, tolerance in (("int8", 1e-3), ("int4", 0.05)):  # int4 on CUDA: bfloat16 activations (tinygemm)
            quantize_and_save(float_llm, tmp_path / weights, weights, group_size=64)
            on_gpu = load_quantized(family.llm_class(), tmp_path / weights, torch.float32, "cuda")
            on_cpu = load_quantized(family.llm_class(), tmp_path / weights, torch.float32, "cpu")
            assert lowbit_kernels(on_gpu).get("_weight_int4pack_mm" if weights == "int4" else "int8_cast_in_linear")
            cpu = family.generate(on_cpu, processor, features[0].cpu(), prompt, MAX_NEW_TOKENS)
            gpu = family.generate(on_gpu, processor, features[0], prompt, MAX_NEW_TOKENS)
            assert (gpu.logits[0] - cpu.logits[0]).abs().max().item() < tolerance


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_catalog_thresholds_hold_on_cuda(name: str, tmp_path: Path) -> None:
    """The tiny catalog entry's validation settings, in its dtype on the GPU, against the float32 reference."""
    family = get_family(name)
    spec = next(spec for spec in catalog_specs() if spec.source == family.tiny_source)
    dtype, steps = getattr(torch, spec.dtype.value), spec.validation.max_new_tokens
    family.make_tiny(tmp_path / "model")
    reference = family.load_model(tmp_path / "model", torch.float32, device="cuda")
    model = family.load_model(tmp_path / "model", dtype, device="cuda")
    processor = family.load_processor(tmp_path / "model")
    prompt = family.format_prompt(family.golden_prompt)
    images = family.golden_images()
    inputs = family.visual_inputs(processor, images)
    inputs.pixels = inputs.pixels.to("cuda")
    with torch.no_grad():
        outputs = family.visual_outputs(family.visual_module(model), inputs)
    features = pack_features(family, processor, images, outputs, model, tmp_path / "extras")
    llm = family.extract_llm(model)
    refs = [family.reference_generate(reference, processor, image, prompt, steps) for image in images]

    def score(feats: list[torch.Tensor]) -> tuple[float, float]:
        comparisons = [compare_generations(ref, family.generate(llm, processor, feats[i], prompt, steps))
                       for i, ref in enumerate(refs)]
        return (sum(c.token_agreement for c in comparisons) / len(comparisons),
                max(c.first_step_logit_error for c in comparisons))

    agreement, error = score(features)
    assert agreement >= spec.validation.min_token_agreement and error <= spec.validation.max_logit_error
    agreement, error = score(features[1:] + features[:1])
    assert agreement < spec.validation.min_token_agreement or error > spec.validation.max_logit_error
