#!/usr/bin/env python3
"""Requirements that a wheelhouse lacks for another patch release of Python.

pip evaluates environment markers against the interpreter that runs it, so a wheelhouse made with
Python 3.11.7 lacks `async-timeout; python_full_version < "3.11.3"`, which Debian bookworm's 3.11.2
needs. This reads every wheel's Requires-Dist, evaluates the markers for the image's version, and
prints one requirement a line for each dependency the image needs whose name has no wheel yet.

    wheelhouse_markers.py WHEELHOUSE IMAGE_PYTHON_FULL_VERSION

Extras are taken as not requested: a dependency gated by both an extra and a version is not seen.
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

from pip._vendor.packaging.markers import default_environment
from pip._vendor.packaging.requirements import Requirement


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing(wheelhouse: Path, version: str) -> list[str]:
    host = default_environment()
    image = dict(host, python_full_version=version, python_version=".".join(version.split(".")[:2]),
                 implementation_version=version)
    wheels = sorted(wheelhouse.glob("*.whl"))
    have = {canonical(w.name.split("-")[0]) for w in wheels}
    out: dict[str, str] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode("utf-8", "replace").splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or canonical(req.name) in have:
                continue
            if req.marker.evaluate(dict(image, extra="")) and not req.marker.evaluate(dict(host, extra="")):
                out.setdefault(canonical(req.name), f"{req.name}{req.specifier}")
    return sorted(out.values())


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    for requirement in missing(Path(sys.argv[1]), sys.argv[2]):
        print(requirement)
