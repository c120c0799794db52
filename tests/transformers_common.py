"""
transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`), fetched for the installed release.

transformers does not ship its test suite in the wheel, but its source distribution on PyPI holds the top-level
`tests/*.py` (among them `test_modeling_common.py` and `test_configuration_common.py`). `load_common_tests()`
downloads that sdist with pip (`pip download --no-deps --no-binary :all: transformers==<installed version>`) into a
cache folder, extracts the top-level `tests/*.py` into `<cache>/transformers_common_tests/` (a package name that does
not clash with our own `tests` package), puts `<cache>` on `sys.path` and imports
`transformers_common_tests.test_modeling_common` and `transformers_common_tests.test_configuration_common`.
Nothing of transformers' is copied into this repository.

The sdist leaves out the sub-packages those modules import relatively. Where a file is missing, a stub stands in:

- `generation/test_utils.py`: `GenerationTesterMixin` is an empty class, so the generation tests
  (`GenerationTesterMixin`'s greedy/beam/sample/... checks) simply do not exist here;
- `exporters/test_export.py`: `ExportTesterMixin` is an empty class, so the export tests (torch.export, ONNX, ...)
  do not exist here;
- `utils/test_configuration_utils.py`: `config_common_kwargs` is an empty dict, so `ConfigTester`'s
  `check_config_arguments_init` checks nothing (it returns early for composite configs, such as ours, anyway).

Where the sdist does hold one of these files, it is extracted instead of the stub.

Cache folder: `~/.cache/blip2-bridge/transformers-tests/<version>/`, or `$BLIP2_BRIDGE_TRANSFORMERS_TESTS/<version>/`.
If the download fails (no registry, a development release with no sdist), `load_common_tests_or_skip()` skips the
calling test module with the reason, unless the environment variable `CI` is set: there it raises.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import transformers

PACKAGE = "transformers_common_tests"
CACHE_ENV = "BLIP2_BRIDGE_TRANSFORMERS_TESTS"
DOWNLOAD_TIMEOUT_S = 600

# Relative imports of the common test modules that the sdist may lack, and what stands in for them.
STUBS = {
    "generation/test_utils.py": (
        '"""Stub: transformers\' sdist lacks tests/generation/; the generation tests do not exist here."""\n\n\n'
        "class GenerationTesterMixin:\n    pass\n"
    ),
    "exporters/test_export.py": (
        '"""Stub: transformers\' sdist lacks tests/exporters/; the export tests do not exist here."""\n\n\n'
        "class ExportTesterMixin:\n    pass\n"
    ),
    "utils/test_configuration_utils.py": (
        '"""Stub: transformers\' sdist lacks tests/utils/; ConfigTester.check_config_arguments_init checks nothing."""\n'
        "\nconfig_common_kwargs = {}\n"
    ),
}
COMPLETE_MARKER = ".complete"


class CommonTestsUnavailable(RuntimeError):
    """transformers' common tests could not be fetched for the installed release."""


def cache_root(version: str | None = None) -> Path:
    version = version or transformers.__version__
    base = os.environ.get(CACHE_ENV)
    root = Path(base) if base else Path.home() / ".cache" / "blip2-bridge" / "transformers-tests"
    return root / version


def _download_sdist(version: str, directory: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "--quiet",
        f"transformers=={version}",
        "-d",
        str(directory),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise CommonTestsUnavailable(f"`{' '.join(command)}` failed: {error}") from error
    archives = sorted(directory.glob("transformers-*.tar.gz"))
    if result.returncode != 0 or not archives:
        output = (result.stderr or result.stdout).strip().splitlines()
        reason = output[-1] if output else f"exit status {result.returncode}"
        raise CommonTestsUnavailable(
            f"could not download transformers=={version}'s source distribution (its tests/): {reason}"
        )
    return archives[0]


def _extract_tests(archive: Path, package: Path) -> None:
    """Top-level tests/*.py, and those files of STUBS the sdist holds, into `package`; stubs for the rest."""
    package.mkdir(parents=True)
    wanted_subfiles = set(STUBS)
    found = set()
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            parts = member.name.split("/")
            # <name>-<version>/tests/<file>.py or <name>-<version>/tests/<sub>/<file>.py
            if len(parts) < 3 or parts[1] != "tests" or not parts[-1].endswith(".py"):
                continue
            relative = "/".join(parts[2:])
            if len(parts) == 3:
                target = package / parts[2]
            elif relative in wanted_subfiles:
                target = package / relative
                found.add(relative)
            else:
                continue
            source = tar.extractfile(member)
            if source is None:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read())
    if not (package / "test_modeling_common.py").is_file():
        raise CommonTestsUnavailable(f"{archive.name} holds no tests/test_modeling_common.py")
    for relative, text in STUBS.items():
        if relative not in found:
            target = package / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    for directory in [package, *(path for path in package.rglob("*") if path.is_dir())]:
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text("")


def fetch_common_tests(version: str | None = None) -> Path:
    """The folder to put on sys.path (holding the `transformers_common_tests` package); downloads once per release."""
    version = version or transformers.__version__
    root = cache_root(version)
    package = root / PACKAGE
    if (root / COMPLETE_MARKER).is_file() and package.is_dir():
        return root
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as scratch:
        scratch = Path(scratch)
        archive = _download_sdist(version, scratch / "download")
        staged = scratch / PACKAGE
        _extract_tests(archive, staged)
        if package.exists():  # a half-made folder of an interrupted run
            shutil.rmtree(package)
        staged.rename(package)
    (root / COMPLETE_MARKER).write_text(f"transformers=={version}\n")
    return root


def load_common_tests(version: str | None = None) -> tuple[ModuleType, ModuleType]:
    """`(test_modeling_common, test_configuration_common)` of transformers' tests for the installed release."""
    root = str(fetch_common_tests(version))
    if root not in sys.path:
        sys.path.insert(0, root)
    modeling = importlib.import_module(f"{PACKAGE}.test_modeling_common")
    configuration = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    return modeling, configuration


def load_common_tests_or_skip() -> tuple[ModuleType, ModuleType]:
    """As `load_common_tests`, but a fetch failure skips the calling test module; with `CI` set it raises."""
    import pytest

    try:
        return load_common_tests()
    except CommonTestsUnavailable as error:
        if os.environ.get("CI"):
            raise CommonTestsUnavailable(f"CI is set, so this is an error, not a skip: {error}") from error
        pytest.skip(f"transformers' common tests unavailable: {error}", allow_module_level=True)
