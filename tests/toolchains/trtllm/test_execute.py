"""Executing a TensorRT-LLM plan: a step is skipped only when it and every step before it ran with the same
command and the same source revision (the markers are plain files); a step never deletes what it reads; in-place
edits and `--` before positionals, run with the real git, sed and vlmforge (TensorRT-LLM itself cannot run here)."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from vlmforge.errors import PlanError, VlmforgeError
from vlmforge.plans.model import Plan, Step
from vlmforge.specs.catalog import catalog_entry, catalog_names, load_model_or_spec
from vlmforge.specs.schema import Dialect, spec_from_dict
from vlmforge.toolchains.trtllm import execute
from vlmforge.toolchains.trtllm.execute import _marker
from vlmforge.toolchains.trtllm.plan import build_plan

pytestmark = pytest.mark.container  # runs inside NVIDIA's TensorRT-LLM 1.2 image: CI runs it again there


def chain(plan, inputs: str) -> list[str]:  # type: ignore[no-untyped-def]
    digest, names = inputs, []
    for step in plan.steps:
        marker, digest = _marker(Path("/work"), step, digest)
        names.append(marker.name)
    return names


def test_a_new_revision_or_an_earlier_step_change_reruns_everything_after_it() -> None:
    plan = build_plan(load_model_or_spec("llava-1.5-7b-hf"))
    first = chain(plan, "sha-1")
    assert chain(plan, "sha-1") == first  # the same inputs: every step is skippable
    assert all(a != b for a, b in zip(first, chain(plan, "sha-2"), strict=True))  # a new revision: none is
    other = build_plan(load_model_or_spec("llava-1.5-7b-hf", {"quantization.method": "int4_wo"}))
    changed = next(i for i, (a, b) in enumerate(zip(plan.steps, other.steps, strict=False)) if a.argv != b.argv)
    again = chain(other, "sha-1")
    assert again[:changed] == first[:changed] and all(a != b for a, b in zip(first[changed:], again[changed:]))


# --- a step never deletes its own inputs; in-place edits; `--` before positionals (issue 11 item 13) ------------



def _overlap(a: str, b: str) -> bool:
    pa, pb = PurePosixPath(a), PurePosixPath(b)
    return pa == pb or pa in pb.parents or pb in pa.parents


def test_no_catalog_plan_has_a_step_whose_outputs_overlap_what_it_reads() -> None:
    checked = 0
    for model, dialect in itertools.product(catalog_names(), Dialect):
        try:
            plan = build_plan(spec_from_dict(catalog_entry(model)), dialect=dialect)
        except VlmforgeError:
            continue
        for step in plan.steps:
            reads = step.inputs + list(getattr(step, "edits", []))
            assert not [(o, r) for o in step.outputs for r in reads if _overlap(o, r)], f"{model} {dialect}: {step}"
            checked += 1
    assert checked > 50


def test_vila_patch_steps_edit_the_cloned_file_in_place() -> None:
    plan = build_plan(load_model_or_spec("vila-7B"), dialect=Dialect.V0_9)
    patches = [step for step in plan.steps if step.name.startswith("patch-")]
    assert len(patches) == 3
    for step in patches:
        assert step.outputs == [] and step.edits == [step.argv[-1]] and step.argv[:3] == ["sed", "-i", "--"]


@pytest.fixture
def trtllm_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """TEST DOUBLE: TensorRT-LLM cannot be installed here, so its presence check answers a fixed version; the
    steps themselves are real commands (git, sed, vlmforge) run by the real execute_plan."""
    monkeypatch.setattr(execute, "require_trtllm", lambda: "stand-in: TensorRT-LLM is not installed here")


def _plan_of(steps: list[Step], cwd: Path) -> Plan:
    base = build_plan(load_model_or_spec("llava-1.5-7b-hf"))
    return base.model_copy(update={"steps": [step.model_copy(update={"cwd": str(cwd)}) for step in steps]})


def test_execute_plan_refuses_a_step_that_would_delete_its_own_input(tmp_path: Path, trtllm_stand_in: None) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "weights.bin").write_text("precious")
    step = Step(name="rewrite", argv=["cat", str(data / "weights.bin")], cwd=str(tmp_path), image="-", gpus=0,
                inputs=[str(data / "weights.bin")], outputs=[str(data)], tool="cat")
    with pytest.raises(PlanError, match=r"step rewrite: output .*data overlaps its input .*weights.bin"):
        execute.execute_plan(_plan_of([step], tmp_path), tmp_path / "ws", tmp_path / "logs", print)
    assert (data / "weights.bin").read_text() == "precious"


def _vila_code_repo(tmp_path: Path) -> Path:
    """A git repository with the two VILA files the seed's patches edit, the lines they look for included."""
    work = tmp_path / "vila-src"
    (work / "llava/model/language_model").mkdir(parents=True)
    (work / "llava/model/llava_arch.py").write_text(
        "def build(delay_load=True):\n    if True:\n        vision_tower = self.get_vision_tower()\n        return vision_tower\n")
    (work / "llava/model/language_model/llava_llama.py").write_text("x(seqlens_in_batch=sorted_seqlens_in_batch)\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(work)]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "vila"]):
        subprocess.run(git + args, check=True)
    return work


def test_vila_clone_and_patches_run_for_real_and_repatch_a_fresh_clone(tmp_path: Path, trtllm_stand_in: None) -> None:
    """The VILA plan's own argv (git clone -- URL DIR, sed -i -- SCRIPT FILE) with the real tools: the patched file
    is edited in place (not deleted as a stale output), a rerun skips the non-idempotent edits, and a fresh clone
    is patched again."""
    repo = _vila_code_repo(tmp_path)
    spec = load_model_or_spec("vila-7B").model_copy(update={"code_source": f"file://{repo}"})
    plan = build_plan(spec, dialect=Dialect.V0_9, workspace=str(tmp_path / "ws"))
    steps = [step for step in plan.steps if step.name == "fetch-code" or step.name.startswith("patch-")]
    sub = _plan_of(steps, tmp_path)
    code = Path(steps[0].outputs[0])
    arch = code / "llava/model/llava_arch.py"

    def check() -> None:
        text = arch.read_text()
        assert "delay_load=False" in text and text.count("attention_mask = torch.ones_like") == 1
        assert "#seqlens_in_batch" in (code / "llava/model/language_model/llava_llama.py").read_text()

    runs = execute.execute_plan(sub, tmp_path / "ws", tmp_path / "logs", lambda line: None, inputs="rev-1")
    assert [run.skipped for run in runs] == [False] * 4
    check()
    runs = execute.execute_plan(sub, tmp_path / "ws", tmp_path / "logs", lambda line: None, inputs="rev-1")
    assert [run.skipped for run in runs] == [True] * 4
    check()
    shutil.rmtree(code)  # the clone is gone: it is made again, and so are its patches
    runs = execute.execute_plan(sub, tmp_path / "ws", tmp_path / "logs", lambda line: None, inputs="rev-1")
    assert [run.skipped for run in runs] == [False] * 4
    check()


def test_the_12_fetch_step_ends_options_before_its_positionals(tmp_path: Path, trtllm_stand_in: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`vlmforge fetch -- SOURCE DIR` as the 1.2 plan writes it, run with the real CLI."""
    plan = build_plan(load_model_or_spec("tiny-llava"), workspace=str(tmp_path / "ws"))
    fetch = plan.steps[0]
    assert fetch.name == "fetch" and fetch.argv[:3] == ["vlmforge", "fetch", "--"]
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    execute.execute_plan(_plan_of([fetch], tmp_path), tmp_path / "ws", tmp_path / "logs", lambda line: None)
    assert (Path(fetch.outputs[0]) / "config.json").is_file()

