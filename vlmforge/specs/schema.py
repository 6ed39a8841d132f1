"""Build specs: one validated, declarative description of what to build.

A spec is loaded from YAML (or taken from the catalog), every field has a default and a
docstring, unknown keys are errors, and every error names the dotted YAML path, the bad value
and the fix. Values derived from a spec (``max_multimodal_len`` and friends) and the
cross-field rules live in :mod:`vlmforge.specs.derived`, computed and checked once.
"""

from __future__ import annotations

import copy
import re
import reprlib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vlmforge.errors import SpecError
from vlmforge.specs.yaml_io import read_yaml

SCHEMA_VERSION = 1


class Dtype(StrEnum):
    """Precision of the LLM weights and activations (the visual engine follows it)."""

    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"


class QuantMethod(StrEnum):
    """Quantization of the LLM (the visual engine is never quantized); the names of quantize.py's --qformat."""

    NONE = "none"
    INT8_WO = "int8_wo"
    """int8 weights, float activations (TensorRT-LLM W8A16; the hf runner's int8 kernel)."""
    INT4_WO = "int4_wo"
    """int4 weights, float activations (TensorRT-LLM W4A16, per channel; the hf runner: groups of group_size)."""
    INT4_AWQ = "int4_awq"
    """Activation-aware int4 weights in groups of group_size (W4A16_AWQ), calibrated."""
    W4A8_AWQ = "w4a8_awq"
    """AWQ int4 weights with FP8 activations (W4A8_AWQ; FP8 GPUs), calibrated."""
    INT8_SQ = "int8_sq"
    """SmoothQuant int8 weights and activations (W8A8_SQ_PER_CHANNEL), calibrated."""
    FP8 = "fp8"
    """FP8 weights and activations, per tensor (FP8; compute capability 8.9+), calibrated."""

    @property
    def weight_only(self) -> bool:
        return self in (QuantMethod.INT8_WO, QuantMethod.INT4_WO)

    @property
    def calibrated(self) -> bool:
        """Needs calibration data (the weight-only formats need none unless the KV cache is quantized)."""
        return self in (QuantMethod.INT4_AWQ, QuantMethod.W4A8_AWQ, QuantMethod.INT8_SQ, QuantMethod.FP8)

    @property
    def grouped(self) -> bool:
        """Quantizes int4 weights in groups of ``quantization.group_size`` (on the hf toolchain, int4_wo too)."""
        return self in (QuantMethod.INT4_AWQ, QuantMethod.W4A8_AWQ, QuantMethod.INT4_WO)


class KvCacheDtype(StrEnum):
    """KV-cache precision: ``auto`` follows the model dtype."""

    AUTO = "auto"
    INT8 = "int8"
    FP8 = "fp8"


class Dialect(StrEnum):
    """Which TensorRT-LLM release's command lines a plan is written in."""

    V1_2 = "1.2"
    """TensorRT-LLM 1.2.x: the last release line that builds TensorRT engines (default)."""
    V0_9 = "0.9"
    """The multimodal README of about v0.10 (the seed): for sites pinned to old containers."""


class Toolchain(StrEnum):
    """What executes a build: TensorRT-LLM in NVIDIA's container, or torch+transformers anywhere."""

    HF = "hf"
    TRTLLM = "trtllm"


SOURCE_SCHEMES = ("hf", "s3", "file", "tiny")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_HF_RE = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[\w./-]+))?$")
_S3_RE = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/(?P<key>.*))?$")
_TINY_RE = re.compile(r"^tiny://(?P<family>[a-z0-9][a-z0-9.-]*)$")

PositiveLen = Annotated[int, Field(ge=1, le=1_048_576)]


class StrictModel(BaseModel):
    """Base for spec sections: unknown keys are errors, values are validated on assignment.

    Fields added after a section's first release are left out of its dump while unset (``exclude_if``), so the
    specs, plans, manifests and fingerprints of earlier builds read exactly as before."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


def _is_none(value: Any) -> bool:
    return value is None


class ImageSize(StrictModel):
    """An image's size in pixels."""

    height: Annotated[int, Field(ge=1, le=16384)]
    """Rows of pixels."""
    width: Annotated[int, Field(ge=1, le=16384)]
    """Columns of pixels."""

    def __str__(self) -> str:
        return f"{self.height}x{self.width}"


