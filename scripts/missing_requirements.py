"""Print the requirements of pyproject.toml's optional-dependency groups (extras) that are not
installed in this Python, one per line, so the Makefile installs only what is missing and the
extras stay the single list of what `make bench` / `make test` need.

    python scripts/missing_requirements.py bench test
"""
import re
import sys
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement


def missing(extras):
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    groups = project["optional-dependencies"]
    out = []
    for extra in extras:
        if extra not in groups:
            sys.exit(f"missing_requirements: no extra {extra!r} in pyproject.toml (have {sorted(groups)})")
        for spec in groups[extra]:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate():
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                have = None
            if (have is None or not req.specifier.contains(have, prereleases=True)) and spec not in out:
                out.append(spec)
    return out


if __name__ == "__main__":
    for spec in missing(sys.argv[1:]):
        # quoted for the shell: specs hold '<', '>' and '['
        print("'" + re.sub(r"'", "", spec) + "'")
