"""The hf toolchain's family hooks on every family's tiny model (CPU, float32 unless said)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.tiny import (
    HF_FAMILIES,
    MAX_NEW_TOKENS,
    QUANTIZABLE,
    TINY_MODELS,
    TinyCache,
    dir_digest,
    family_of_tiny,
    tiny_spec,
)
from vlmforge.errors import ToolchainUnavailable
from vlmforge.families import ResolvedSpec, family_names, get_family, resolve
from vlmforge.families.base import ArchitectureFacts, ModelFamily
from vlmforge.families.tinykit import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, UNK_ID
from vlmforge.modeling.generation import GenResult, compare_generations, teacher_forced_logits
from vlmforge.modeling.quantized import load_quantized, quantize_and_save
from vlmforge.specs.catalog import catalog_specs
from vlmforge.toolchains.hf.onnx import compare_onnx, run_onnx
from vlmforge.toolchains.hf.saving import safetensors_size, save_pretrained_as

HF_HOOKS = (
    "make_tiny", "hf_model_class", "load_model", "load_processor", "architecture_facts", "format_prompt",
    "pixel_values", "visual_module", "extract_llm", "llm_class", "llm_prefix", "reference_generate",
)
# the hooks ModelFamily gives no default for (they raise NotImplementedError): every hf family must write them
REQUIRED_HOOKS = tuple(hook for hook in HF_HOOKS
                       if "raise NotImplementedError" in inspect.getsource(getattr(ModelFamily, hook)))
LOGIT_TOL = 1e-4


def generate_all(tiny: Any, llm: Any, features: list[torch.Tensor]) -> list[GenResult]:
    """Each image's features (one [1, N, hidden] tensor per golden image) through the LLM alone."""
    return [tiny.family.generate(llm, tiny.processor, part, tiny.prompt, MAX_NEW_TOKENS) for part in features]


def save_and_reload_llm(tiny: Any, dtype: torch.dtype, name: str) -> Any:
    llm_dir = save_pretrained_as(tiny.family.extract_llm(tiny.model), tiny.work / name, dtype)
    return tiny.family.llm_class().from_pretrained(llm_dir, dtype=dtype).eval()


# --- the contract ---------------------------------------------------------------------------


REMOTE_CODE_FAMILIES = {"internvl", "phi3_vision", "cogvlm", "internlm_xcomposer2", "neva"}
"""Families whose checkpoints need their own model code (vlmforge.families.release_llm.RemoteCodeFamily)."""


def test_every_hf_family_implements_every_hook() -> None:
    assert all(callable(getattr(ModelFamily, hook)) for hook in HF_HOOKS)
    assert {"hf_model_class", "make_tiny", "visual_module", "llm_prefix"} <= set(REQUIRED_HOOKS)
    plan_only = {name for name in family_names() if not get_family(name).hf_supported}
    # every family builds on hf (qwen2_vl too, since issue 15) but the remote-code ones, plan-only by design
    assert plan_only == REMOTE_CODE_FAMILIES
    for name in plan_only:
        assert "remote code" in get_family(name).hf_unsupported_reason and "--toolchain trtllm" in \
            get_family(name).hf_unsupported_reason
    assert set(HF_FAMILIES) == set(family_names()) - plan_only >= {"llava", "blip2-opt", "blip2-t5", "nougat", "vila"}
    assert {"vila", "vila1.0"} <= set(TINY_MODELS)
    catalog_sources = {spec.source for spec in catalog_specs()}
    for name in HF_FAMILIES:
        cls = type(get_family(name))
        missing = [hook for hook in REQUIRED_HOOKS if getattr(cls, hook) is getattr(ModelFamily, hook)]
        assert not missing, f"{name} lacks the hf hooks {missing}"
        assert cls.tiny_source, f"{name} has no tiny model"
        assert set(get_family(name).tiny_sources()) <= catalog_sources, f"{name}: a tiny model without a catalog entry"