CALIBRATION_SYNTHETIC = "synthetic"


class Calibration(StrictModel):
    """The images and prompts a quantization is calibrated on.

    Each sample goes through the family's processor, vision encoder and prompt template, so the LLM is
    calibrated on the embeddings it really receives: text with the visual features spliced in (calibrating
    on text alone is a known cause of wrong VLM outputs, TensorRT-LLM #1860). The set's content digest is
    part of the quantize stage's fingerprint: other images or prompts give another build.
    """

    source: str = CALIBRATION_SYNTHETIC
    """``synthetic`` (the built-in set: generated images, varied prompts) or a local folder (a path or
    ``file://`` URI) of images (.png, .jpg, .jpeg, .webp, .bmp; sorted by name) and an optional
    ``prompts.txt`` (one prompt per line, used in turn; without it, the family's golden prompt)."""
    size: Annotated[int, Field(ge=1, le=4096)] = 32
    """Samples (image + prompt) to calibrate on (quantize.py --calib_size; TensorRT-LLM caps AWQ at 32)."""
    batch_size: Annotated[int, Field(ge=1, le=256)] = 4
    """Samples per calibration forward pass (quantize.py --batch_size)."""
    seed: Annotated[int, Field(ge=0)] = 0
    """Seed of the synthetic set's images and prompt order."""

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("calibration source is empty: use synthetic or a local folder of images and prompts.txt")
        if "://" in value and not value.startswith("file://"):
            raise ValueError(f"{value!r}: calibration data comes from `synthetic` or a local folder (path or file://)")
        return value

    @property
    def folder(self) -> Path | None:
        """The local folder, or None for the synthetic set."""
        if self.source == CALIBRATION_SYNTHETIC:
            return None
        return Path(self.source.removeprefix("file://")).expanduser()


class Quantization(StrictModel):
    """How the LLM is quantized (NVIDIA ModelOpt: what TensorRT-LLM's quantize.py runs)."""

    method: QuantMethod = QuantMethod.NONE
    """none, int8_wo, int4_wo (weight-only), int4_awq, w4a8_awq, int8_sq, fp8."""
    kv_cache_dtype: KvCacheDtype = KvCacheDtype.AUTO
    """KV-cache precision: auto (the model dtype), int8 or fp8 (calibrated scales)."""
    group_size: Literal[32, 64, 128, 256] = 128
    """int4 group size: int4_awq/w4a8_awq (quantize.py --awq_block_size) and the hf toolchain's int4_wo. Every
    quantized layer's input width divided by parallel.tp must be a multiple of it."""
    calibration: Calibration = Field(default_factory=Calibration)
    """Calibration data for int4_awq, w4a8_awq, int8_sq, fp8 and quantized KV caches."""

    @property
    def needs_calibration(self) -> bool:
        return self.method.calibrated or self.kv_cache_dtype is not KvCacheDtype.AUTO

    @property
    def active(self) -> bool:
        """Anything quantized at all (weights or KV cache)."""
        return self.method is not QuantMethod.NONE or self.kv_cache_dtype is not KvCacheDtype.AUTO


class Parallelism(StrictModel):
    """How the LLM is split across GPUs (the visual engine is replicated)."""

    tp: Annotated[int, Field(ge=1, le=64)] = 1
    """Tensor parallelism: GPUs per pipeline stage; must divide the attention heads."""
    pp: Annotated[int, Field(ge=1, le=64)] = 1
    """Pipeline parallelism: number of pipeline stages."""


