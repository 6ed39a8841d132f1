"""What TensorRT-LLM build plans are made of: dialects, steps, the path layout, the context families write in.

Plan computation (:func:`vlmforge.toolchains.trtllm.plan.build_plan`) is pure: a resolved spec and a
dialect in, a :class:`Plan` out. Family modules contribute their specific steps and flags through
:class:`vlmforge.families.base.ModelFamily`, written in the terms of this module.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vlmforge.specs.derived import Derived
from vlmforge.specs.schema import BuildSpec, Dialect, Dtype, KvCacheDtype, QuantMethod


@dataclass(frozen=True)
class DialectInfo:
    """What one TensorRT-LLM release line calls things."""

    dialect: Dialect
    release: str
    """The release tag the flags were checked against (tests/contract/trtllm_flags.json)."""
    image: str
    """Default container image that ships this release and its examples."""
    trtllm_root: str
    """Where the release's source tree (with examples/) lies inside the image."""
    multimodal_dir: str
    """The multimodal example directory, relative to the root: plans run from there, like the READMEs."""
    script_dirs: dict[str, str]
    """LLM family -> directory of its convert_checkpoint.py, relative to the root."""
    quantize_script: str
    visual_builder: str
    """Visual engine builder script, relative to the multimodal directory."""
    visual_builder_default_batch: int
    """The builder's own --max_batch_size default."""
    uses_max_seq_len: bool
    """trtllm-build takes --max_seq_len (1.2) instead of --max_output_len (0.9)."""
    engine_layout: str
    """'split' (0.9: separate LLM and visual engine dirs) or 'unified' (1.2: engine_dir/{llm,vision})."""

    @property
    def cwd(self) -> str:
        return posixpath.join(self.trtllm_root, self.multimodal_dir)

    def script(self, repo_path: str) -> str:
        """A script's path as the READMEs write it: relative to the multimodal directory."""
        return posixpath.relpath(repo_path, self.multimodal_dir)


DIALECTS: dict[Dialect, DialectInfo] = {
    Dialect.V0_9: DialectInfo(
        dialect=Dialect.V0_9,
        release="v0.10.0",
        image="nvcr.io/nvidia/tritonserver:24.06-trtllm-python-py3",
        trtllm_root="/app/tensorrt_llm",
        multimodal_dir="examples/multimodal",
        script_dirs={"opt": "examples/opt", "llama": "examples/llama", "enc_dec": "examples/enc_dec"},
        quantize_script="examples/quantization/quantize.py",
        visual_builder="build_visual_engine.py",
        visual_builder_default_batch=4,
        uses_max_seq_len=False,
        engine_layout="split",
    ),
    Dialect.V1_2: DialectInfo(
        dialect=Dialect.V1_2,
        release="v1.2.1",
        image="nvcr.io/nvidia/tensorrt-llm/release:1.2.1",
        trtllm_root="/app/tensorrt_llm",
        multimodal_dir="examples/models/core/multimodal",
        script_dirs={
            "opt": "examples/models/contrib/opt",
            "llama": "examples/models/core/llama",
            "qwen": "examples/models/core/qwen",
            "gpt": "examples/models/core/gpt",
            "mllama": "examples/models/core/mllama",
            "internlm2": "examples/models/core/internlm2",
            "phi": "examples/models/core/phi",
            "cogvlm": "examples/models/contrib/cogvlm",
            "enc_dec": "examples/models/core/enc_dec",
        },
        quantize_script="examples/quantization/quantize.py",
        visual_builder="build_multimodal_engine.py",
        visual_builder_default_batch=4,
        uses_max_seq_len=True,
        engine_layout="unified",
    ),
}

DTYPE_SHORT = {Dtype.FLOAT16: "fp16", Dtype.BFLOAT16: "bfloat16", Dtype.FLOAT32: "fp32"}


