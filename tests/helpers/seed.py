"""Read the seed README's shell blocks into argv lists, as bash would split them."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

SEED = Path(__file__).resolve().parents[1] / "golden" / "seed-multimodal-README.md"
PATH_FLAGS = frozenset({
    "--model_dir", "--output_dir", "--checkpoint_dir", "--hf_model_dir", "--visual_engine_dir",
    "--llm_engine_dir", "--model_path", "--vila_path", "--engine_dir",
})


@dataclass(frozen=True)
class SeedBlock:
    section: str
    commands: list[list[str]]


def _logical_lines(block: str) -> list[str]:
    """Join backslash-newline continuations outside single quotes; split commands at other newlines."""
    lines, current, quote = [], [], None
    i = 0
    while i < len(block):
        ch = block[i]
        if quote:
            current.append(ch)
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
            current.append(ch)
        elif ch == "#" and (not current or current[-1].isspace()):
            while i < len(block) and block[i] != "\n":  # a comment runs to the end of the line
                i += 1
            continue
        elif ch == "\\" and i + 1 < len(block) and block[i + 1] == "\n":
            current.append(" ")
            i += 2
            continue
        elif ch == "\n":
            lines.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    lines.append("".join(current))
    return [line.strip() for line in lines if line.strip()]


def parse_blocks(text: str | None = None) -> list[SeedBlock]:
    """Every ```bash block with its section heading; variables from `export` lines are expanded."""
    text = text if text is not None else SEED.read_text(encoding="utf-8")
    blocks: list[SeedBlock] = []
    section = ""
    env: dict[str, str] = {}
    pending_prefix: list[str] = []
    for match in re.finditer(r"^(#+ [^\n]*)$|```bash\n(.*?)```", text, flags=re.M | re.S):
        if match.group(1):
            section = match.group(1).lstrip("# ").strip()
            continue
        commands: list[list[str]] = []
        for line in _logical_lines(match.group(2)):
            argv = shlex.split(line)
            if argv[:1] == ["export"]:
                name, _, value = argv[1].partition("=")
                env[name] = value
                continue
            argv = [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], token) for token in argv]
            if argv[0] == "mpirun" and not any(token.endswith(".py") for token in argv):
                # The seed's reflow split `mpirun ... \` from the command it prefixes.
                pending_prefix = argv
                continue
            commands.append(pending_prefix + argv)
            pending_prefix = []
        blocks.append(SeedBlock(section=section, commands=commands))
    return blocks


def normalize(argv: list[str]) -> tuple[tuple[str, ...], tuple[tuple[str, str | None], ...]]:
    """(program words, sorted flags) with path values dropped: 'exact, paths aside'."""
    program: list[str] = []
    index = 0
    while index < len(argv) and (argv[index] == "--" or not argv[index].startswith("--")):  # `--`: end of options
        program.append(argv[index])
        index += 1
    if program[:1] == ["mpirun"]:
        # mpirun's own options precede the program: -n N --allow-run-as-root
        rest = argv[len(program):]
        program += [token for token in rest[:1]]
        tail = rest[1:]
        inner_program, inner_flags = normalize(tail)
        return tuple(program) + inner_program, inner_flags
    if program[:2] == ["git", "clone"]:
        program = program[:-1]  # the URL, not the destination
    if program[:1] == ["sed"]:
        program = program[:-1] + [Path(program[-1]).name] if len(program) > 3 else program
    flags: list[tuple[str, str | None]] = []
    while index < len(argv):
        flag = argv[index]
        value = None
        if index + 1 < len(argv) and not argv[index + 1].startswith("--"):
            value = argv[index + 1]
            index += 1
        flags.append((flag, "<path>" if flag in PATH_FLAGS else value))
        index += 1
    return tuple(program), tuple(sorted(flags, key=lambda item: (item[0], item[1] or "")))