def test_a_family_without_hf_support_is_refused_by_both_toolchains() -> None:
    """The refusal on a stand-in (llava_next and qwen2_vl, plan-only, are refused in tests/plans); every family with
    hf support passes the trtllm flow's check."""
    from vlmforge.toolchains.hf.stages import check_supported
    from vlmforge.toolchains.trtllm.execute import check_buildable

    class NoHf(type(get_family("llava"))):  # type: ignore[misc]
        hf_supported = False
        hf_unsupported_reason = "needs its own code base"

    resolved = resolve(catalog_specs()[0])
    with pytest.raises(ToolchainUnavailable, match="needs its own code base"):
        check_supported(ResolvedSpec(resolved.spec, NoHf(), resolved.derived))
    with pytest.raises(ToolchainUnavailable, match="vlmforge plan"):
        check_buildable(NoHf())
    for name in HF_FAMILIES:
        check_buildable(get_family(name))


# --- tiny models ----------------------------------------------------------------------------


@pytest.mark.container  # the reference that validation runs inside NVIDIA's image
@pytest.mark.parametrize("name", TINY_MODELS)
def test_make_tiny_is_deterministic(name: str, tiny: TinyCache, tmp_path: Path) -> None:
    family, first = family_of_tiny(name), tiny(name).model_dir
    family.make_tiny_source(f"tiny://{name}", tmp_path / "again", seed=0)
    family.make_tiny_source(f"tiny://{name}", tmp_path / "seed1", seed=1)
    assert (first / "config.json").is_file() and list(first.rglob("*.safetensors"))
    assert dir_digest(first) == dir_digest(tmp_path / "again")
    assert dir_digest(first) != dir_digest(tmp_path / "seed1")


@pytest.mark.container  # the reference that validation runs inside NVIDIA's image
@pytest.mark.parametrize("name", TINY_MODELS)
def test_processor_and_tokenizer_load_offline(name: str, tiny: TinyCache, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    import huggingface_hub.constants
    from transformers import AutoProcessor

    family, model_dir = family_of_tiny(name), tiny(name).model_dir
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert family.missing_processor_files(model_dir) == []
    processor = family.load_processor(model_dir)
    if type(family).load_processor is ModelFamily.load_processor:  # the family's processor is transformers' own
        assert type(AutoProcessor.from_pretrained(model_dir)) is type(processor)
    # what the convert and LLM stages save, and the runner loads back
    processor.save_pretrained(tmp_path / "processor")
    assert family.missing_processor_files(tmp_path / "processor") == []
    assert type(family.load_processor(tmp_path / "processor")) is type(processor)
    tokenizer = processor.tokenizer
    specials = {"<s>": BOS_ID, "<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID, "<image>": IMAGE_ID}
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in specials} == specials
    text = "Question: which city is this? Answer:"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


@pytest.mark.container  # the reference that validation runs inside NVIDIA's image
@pytest.mark.parametrize("name", TINY_MODELS)
def test_architecture_facts_match_the_catalog(name: str, tiny: TinyCache) -> None:
    family = family_of_tiny(name)
    config = json.loads((tiny(name).model_dir / "config.json").read_text())
    arch = tiny_spec(name).architecture
    derived = resolve(tiny_spec(name)).derived.num_visual_features  # size-dependent: at visual.max_image_size
    facts = family.checkpoint_facts(tiny(name).model_dir, config)  # pix2struct: max_patches beside config.json
    if family.name in {"qwen2_vl", "qwen2_5_vl", "fuyu"}:  # no pixel limits / target in config.json: the real cap
        assert facts.num_attention_heads == arch.num_attention_heads and facts.num_visual_features >= derived
    else:
        assert facts == ArchitectureFacts(derived, arch.num_attention_heads)
    counts = [part[0, ..., 0].numel() for part in tiny(name).features]  # qwen2_vl's are grids [1, h, w, hidden]
    # pix2struct: each image's real patches, at most max_patches (its golden 64x64 image fills them all); mllama: an
    # image's real tiles, at most 4
    varying = family.size_dependent_tokens or family.name in {"pix2struct", "mllama"}
    if name == "pix2struct-vqa":  # a header is rendered above each image (another shape): at most max_patches
        assert 0 < max(counts) <= derived
    else:
        assert max(counts) == derived if varying else set(counts) == {derived}


# Trimmed config.json of the real checkpoints (defaults left out, as the hub files do).
REAL_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llava-1.5-7b-hf": ("llava", {
        "model_type": "llava", "vision_feature_select_strategy": "default", "vision_feature_layer": -2,
        "vision_config": {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14,
                          "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
        "text_config": {"model_type": "llama", "vocab_size": 32064},
    }),
    "llava-1.5-13b-hf": ("llava", {
        "model_type": "llava", "vision_feature_select_strategy": "default",
        "vision_config": {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14},
        "text_config": {"model_type": "llama", "hidden_size": 5120, "num_attention_heads": 40},
    }),
    "opt-2.7b": ("blip2-opt", {
        "model_type": "blip-2", "num_query_tokens": 32,
        "text_config": {"model_type": "opt", "hidden_size": 2560, "num_attention_heads": 32},
    }),
    "flan-t5-xxl": ("blip2-t5", {
        "model_type": "blip-2", "num_query_tokens": 32,
        "text_config": {"model_type": "t5", "d_model": 4096, "num_heads": 64},
    }),
    # VILA 1.0: LLaVA-1.5's config.json as VILA's v1.0 training scripts write it (the hub files were not seen)
    **{name: ("vila", {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": hidden,
        "num_attention_heads": heads, "vocab_size": 32000, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
    }) for name, hidden, heads in (("vila-2.7B", 2560, 20), ("vila-7B", 4096, 32), ("vila-13B", 5120, 40))},
    "nougat-base": ("nougat", {
        "model_type": "vision-encoder-decoder",
        "encoder": {"model_type": "donut-swin", "image_size": [896, 672], "patch_size": 4, "embed_dim": 128,
                    "depths": [2, 2, 14, 2], "num_heads": [4, 8, 16, 32], "window_size": 7},
        "decoder": {"model_type": "mbart", "d_model": 1024, "decoder_attention_heads": 16, "decoder_layers": 10},
    }),
}


