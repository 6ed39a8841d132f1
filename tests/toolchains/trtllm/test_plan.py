"""Spec strings in plan argv: an option value that starts with '-' still reaches run.py as that option's value."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from vlmforge.plans.model import DIALECTS
from vlmforge.specs.catalog import catalog_entry
from vlmforge.specs.schema import Dialect, merge_overrides, spec_from_dict
from vlmforge.toolchains.trtllm.plan import build_plan

FLAGS = json.loads((Path(__file__).parents[2] / "contract" / "trtllm_flags.json").read_text())


def run_py_parser(dialect: Dialect) -> argparse.ArgumentParser:
    """run.py's options as the release declares them (tests/contract/trtllm_flags.json): nargs and flag actions."""
    scripts = FLAGS["dialects"][dialect.value]["scripts"]
    script = scripts[f"{DIALECTS[dialect].multimodal_dir}/run.py"]
    parser = argparse.ArgumentParser(exit_on_error=False)
    for flag in script["flags"]:
        details = script.get("details", {}).get(flag, {})
        if details.get("action") in ("store_true", "store_false"):
            parser.add_argument(flag, action=details["action"])
        else:
            parser.add_argument(flag, nargs=details.get("nargs"))
    return parser


@pytest.mark.parametrize("dialect", list(Dialect), ids=lambda d: d.value)
@pytest.mark.parametrize("text", ["-v", "--hf_model_dir=/elsewhere", "- a list item?", "Question: what is this?"])
def test_input_text_reaches_run_py_as_its_value(dialect: Dialect, text: str) -> None:
    spec = spec_from_dict(merge_overrides(catalog_entry("llava-1.5-7b-hf"), {"validation.input_text": text}))
    plan = build_plan(spec, dialect=dialect)
    argv = next(step.argv for step in plan.steps if step.name == "validate")
    args = argv[next(i for i, token in enumerate(argv) if token.endswith("run.py")) + 1:]
    parsed = run_py_parser(dialect).parse_args(args)
    value = parsed.input_text
    assert (value if isinstance(value, str) else " ".join(value)) == text
    assert parsed.hf_model_dir == plan.steps[0].outputs[0]  # not the one the text names


def test_an_ordinary_prompt_keeps_the_seed_s_two_tokens() -> None:
    plan = build_plan(spec_from_dict(catalog_entry("llava-1.5-7b-hf")), dialect=Dialect.V0_9)
    argv = next(step.argv for step in plan.steps if step.name == "validate")
    assert argv[argv.index("--input_text") + 1] == "Question: which city is this? Answer:"