class Step(BaseModel):
    """One command of a plan, run in order inside ``image``."""

    model_config = ConfigDict(frozen=True)

    name: str
    """Stable step name: fetch, patch-*, convert, quantize, build-llm, build-encoder, build-decoder, build-visual, validate."""
    argv: list[str]
    """The exact command: no shell, no string splitting."""
    cwd: str
    """Working directory inside the container."""
    image: str
    """Container image the step runs in."""
    gpus: int = Field(ge=0)
    """GPUs the step needs."""
    inputs: list[str] = Field(default_factory=list)
    """Paths the step reads."""
    outputs: list[str] = Field(default_factory=list)
    """Paths the step creates: what an interrupted run left there is deleted before the step runs again."""
    edits: list[str] = Field(default_factory=list)
    """Paths the step changes in place (``sed -i``): they must exist before it runs and are never deleted."""
    tool: str
    """The program: 'trtllm-build', a script path relative to the TensorRT-LLM root, or an external command."""


class PlanRequirements(BaseModel):
    """What the machine running the plan must offer."""

    min_compute_capability: str | None = None
    """Lowest GPU compute capability (fp8 needs 8.9, i.e. Ada or Hopper)."""
    gpus: int = 1
    """GPUs needed by the widest step."""
    tensorrt_llm: str
    """TensorRT-LLM release the argv were written for."""


class Plan(BaseModel):
    """An ordered, executable build plan for the trtllm toolchain."""

    spec: BuildSpec
    derived: Derived
    dialect: Dialect
    requirements: PlanRequirements
    steps: list[Step]
    engine_dir: str
    """Where the finished engine (LLM + visual) lies inside the container."""

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.model_dump(mode="json"),
            "derived": self.derived.model_dump(mode="json"),
            "dialect": self.dialect.value,
            "requirements": self.requirements.model_dump(mode="json"),
            "engine_dir": self.engine_dir,
            "steps": [_step_json(step) for step in self.steps],
        }


def _step_json(step: Step) -> dict[str, Any]:
    """A step as JSON; ``edits`` only where a step edits in place, so other plans (and their fingerprints) read
    as before the field existed."""
    data = step.model_dump(mode="json")
    if not data["edits"]:
        del data["edits"]
    return data


@dataclass(frozen=True)
class Layout:
    """Where a plan's files lie inside the container (all under one workspace volume)."""

    workspace: str
    name: str
    variant: str
    gpus_label: str
    code_dir: str = ""

    @property
    def hf_dir(self) -> str:
        return posixpath.join(self.workspace, "hf_models", self.name)

    @property
    def checkpoint_dir(self) -> str:
        return posixpath.join(self.workspace, "trt_models", self.name, self.variant, self.gpus_label)

    @property
    def engine_dir(self) -> str:
        return posixpath.join(self.workspace, "trt_engines", self.name, self.variant, self.gpus_label)

    @property
    def visual_dir_split(self) -> str:
        """0.9: build_visual_engine.py writes visual_engines/<model dir name> below its working directory."""
        return posixpath.join("visual_engines", self.name)


@dataclass(frozen=True)
class PlanContext:
    """Everything a family needs to write its steps."""

    spec: BuildSpec
    derived: Derived
    dialect: DialectInfo
    layout: Layout
    image: str

    def step(self, name: str, argv: list[str], *, tool: str, gpus: int = 0, inputs: list[str] | None = None,
             outputs: list[str] | None = None, edits: list[str] | None = None, cwd: str | None = None) -> Step:
        return Step(name=name, argv=argv, cwd=cwd or self.dialect.cwd, image=self.image, gpus=gpus,
                    inputs=inputs or [], outputs=outputs or [], edits=edits or [], tool=tool)

    def python(self, repo_path: str) -> list[str]:
        """``python <script>`` with the script written relative to the multimodal directory."""
        return ["python", self.dialect.script(repo_path)]


def variant_label(spec: BuildSpec) -> str:
    """Directory label of a build variant, in the seed's words (fp16, bfloat16, int4_weightonly, int4_awq...)."""
    method = spec.quantization.method
    if method is QuantMethod.NONE:
        label = DTYPE_SHORT[spec.dtype]
    elif method.weight_only:
        label = f"{method.value.removesuffix('_wo')}_weightonly"
    else:
        label = method.value
    if spec.quantization.kv_cache_dtype is not KvCacheDtype.AUTO:
        label += f"_kv{spec.quantization.kv_cache_dtype.value}"
    return label
