"""The package's modules import one another in one direction, and a saved folder carries exactly the model's code;
the test modules import none of one another (what they share lives in tests/conftest.py and plain helper modules).

The graph is read from the sources with `ast`, so that an import inside a function counts as much as one at the top
of a module: a lazy import that closes a cycle is still a cycle. Every module of the installed package
`modeling_blip2` is read from the folder pyproject's package-dir installs it from (`training/` as
`modeling_blip2.training`, ...). `from X import name` is an edge to the module `X.name` when there is one, else to
`X` (a package's `__init__`); the implicit import of parent packages is not an edge.
"""

import ast
import importlib.util
import tomllib
from pathlib import Path

from modeling_blip2.hub import REMOTE_CODE_MODULES


REPOSITORY = Path(__file__).resolve().parent.parent
# The modules a saved folder's config names (auto_map, custom_pipelines): transformers imports these, and through
# them everything they import.
SAVED_FOLDER_ENTRY_MODULES = (
    "modeling_blip2.configuration.configuration_blip2_bridge",
    "modeling_blip2.modeling_stage1",
    "modeling_blip2.modeling_stage2",
    "modeling_blip2.pipeline_image_to_text",
)
# The processor's files travel on their own (transformers copies them for their `_auto_class`): they import nothing
# of the package.
STANDALONE_PROCESSING_MODULES = (
    "modeling_blip2.processing.processing_blip2_bridge",
    "modeling_blip2.processing.image_processing_blip2_bridge",
)


