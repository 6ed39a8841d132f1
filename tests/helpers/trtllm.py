"""TEST DOUBLE of the TensorRT-LLM runtime, for the one part of a trtllm build that cannot run here.

TensorRT and TensorRT-LLM cannot be installed on these machines (no NVIDIA container, no GPU), so
:class:`TrtllmStandIn` stands in for :class:`vlmforge.toolchains.trtllm.runtime.ContainerRuntime` only:

- ``version``/``compute_capability``: fixed values that say what they are;
- ``execute``: skips a step whose outputs exist; runs the plan's own ``vlmforge fetch -- SOURCE DIR`` step for real (the tiny checkpoint is the
  validation reference); every TensorRT-LLM step (convert, trtllm-build, the visual builder, run.py) is NOT run:
  its outputs get a placeholder file that says so;
- ``load_engine``: an engine that answers with the float32 transformers reference (what an exact TensorRT engine
  would answer) and, like TensorRT-LLM's multimodal runner, returns text and its tokens but no logits.

Everything around it stays real in the tests that use it: the plan, the pipeline's stages and work dir, the
validation comparison, the manifest, the Prefect flow and server, the publish task and the store.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PLACEHOLDER = "TEST-DOUBLE-NOT-A-TENSORRT-ENGINE.txt"


class ReferenceAsEngine:
    """Stands in for TrtllmEngine: the family's float32 reference, reporting like TensorRT-LLM's runner (text)."""

    def __init__(self, engine_dir: Path, hf_dir: Path, *, corrupt: bool = False) -> None:
        import torch

        from vlmforge.artifacts.engine_config import EngineConfig
        from vlmforge.families import get_family

        self.family = get_family(EngineConfig.read(engine_dir).family)
        self.model = self.family.load_model(hf_dir, torch.float32, device="cpu")
        self.processor = self.family.load_processor(hf_dir)
        self.corrupt = corrupt
        """Answer something else than the reference (to see validation refuse it)."""

    def generate(self, image: Any, prompt: str | None, max_new_tokens: int) -> Any:
        import torch

        from vlmforge.runner.protocol import Generation

        start = time.perf_counter()
        ref = self.family.reference_generate(self.model, self.processor, image, self.family.format_prompt(prompt),
                                             max_new_tokens)
        tokenizer = self.processor.tokenizer
        text = tokenizer.decode(ref.tokens, skip_special_tokens=True)
        if self.corrupt:
            text = "".join(reversed(text)) + " something else entirely"
        tokens = tokenizer(text, add_special_tokens=False).input_ids
        return Generation(tokens=list(tokens), text=text, logits=torch.empty(0), vision_ms=0.0,
                          llm_ms=(time.perf_counter() - start) * 1000)


class TrtllmStandIn:
    """TEST DOUBLE for ContainerRuntime (see the module docstring for what is real and what is not)."""

    reference_device = "cpu"

    def __init__(self, *, corrupt_engine: bool = False) -> None:
        self.corrupt_engine = corrupt_engine
        self.executed: list[str] = []

    def version(self) -> str:
        return "0.0.0+test-double"

    def compute_capability(self) -> str:
        return "0.0"

    def execute(self, plan: Any, workspace: Path, on_line: Callable[[str], None], *, inputs: str) -> list[Any]:
        from vlmforge.toolchains.trtllm.execute import StepRun, run_step

        runs = []
        for index, step in enumerate(plan.steps, 1):
            log_path = workspace / "logs" / f"{index:02d}-{step.name}.log"
            if step.outputs and all(Path(out).exists() for out in step.outputs):  # resumes, as execute_plan does
                runs.append(StepRun(step, log_path, 0.0, True))
                continue
            if step.tool == "vlmforge":  # the plan's own command, run for real (not TensorRT-LLM)
                seconds = run_step(step.model_copy(update={"cwd": str(workspace)}), log_path, on_line)
            else:
                start = time.perf_counter()
                for out in step.outputs:
                    Path(out).mkdir(parents=True, exist_ok=True)
                    (Path(out) / PLACEHOLDER).write_text(f"test double: `{' '.join(step.argv)}` was not run "
                                                         "(TensorRT-LLM is not installed here)\n")
                seconds = time.perf_counter() - start
            self.executed.append(step.name)
            runs.append(StepRun(step, log_path, seconds, False))
        return runs

    def load_engine(self, engine_dir: Path, hf_model_dir: Path) -> ReferenceAsEngine:
        assert (engine_dir / "engine.json").is_file() and (engine_dir / "llm" / PLACEHOLDER).is_file()
        return ReferenceAsEngine(engine_dir, hf_model_dir, corrupt=self.corrupt_engine)
