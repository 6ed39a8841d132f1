"""Hostile spec files: YAML alias bombs, and spec strings that would become command-line options."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlmforge.errors import SpecError
from vlmforge.specs.catalog import catalog_entry
from vlmforge.specs.schema import load_spec_file, merge_overrides, spec_from_dict
from vlmforge.specs.yaml_io import read_yaml

# "billion laughs": nine levels of nine aliases each, 9**9 strings once expanded (about 8.5 GB when walked).
ALIAS_BOMB = textwrap.dedent("""\
    name: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
    h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
    i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
    family: llava
    source: *i
    """)

# Loads the bomb in a child limited to 1 GiB of address space: without the bound it dies (MemoryError) or hangs
# until the timeout, either way failing this test instead of the machine.
CHILD = """
import resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from vlmforge.errors import SpecError
from vlmforge.specs.schema import load_spec_file
try:
    load_spec_file(Path(sys.argv[1]))
except SpecError as exc:
    print(exc)
    sys.exit(2)
"""


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    child = subprocess.run([sys.executable, "-c", CHILD, str(bomb)], capture_output=True, text=True, timeout=60)
    assert child.returncode == 2, child.stderr[-2000:]
    assert f"{bomb}: YAML aliases expand to more than 10000 values" in child.stdout


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("name: &a [*a]\nfamily: llava\nsource: tiny://llava\n")
    with pytest.raises(SpecError, match="refer to themselves"):
        load_spec_file(path)


def test_small_anchors_still_work(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text("base: &b {max_batch_size: 2}\nlimits: *b\nmore: [*b, *b]\n")
    data, lines = read_yaml(path)
    assert lines[("limits",)] == 2
    assert data["limits"] == {"max_batch_size": 2} and data["more"] == [data["base"]] * 2


def test_a_large_bad_value_is_shown_bounded(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\nfamily: llava\nsource: [" + ", ".join(["abcdefgh"] * 3000) + "]\n")
    with pytest.raises(SpecError) as caught:
        load_spec_file(path)
    assert "source: Input should be a valid string" in str(caught.value) and len(str(caught.value)) < 500


# --- spec strings that land in argv as positionals ---------------------------------------------------------

@pytest.mark.parametrize(("model", "field", "value"), [
    ("vila-7B", "code_source", "--upload-pack=touch /tmp/pwned"),
    ("vila-7B", "code_source", "-oProxyCommand=x"),
    ("llava-1.5-7b-hf", "source", "--help"),
    ("llava-1.5-7b-hf", "source", "-rf"),
])
def test_a_leading_dash_is_refused_where_the_value_is_a_positional(model: str, field: str, value: str) -> None:
    with pytest.raises(SpecError, match=rf"{field}: .*starts with '-'.*\./"):
        spec_from_dict(merge_overrides(catalog_entry(model), {field: value}))


def test_a_dash_inside_a_path_is_fine() -> None:
    spec = spec_from_dict(merge_overrides(catalog_entry("vila-7B"), {"code_source": "./-VILA"}))
    assert spec.code_source == "./-VILA"
    assert spec_from_dict(merge_overrides(catalog_entry("llava-1.5-7b-hf"), {"source": "file:///m/-x"})).source