class Limits(StrictModel):
    """Sizes the LLM engine is built for. Leave derived values unset: they are computed."""

    max_batch_size: Annotated[int, Field(ge=1, le=2048)] = 1
    """Largest batch the LLM engine accepts."""
    max_input_len: PositiveLen = 2048
    """Longest prompt in tokens (text plus visual features for decoder-only families)."""
    max_output_len: PositiveLen | None = None
    """Most new tokens per request; defaults to max_seq_len - max_input_len, or 512."""
    max_seq_len: PositiveLen | None = None
    """Prompt plus output; derived as max_input_len + max_output_len when unset."""
    max_beam_width: Annotated[int, Field(ge=1, le=64)] = 1
    """Beam search width the engine supports (1 = greedy/sampling only)."""
    max_multimodal_len: PositiveLen | None = None
    """Visual-feature rows per batch; derived as max_batch_size x num_visual_features. Set it only to assert."""
    max_encoder_input_len: PositiveLen | None = None
    """Encoder-decoder families only: encoder input length; derived. Set it only to assert."""
    use_fused_mlp: bool | None = None
    """Fuse the gated MLP (trtllm-build --use_fused_mlp); default: the family's choice, never with quantization."""
    max_images_per_prompt: Annotated[int, Field(ge=1, le=64)] | None = Field(default=None, exclude_if=_is_none)
    """Most images one prompt carries; default: the family's (1). The prompt-embedding table, the visual engine's batch
    and the prompt must hold max_batch_size x this x the tokens of the largest image."""


class Visual(StrictModel):
    """The visual engine (vision encoder + projector)."""

    max_batch_size: Annotated[int, Field(ge=1, le=2048)] | None = None
    """Images per visual-engine call; default: the builder script's default (4). Must be >= limits.max_batch_size
    x limits.max_images_per_prompt (x the engine inputs one image takes, for tiling families)."""
    max_image_size: ImageSize | None = Field(default=None, exclude_if=_is_none)
    """Largest image the engine is sized for, for families whose visual tokens depend on the image's size (the
    budgets count its tokens); default: the family's. Families that resize every image to one size refuse it."""


class Architecture(StrictModel):
    """Facts about the checkpoint known before download (catalog entries fill them in).

    They let a plan be checked before any GPU time is spent; the hf toolchain checks them
    against the real config after download and fails on a mismatch.
    """

    num_visual_features: PositiveLen | None = None
    """Visual tokens per image (BLIP-2: query tokens; LLaVA-1.5: (336/14)^2 = 576; Nougat: 588)."""
    num_attention_heads: Annotated[int, Field(ge=1, le=1024)] | None = None
    """Attention heads of the LLM; tp must divide it."""


class ValidationSettings(StrictModel):
    """How a built engine is checked against the unconverted float32 reference before it is published."""

    min_token_agreement: Annotated[float, Field(ge=0.0, le=1.0)] = 0.9
    """Fraction of greedy tokens that must equal the reference's (position by position)."""
    max_logit_error: Annotated[float, Field(ge=0.0)] = 1.0
    """Largest allowed absolute logit difference against the reference, over the steps up to the first differing token."""
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] | None = None
    """Tokens generated per golden input; default: the family's (30, or run.py's own for prompt-free models)."""
    input_text: str | None = None
    """Prompt for the validation run; default: the family's golden prompt."""


class Artifacts(StrictModel):
    """Extra artifacts a build publishes beside the engine (each costs bytes in every publish and in the store)."""

    hf_checkpoint: bool = False
    """Publish the whole model as a Hugging Face model folder (``hf/`` in the engine directory: the hf toolchain's
    cast checkpoint of vision tower, projector and language model, with tokenizer and processor files), which
    ``vlmforge deploy --backend trtllm-serve`` serves. Off by default: it adds the whole model's bytes again to every
    publish and to the store (about +14 GB for a 7B float16 build); the vlmforge runner never reads it, and its
    deploys leave it out of their pulls. The hf toolchain only. On a quantized spec (int4_awq, w4a8_awq, int8_sq, fp8;
    KV cache auto or fp8) it is ModelOpt's unified checkpoint of the whole model: the language model's quantized
    weights and scales with ``hf_quant_config.json``, the vision tower and projector in float."""


def _default_artifacts(value: Artifacts) -> bool:
    return value == Artifacts()


