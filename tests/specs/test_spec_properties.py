"""Property tests: any spec either validates (and plans) or raises the project's error with a message."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmforge.errors import VlmforgeError
from vlmforge.families import resolve
from vlmforge.specs.schema import spec_from_dict
from vlmforge.toolchains.trtllm.plan import build_plan

ints = st.one_of(st.integers(min_value=-5, max_value=5000), st.none(), st.text(max_size=3), st.floats(allow_nan=True))
maybe = lambda strategy: st.one_of(st.none(), strategy)  # noqa: E731


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {key: (_drop_none(value) if isinstance(value, dict) else value) for key, value in data.items() if value is not None}


specs = st.fixed_dictionaries(
    {
        "name": st.one_of(st.sampled_from(["m", "llava-x", "Bad Name", ""]), st.text(max_size=8)),
        "family": st.one_of(st.sampled_from(["llava", "vila", "blip2-opt", "blip2-t5", "nougat", "llama"]), st.text(max_size=6)),
        "source": st.sampled_from([
            "hf://llava-hf/llava-1.5-7b-hf", "hf://org/repo@abc123", "s3://bucket/prefix", "tiny://llava",
            "file:///tmp/x", "ftp://nope", "", "relative/dir", "s3://B",
        ]),
    },
    optional={
        "code_source": maybe(st.sampled_from(["https://github.com/Efficient-Large-Model/VILA.git", "/opt/VILA"])),
        "dtype": st.sampled_from(["float16", "bfloat16", "float32", "int8"]),
        "dialect": st.sampled_from(["1.2", "0.9", "2.0", 1.2]),
        "quantization": st.fixed_dictionaries({}, optional={
            "method": st.sampled_from(["none", "int8_wo", "int4_wo", "int4_awq", "int8_sq", "fp8", "nf4"]),
            "kv_cache_dtype": st.sampled_from(["auto", "int8", "fp8", "fp4"]),
            "calib_size": ints,
        }),
        "parallel": st.fixed_dictionaries({}, optional={"tp": ints, "pp": ints}),
        "limits": st.fixed_dictionaries({}, optional={
            "max_batch_size": ints, "max_input_len": ints, "max_output_len": ints, "max_seq_len": ints,
            "max_beam_width": ints, "max_multimodal_len": ints, "max_encoder_input_len": ints,
            "max_images_per_prompt": st.one_of(ints, st.integers(min_value=1, max_value=4)),
            "use_fused_mlp": st.one_of(st.booleans(), st.none(), st.just("yes")),
        }),
        "visual": st.fixed_dictionaries({}, optional={
            "max_batch_size": ints,
            "max_image_size": st.one_of(st.fixed_dictionaries({"height": ints, "width": ints}), ints),
        }),
        "architecture": st.fixed_dictionaries({}, optional={"num_visual_features": ints, "num_attention_heads": ints}),
        "validation": st.fixed_dictionaries({}, optional={
            "min_token_agreement": st.floats(min_value=-1, max_value=2), "max_new_tokens": ints,
        }),
        "surprise": st.integers(),
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs)
def test_any_spec_validates_or_raises_the_spec_error(data: dict[str, Any]) -> None:
    data = _drop_none(data)
    try:
        spec = spec_from_dict(data)
        resolve(spec)
        plan = build_plan(spec)
    except VlmforgeError as exc:
        assert str(exc).strip(), "errors must carry a message"
        return
    assert plan.steps and all(step.argv for step in plan.steps)
    derived = plan.derived
    images = derived.max_images_per_prompt
    assert images == (spec.limits.max_images_per_prompt or 1)
    assert derived.max_multimodal_len == spec.limits.max_batch_size * images * derived.num_visual_features
    assert derived.max_seq_len == derived.max_input_len + derived.max_output_len
    assert derived.visual_max_batch_size >= spec.limits.max_batch_size * images