@pytest.mark.parametrize("model", sorted(REAL_CONFIGS))
def test_architecture_facts_of_real_checkpoints(model: str) -> None:
    family_name, config = REAL_CONFIGS[model]
    arch = next(spec for spec in catalog_specs() if spec.name == model).architecture
    facts = get_family(family_name).architecture_facts(config)
    assert facts == ArchitectureFacts(arch.num_visual_features, arch.num_attention_heads)


def test_format_prompt() -> None:
    llava, opt, t5, nougat = (get_family(n) for n in ("llava", "blip2-opt", "blip2-t5", "nougat"))
    assert llava.format_prompt("Hi?") == "USER: <image>\nHi? ASSISTANT:"
    assert llava.format_prompt(llava.format_prompt("Hi?")) == "USER: <image>\nHi? ASSISTANT:"
    assert llava.format_prompt(None) == "USER: <image>\nDescribe the image. ASSISTANT:"
    assert (opt.format_prompt("a photo of"), opt.format_prompt(None)) == ("a photo of", None)
    assert (t5.format_prompt("a photo of"), t5.format_prompt(None)) == ("a photo of", t5.golden_prompt)
    assert (nougat.format_prompt("ignored"), nougat.format_prompt(None)) == (None, None)
    vila = get_family("vila")  # the user's turn; the checkpoint's chat template is added with its processor
    assert vila.format_prompt("Hi?") == vila.format_prompt(vila.format_prompt("Hi?")) == "<image>\nHi?"
    assert vila.format_prompt("<image> then text") == "<image> then text"
    assert vila.format_prompt(None) == "<image>\nDescribe the image."


# --- the split pipeline: visual module -> LLM alone ---------------------------------------------