class BuildSpec(StrictModel):
    """Everything needed to build, validate and publish one multimodal engine."""

    schema_version: Literal[1] = 1
    """Spec format version."""
    name: str
    """Model name in the catalog and the store: letters, digits, '.', '_' and '-'."""
    family: str
    """Model family (blip2-opt, blip2-t5, llava, vila, nougat, ...): `vlmforge models` lists them."""
    source: str
    """Where the weights come from: hf://org/repo@revision, s3://bucket/prefix, file:///path or a path, tiny://FAMILY."""
    code_source: str | None = None
    """Model code the checkpoint needs (VILA: the VILA repository, a git URL or a local path)."""
    dtype: Dtype = Dtype.FLOAT16
    """Precision of the LLM engine."""
    quantization: Quantization = Field(default_factory=Quantization)
    """LLM quantization."""
    parallel: Parallelism = Field(default_factory=Parallelism)
    """Tensor and pipeline parallelism of the LLM."""
    limits: Limits = Field(default_factory=Limits)
    """Engine size limits."""
    visual: Visual = Field(default_factory=Visual)
    """Visual engine settings."""
    architecture: Architecture = Field(default_factory=Architecture)
    """Checkpoint facts used to validate the plan before download."""
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    """Thresholds the built engine must meet against the reference."""
    dialect: Dialect = Dialect.V1_2
    """TensorRT-LLM command-line dialect for the trtllm toolchain."""
    artifacts: Artifacts = Field(default_factory=Artifacts, exclude_if=_default_artifacts)
    """Extra artifacts to publish (left out of the spec's dump while all off, so earlier builds read as before)."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                f"{value!r} is not a valid model name: use letters, digits, '.', '_' and '-' "
                "(at most 100 characters, starting with a letter or digit)"
            )
        return value

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        _refuse_leading_dash(value, "a path")
        parse_source(value)
        return value

    @field_validator("code_source")
    @classmethod
    def _check_code_source(cls, value: str | None) -> str | None:
        if value is not None:
            _refuse_leading_dash(value, "a git URL or a path")
        return value

    @property
    def is_tiny(self) -> bool:
        return self.source.startswith("tiny://")


def _refuse_leading_dash(value: str, kind: str) -> None:
    """A value the plan passes as a positional argument (``git clone SOURCE DIR``, ``vlmforge fetch SOURCE DIR``)
    must not read as an option: ``--upload-pack=...`` would make git run a command."""
    if value.startswith("-"):
        raise ValueError(f"{value!r} starts with '-', which the plan's commands would read as an option: give {kind} "
                         f"(a relative path that starts with '-' is written ./{value})")


class SourceURI(BaseModel):
    """A parsed model source."""

    model_config = ConfigDict(frozen=True)

    scheme: Literal["hf", "s3", "file", "tiny"]
    location: str
    """hf: org/repo; s3: bucket/key-prefix; file: absolute or relative path; tiny: a family's tiny model (its name or e.g. vila1.0)."""
    revision: str | None = None
    """hf only: branch, tag or commit sha (resolved to a commit sha at download)."""

    def __str__(self) -> str:
        if self.scheme == "hf":
            return f"hf://{self.location}" + (f"@{self.revision}" if self.revision else "")
        if self.scheme == "file":
            return f"file://{self.location}"
        return f"{self.scheme}://{self.location}"