def setuptools_settings() -> dict:
    return tomllib.loads((REPOSITORY / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def package_folders() -> dict[str, Path]:
    """Each installed package of the project -> its source folder, as setuptools maps them."""
    setuptools = setuptools_settings()
    package_dir = setuptools.get("package-dir", {})
    folders = {}
    for package in setuptools["packages"]:
        # setuptools takes the folder of the longest mapped prefix and the rest of the name as sub-folders.
        prefixes = [name for name in package_dir if package == name or package.startswith(f"{name}.")]
        prefix = max(prefixes, key=len, default="")
        rest = package[len(prefix) :].strip(".")
        folder = REPOSITORY / package_dir[prefix] if prefix else REPOSITORY
        folders[package] = folder.joinpath(*rest.split(".")) if rest else folder
    return folders


def package_modules() -> dict[str, Path]:
    """Installed module name -> source file, for every module of every package of the project."""
    modules = {}
    for package, folder in package_folders().items():
        for path in sorted(folder.glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def imported_modules(module: str, source: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of `modules` that `module` imports anywhere in its code `source`, functions included.

    is_package: `source` is the package's `__init__.py`, whose relative imports start from the package itself.
    """
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            origin = node.module
            if node.level:
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                origin = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                imported.add(submodule if submodule in modules else origin)
    return {name for name in imported if name in modules and name != module}


def import_graph() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports."""
    modules = package_modules()
    return {
        module: imported_modules(module, path.read_text(encoding="utf-8"), path.name == "__init__.py", set(modules))
        for module, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a] (each imports the next), or None when there is none."""
    finished = set()
    path, position_on_path = [], {}

    def visit(node):
        position_on_path[node] = len(path)
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if successor in position_on_path:
                return [*path[position_on_path[successor] :], successor]
            if successor not in finished and (cycle := visit(successor)):
                return cycle
        path.pop()
        del position_on_path[node]
        finished.add(node)
        return None

    for node in sorted(graph):
        if node not in finished and (cycle := visit(node)):
            return cycle
    return None


def reachable_from(graph: dict[str, set[str]], roots) -> set[str]:
    reached, pending = set(), list(roots)
    while pending:
        node = pending.pop()
        if node not in reached:
            reached.add(node)
            pending.extend(graph[node])
    return reached


# ---- the finder itself -------------------------------------------------------------------------------------------


def test_cycle_finder_returns_the_cycle_of_a_hand_made_graph_and_none_for_a_diamond():
    with_cycle = {"a": {"b"}, "b": {"c"}, "c": {"d", "a"}, "d": set(), "e": {"a"}}
    assert find_cycle(with_cycle) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"x"}}) == ["x", "y", "x"]
    diamond = {"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}
    assert find_cycle(diamond) is None


def test_imports_inside_functions_and_relative_imports_are_edges():
    modules = {"pkg", "pkg.models", "pkg.builders", "pkg.sub", "pkg.sub.inner", "pkg.sub.tool"}
    source = (
        "import torch\n"
        "from .sub import inner, SomeClass\n"
        "def build():\n"
        "    from .builders import build_model  # lazy, still an edge\n"
        "    import pkg.sub.tool\n"
    )
    assert imported_modules("pkg.models", source, False, modules) == {
        "pkg.sub.inner", "pkg.sub", "pkg.builders", "pkg.sub.tool",
    }  # fmt: skip
    # In a package's __init__, "." is the package itself; ".." its parent.
    assert imported_modules("pkg.sub", "from . import tool\nfrom ..builders import x\n", True, modules) == {
        "pkg.sub.tool", "pkg.builders",
    }  # fmt: skip
    assert imported_modules("pkg.sub.inner", "from . import tool\nfrom .. import models\n", False, modules) == {
        "pkg.sub.tool", "pkg.models",
    }  # fmt: skip
    # A module importing a name of its own package's __init__ is no edge to itself.
    assert imported_modules("pkg.builders", source, False, modules) == {"pkg.sub.inner", "pkg.sub", "pkg.sub.tool"}


# ---- the package ---------------------------------------------------------------------------------------------------


def test_every_source_module_is_the_installed_module_of_its_name():
    modules = package_modules()
    assert {"modeling_blip2.training.trainer", "modeling_blip2.evaluation.runner", "modeling_blip2.metrics",
            "modeling_blip2.quickstart.run", "modeling_blip2.processing.text_cleaning"} <= set(modules)  # fmt: skip
    for module, path in modules.items():
        assert Path(importlib.util.find_spec(module).origin).resolve() == path.resolve(), module
    # No package folder is left out of pyproject's packages (a wheel would lack it).
    installed_folders = {folder.resolve() for folder in package_folders().values()}
    for source_root in setuptools_settings()["package-dir"].values():
        for init in (REPOSITORY / source_root).rglob("__init__.py"):
            assert init.parent.resolve() in installed_folders, f"{init.parent} is not in pyproject's packages"


def test_package_imports_form_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_saved_folder_carries_exactly_the_modules_a_loaded_model_and_its_pipeline_import():
    graph = import_graph()
    modules = package_modules()
    needed = {
        module for module in reachable_from(graph, SAVED_FOLDER_ENTRY_MODULES) if modules[module].name != "__init__.py"
    }
    carried = set(REMOTE_CODE_MODULES.values())
    assert carried == needed, (
        f"carried but never imported: {sorted(carried - needed)}; imported but not carried: {sorted(needed - carried)}"
    )
    assert "modeling_blip2.builders" not in needed and "modeling_blip2.training.trainer" not in needed
    for module in STANDALONE_PROCESSING_MODULES:
        assert graph[module] == set(), f"{module} imports {sorted(graph[module])}, which its saved copy cannot reach"


# ---- the test suite ------------------------------------------------------------------------------------------------
# Test modules are leaves: importing one runs its module-level code and registers its fixtures a second time, and a
# helper that lives in a test module is found only by reading that module's tests.

TESTS = REPOSITORY / "tests"


def is_test_module(module: str) -> bool:
    return module.rpartition(".")[2].startswith("test_")


def imports_of_test_modules(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, test module) for every module of `graph` that imports a test_*.py module, sorted."""
    return sorted(
        (module, imported) for module, targets in graph.items() for imported in targets if is_test_module(imported)
    )


def suite_import_graph() -> dict[str, set[str]]:
    modules = {
        "tests" if path.stem == "__init__" else f"tests.{path.stem}": path for path in sorted(TESTS.glob("*.py"))
    }
    return {
        module: imported_modules(module, path.read_text(encoding="utf-8"), path.name == "__init__.py", set(modules))
        for module, path in modules.items()
    }



def test_imports_of_test_modules_are_found_on_a_planted_example():
    modules = {"tests", "tests.conftest", "tests.helpers", *(f"tests.test_{name}" for name in "abcd")}
    test_ = "tests.test_"  # spelled apart, so that a grep for such imports in tests/ finds none in this file
    sources = {
        "tests.test_a": f"from tests.helpers import make\nfrom {test_}b import fixture_of_b\n",
        "tests.test_b": f"import torch\ndef test_x():\n    import {test_}c  # lazy, still an import\n",
        "tests.test_c": "from tests import test_d\n",
        "tests.test_d": "from . import helpers\nfrom .test_a import CONSTANT\n",
        "tests.helpers": f"from {test_}b import shared  # a helper module reaching into a test module\n",
        "tests.conftest": "from tests.helpers import make\n",
    }
    graph = {module: imported_modules(module, source, False, modules) for module, source in sources.items()}
    assert imports_of_test_modules(graph) == [
        ("tests.helpers", "tests.test_b"), ("tests.test_a", "tests.test_b"), ("tests.test_b", "tests.test_c"),
        ("tests.test_c", "tests.test_d"), ("tests.test_d", "tests.test_a"),
    ]  # fmt: skip
    assert imports_of_test_modules({"tests.test_a": {"tests.helpers", "tests.conftest"}, "tests.helpers": set()}) == []


def test_no_module_of_the_suite_imports_a_test_module():
    graph = suite_import_graph()
    assert {"tests.test_import_graph", "tests.helpers", "tests.tiny_models", "tests.conftest"} <= set(graph)
    assert "tests.tiny_models" in graph["tests.test_stage2"]  # the graph does see the suite's own imports
    offending = imports_of_test_modules(graph)
    assert offending == [], "move what these share to tests/conftest.py or a helper module: " + ", ".join(
        f"{importer} imports {imported}" for importer, imported in offending
    )