@pytest.mark.container  # the reference that validation runs inside NVIDIA's image
@pytest.mark.parametrize("name", TINY_MODELS)
def test_llm_alone_fed_visual_features_matches_the_reference(name: str, tiny: TinyCache) -> None:
    t = tiny(name)
    assert t.pixel_values.dtype == torch.float32 and len(t.features) == 3
    assert t.pixel_values.shape[1] == 3 or t.family.visual_engine_axes  # images, or qwen2_vl's patch rows
    llm = save_and_reload_llm(t, torch.float32, "llm_fp32")
    assert type(llm) is type(t.family.extract_llm(t.model))  # llm_class may be an Auto class (llava_next)
    for ref, got in zip(t.refs, generate_all(t, llm, t.features), strict=True):
        assert got.tokens == ref.tokens
        assert got.logits.dtype == torch.float32 and got.logits.device.type == "cpu"
        assert got.logits.shape == (len(ref.tokens), ref.logits.shape[1])
        assert (got.logits - ref.logits).abs().max().item() < LOGIT_TOL


@pytest.mark.parametrize("name", TINY_MODELS)
def test_wrong_image_features_change_the_output(name: str, tiny: TinyCache) -> None:
    t = tiny(name)
    llm = t.family.extract_llm(t.model)
    rolled = t.features[1:] + t.features[:1]  # every image gets the next one's features
    wrong = [compare_generations(ref, got) for ref, got in zip(t.refs, generate_all(t, llm, rolled), strict=True)]
    assert not all(c.exact for c in wrong)
    assert min(c.first_step_logit_error for c in wrong) > 0.5


@pytest.mark.container  # the reference that validation runs inside NVIDIA's image
@pytest.mark.parametrize("name", TINY_MODELS)
def test_catalog_thresholds_pass_in_the_entry_dtype_and_catch_wrong_features(name: str, tiny: TinyCache) -> None:
    """The tiny catalog entry's validation settings, as the comments in catalog.yaml measure them."""
    t = tiny(name)
    spec = tiny_spec(name)
    dtype = getattr(torch, spec.dtype.value)
    steps = spec.validation.max_new_tokens
    model = t.family.load_model(t.model_dir, dtype)
    with torch.no_grad():
        outputs = t.family.visual_outputs(t.family.visual_module(model), t.family.visual_inputs(t.processor, t.images))
    assert outputs.dtype == dtype
    features = t.pack(outputs, model)
    llm = save_and_reload_llm(t, dtype, f"llm_{spec.dtype.value}")
    refs = t.refs if steps == MAX_NEW_TOKENS else [
        t.family.reference_generate(t.model, t.processor, image, t.prompt, steps) for image in t.images
    ]

    def score(feats: list[torch.Tensor]) -> tuple[float, float]:
        comparisons = [
            compare_generations(ref, t.family.generate(llm, t.processor, feats[i], t.prompt, steps))
            for i, ref in enumerate(refs)
        ]
        return (sum(c.token_agreement for c in comparisons) / len(comparisons),
                max(c.first_step_logit_error for c in comparisons))

    agreement, error = score(features)
    assert agreement >= spec.validation.min_token_agreement
    assert error <= spec.validation.max_logit_error
    agreement, error = score(features[1:] + features[:1])
    assert agreement < spec.validation.min_token_agreement or error > spec.validation.max_logit_error


