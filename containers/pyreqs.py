#!/usr/bin/env python3
"""Requirement lists for image builds, from pyproject.toml and the interpreter's installed packages.

Standard library only: it runs inside base images before anything is installed.

    pyreqs.py requirements PYPROJECT EXTRAS    the project's dependencies plus those of the comma-
                                               separated EXTRAS (self-references expanded, the project
                                               itself left out): a cacheable layer before the source
    pyreqs.py constraints CONSTRAINTS PATTERNS  pins for installed packages whose names match the
                                               comma-separated fnmatch PATTERNS (what a base image
                                               must keep: torch, tensorrt_llm, ...), then the lines of
                                               CONSTRAINTS for every other package
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import re
import sys
import tomllib

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[([^\]]*)\])?")


def canonical(name: str) -> str:
    """PEP 503 normalised name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: str, extras: str) -> list[str]:
    """Dependencies of the project with `extras`, expanding `project[extra]` self-references."""
    project = tomllib.load(open(pyproject, "rb"))["project"]
    if "dependencies" in project.get("dynamic", []):
        return []  # the build backend computes them; the install of the source resolves them
    me = canonical(project["name"])
    optional = project.get("optional-dependencies", {})
    out: list[str] = []
    todo = [""] + [e.strip() for e in extras.split(",") if e.strip()]
    seen: set[str] = set()
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        if extra and extra not in optional:
            sys.exit(f"pyreqs: extra {extra!r} is not in {pyproject} (has: {', '.join(sorted(optional))})")
        for req in project.get("dependencies", []) if not extra else optional[extra]:
            m = _NAME.match(req)
            if m and canonical(m.group(1)) == me:
                todo += [e.strip() for e in (m.group(3) or "").split(",") if e.strip()]
            elif req not in out:
                out.append(req)
    return out


def constraints(repo_constraints: str, patterns: str) -> list[str]:
    """Pins of installed packages matching `patterns`, then the repository's pins for the rest."""
    globs = [canonical(p.strip()) for p in patterns.split(",") if p.strip()]
    kept: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and any(fnmatch.fnmatch(canonical(name), g) for g in globs):
            kept[canonical(name)] = f"{name}=={dist.version}"
    out = [f"# kept from the base image ({len(kept)} packages)"] + sorted(kept.values())
    out.append(f"# from {repo_constraints}, except the packages above")
    for line in open(repo_constraints):
        line = line.split("#", 1)[0].strip()
        m = _NAME.match(line)
        if line and not line.startswith("-") and m and canonical(m.group(1)) not in kept:
            out.append(line)
    return out


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[0] == "requirements":
        print("\n".join(requirements(argv[1], argv[2])))
    elif len(argv) == 3 and argv[0] == "constraints":
        print("\n".join(constraints(argv[1], argv[2])))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
