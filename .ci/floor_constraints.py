"""Prints pip constraints pinning every dependency of pyproject.toml to its declared floor (`name>=X` -> `name==X`).

torch is left out: CI keeps the CPU wheel the README installs first; the other floors are tested against it.
"""

import re
import sys
import tomllib
from pathlib import Path

pyproject = tomllib.loads(Path(__file__).resolve().parent.parent.joinpath("pyproject.toml").read_text())
for requirement in pyproject["project"]["dependencies"]:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,\s]+).*", requirement)
    if match is None:
        sys.exit(f"dependency {requirement!r} has no '>=' floor; every dependency declares the lowest release it works with")
    name, floor = match.groups()
    if name != "torch":
        print(f"{name}=={floor}")