def test_save_pretrained_as_leaves_the_shared_model_untouched(tiny: TinyCache) -> None:
    t = tiny("blip2-opt")  # its LLM is the full model's own language_model
    before = [p.detach().clone() for p in t.model.parameters()]
    llm_dir = save_pretrained_as(t.family.extract_llm(t.model), t.work / "llm_bf16", torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters(), strict=True))
    assert t.model.config.text_config.dtype == torch.float32
    assert json.loads((llm_dir / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = t.family.llm_class().from_pretrained(llm_dir, dtype="auto")
    assert next(reloaded.parameters()).dtype == torch.bfloat16


# --- ONNX visual engine ------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY_MODELS)
def test_visual_module_onnx_matches_torch(name: str, tiny: TinyCache) -> None:
    t = tiny(name)
    if t.family.visual_engine_axes:
        pytest.skip("several engine inputs: tests/families/test_qwen2_vl_hf.py checks that export image by image")
    info = t.onnx()
    assert info.exporter in ("dynamo", "torchscript")
    module = t.family.visual_module(t.model)
    for batch in (1, 3):
        report = compare_onnx(info.path, module, t.pixel_values[:batch])
        assert report["batch"] == batch
        assert report["max_rel_to_scale"] < LOGIT_TOL, report
    # and the LLM fed the ONNX features still generates the reference's tokens
    got = generate_all(t, t.family.extract_llm(t.model), t.pack(run_onnx(info.path, t.pixel_values)))
    assert [g.tokens for g in got] == [r.tokens for r in t.refs]


# --- weight-only quantization ------------------------------------------------------------------


@pytest.mark.parametrize("name", QUANTIZABLE)
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_lowbit_save_and_reload(name: str, weights: str, tiny: TinyCache) -> None:
    """The reloaded LLM runs on torch's low-bit kernels and computes what its stored weights say."""
    from vlmforge.modeling.quantized import Int4Linear, Int8Linear, lowbit_kernels

    t = tiny(name)
    llm_cls = t.family.llm_class()
    fp32_dir = t.work / "llm_fp32_for_quant"
    if not fp32_dir.exists():
        save_pretrained_as(t.family.extract_llm(t.model), fp32_dir, torch.float32)
    float_llm = llm_cls.from_pretrained(fp32_dir, dtype=torch.float32).eval()
    qdir = t.work / f"llm_{weights}"
    meta = quantize_and_save(float_llm, qdir, weights, group_size=64)  # type: ignore[arg-type]
    assert safetensors_size(qdir) < safetensors_size(fp32_dir) and not meta["kept_float"]

    reloaded = load_quantized(llm_cls, qdir, torch.float32, "cpu")
    assert type(reloaded) is type(float_llm)  # llava_next's llm_class is an Auto class: the config's class
    kernel = "_weight_int8pack_mm" if weights == "int8" else "_weight_int4pack_mm_for_cpu"
    assert lowbit_kernels(reloaded) == {kernel: len(meta["quantized"]), "float": 1}  # the head stays float
    module = Int8Linear if weights == "int8" else Int4Linear
    assert not any(isinstance(m, torch.nn.Linear) for n, m in reloaded.named_modules() if ".layers." in n)
    assert all(isinstance(m, module) for n, m in reloaded.named_modules() if n.endswith(("q_proj", "fc1")))
    ref, got = t.refs[0], generate_all(t, reloaded, t.features[:1])[0]
    assert (got.logits[0] - ref.logits[0]).abs().max().item() < (0.1 if weights == "int8" else 1.0)
    assert len(got.tokens) == MAX_NEW_TOKENS or got.tokens[-1] == EOS_ID


@pytest.mark.container  # the reference that validation runs inside NVIDIA's image
def test_teacher_forced_logits_equal_the_greedy_steps(tiny: TinyCache) -> None:
    t = tiny("llava")
    llm = t.family.extract_llm(t.model)
    family = t.family
    # rebuild the prefix the way generate() does, through the public hook, and judge the reference tokens
    n = t.features[0].shape[1]
    ids = t.processor.tokenizer(t.prompt.replace("<image>", "<image>" * n), return_tensors="pt").input_ids
    embeds = llm.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == IMAGE_ID).unsqueeze(-1), t.features[0])
    logits = teacher_forced_logits(llm, embeds, torch.ones_like(ids), t.refs[0].tokens)
    assert logits.shape == t.refs[0].logits.shape
    assert (logits - t.refs[0].logits).abs().max().item() < LOGIT_TOL
    assert family.generate(llm, t.processor, t.features[0], t.prompt, 1).tokens == t.refs[0].tokens[:1]