def parse_source(uri: str) -> SourceURI:
    """Parse a source URI, raising ``ValueError`` with the accepted forms on bad input."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError("source is empty: give hf://org/repo@revision, s3://bucket/prefix, file:///path or tiny://FAMILY")
    if uri.startswith("hf://"):
        match = _HF_RE.match(uri)
        if not match:
            raise ValueError(f"{uri!r} is not a Hugging Face source: use hf://org/repo or hf://org/repo@revision")
        return SourceURI(scheme="hf", location=match["repo"], revision=match["revision"])
    if uri.startswith("s3://"):
        match = _S3_RE.match(uri)
        if not match:
            raise ValueError(f"{uri!r} is not an S3 source: use s3://bucket/prefix (bucket names: 3-63 lowercase characters)")
        return SourceURI(scheme="s3", location=f"{match['bucket']}/{(match['key'] or '').strip('/')}".rstrip("/"))
    if uri.startswith("tiny://"):
        match = _TINY_RE.match(uri)
        if not match:
            raise ValueError(f"{uri!r} is not a tiny source: use tiny://FAMILY, e.g. tiny://llava")
        return SourceURI(scheme="tiny", location=match["family"])
    if uri.startswith("file://"):
        path = uri[len("file://") :]
        if not path:
            raise ValueError(f"{uri!r} has no path: use file:///absolute/path")
        return SourceURI(scheme="file", location=path)
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise ValueError(f"unknown source scheme {scheme!r} in {uri!r}: use one of {', '.join(s + '://' for s in SOURCE_SCHEMES)} or a path")
    return SourceURI(scheme="file", location=uri)


# --- loading ------------------------------------------------------------------------------


def spec_from_dict(
    data: dict[str, Any], *, origin: str = "<spec>", lines: dict[tuple[Any, ...], int] | None = None
) -> BuildSpec:
    """Validate a mapping into a :class:`BuildSpec`, turning pydantic's errors into one :class:`SpecError`."""
    try:
        return BuildSpec.model_validate(data)
    except ValidationError as exc:
        raise _spec_error(exc, origin, lines or {}) from None


MOVED_KEYS = {"quantization.calib_size": "quantization.calibration.size"}
"""Keys of earlier spec versions and where they live now."""


def _spec_error(exc: ValidationError, origin: str, lines: dict[tuple[Any, ...], int]) -> SpecError:
    messages = []
    first_location = None
    for error in exc.errors():
        loc = tuple(error["loc"])
        path = ".".join(str(part) for part in loc) or "(spec)"
        line = None
        for cut in range(len(loc), -1, -1):
            if loc[:cut] in lines:
                line = lines[loc[:cut]]
                break
        where = f"{origin}:{line}" if line else origin
        first_location = first_location or where
        msg = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden" and path in MOVED_KEYS:
            msg = f"this key moved: write {MOVED_KEYS[path]} instead"
        elif error["type"] == "extra_forbidden":
            msg = f"unknown key; the allowed keys here are: {', '.join(_allowed_keys(loc[:-1]))}"
        elif error["type"] == "missing":
            msg = "required field is missing"
        elif "input" in error and error["type"] not in ("model_type",):
            msg = f"{msg} (got {_short_repr(error['input'])})"
        messages.append(f"{where}: {path}: {msg}")
    if len(messages) == 1:
        where, _, rest = messages[0].partition(": ")
        return SpecError(rest, location=where)
    return SpecError("invalid spec:\n  " + "\n  ".join(messages))


def _short_repr(value: Any) -> str:
    """A bad value as an error shows it: bounded, however large the value (a list of lists of lists...)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 3, 6, 6, 120, 120
    return short.repr(value)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = BuildSpec
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            break
    return sorted(model.model_fields)


def load_spec_file(path: Path) -> BuildSpec:
    """Load and validate one spec file (YAML)."""
    data, lines = read_yaml(path)
    return spec_from_dict(data, origin=str(path), lines=lines)


def merge_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted-key overrides (``{"limits.max_batch_size": 8}``) to a spec mapping, returning a new mapping;
    ``None`` removes the key (``{"limits.max_seq_len": None}``: derive it again)."""
    result: dict[str, Any] = copy.deepcopy(data)
    for dotted, value in overrides.items():
        target = result
        parts = dotted.split(".")
        for part in parts[:-1]:
            nxt = target.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise SpecError(f"cannot override {dotted}: {part} is not a section", path=dotted)
            target = nxt
        if value is None:
            target.pop(parts[-1], None)
        else:
            target[parts[-1]] = value
    return result


def spec_json_schema() -> dict[str, Any]:
    """The JSON Schema of a spec file (``vlmforge spec schema``)."""
    schema = BuildSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "vlmforge build spec"
    return schema
