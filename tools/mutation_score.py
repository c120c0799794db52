"""Mutation score of the core modules against the fast test suite, as a measured figure (not run in CI).

Mutation engine: cosmic-ray (https://github.com/sixty-north/cosmic-ray, ``pip install -e .[mutation]``). Its operators
enumerate the mutants of a module and its ``mutate_code`` applies one at a time; this script only drives it, because
cosmic-ray's own CLI (``init`` / ``exec``) runs one test command for every module, has no sampling and no wall-clock
budget, and counts a timeout as a kill. mutmut 3 was not used: it rewrites every function into a trampoline under
``mutants/`` and maps tests to functions from a full-suite stats run, which does not fit this repository's
``package-dir`` layout (``metrics/`` installs as ``modeling_blip2.metrics``) nor a bounded run on two cores.

What it does:

1. copies the repository (``git archive HEAD`` by default, or the tracked files of the working tree with
   ``--source worktree``) into a temporary folder and links ``modeling_blip2/<sub>`` to the folders that
   ``[tool.setuptools.package-dir]`` maps, so that ``modeling_blip2.metrics`` etc. import from the copy (the
   editable install of the real checkout is never touched, nor the working tree);
2. per module, runs a baseline of the mapped test files (must pass) and a canary (a module that raises on import must
   make them fail: proves the tests import the copy and exercise the module);
3. samples mutants per module (seeded; by default one random operator per mutation site, so that the twelve
   replacements of one ``+`` do not crowd the sample), interleaves the modules, and for each mutant writes the mutated
   module, runs only that module's test files with ``-x -q -p no:cacheprovider -m "not slow"`` under a timeout, and
   restores the module;
4. stops at ``--minutes`` (no new mutant starts after it) and prints per module: tried, killed, survived, timed out,
   incompetent (does not compile), the kill rate, and every survivor as ``file:line operator`` with the changed line.

Kill rate = killed / (killed + survived); timeouts are listed apart (on a loaded machine a slow run is not proof of a
kill) and the rate counting them as kills is printed beside it.

Example (about 35 minutes on 2 cores)::

    python tools/mutation_score.py --sample 15 --minutes 33 \\
        --modules modeling_blip2/losses.py modeling_blip2/modeling_qformer.py --json /tmp/mutation.json

``--tests MODULE=TEST[,TEST...]`` overrides the module -> test files mapping (``TEST_MAP`` below).
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

DEFAULT_MODULES = [
    "modeling_blip2/losses.py",
    "modeling_blip2/modeling_qformer.py",
    "modeling_blip2/modeling_stage1.py",
    "modeling_blip2/modeling_stage2.py",
    "metrics/*.py",
    "evaluation/runner.py",
    "training/collators.py",
]

# Module -> the fast test files that exercise it, fastest and most direct first (``-x`` stops at the first failure).
# A pattern key ("metrics/*.py") applies to every module it matches that has no entry of its own.
TEST_MAP = {
    # test_distributed.py (two gloo processes, ~45 s) is the only fast test where the gathered batch is not square and
    # where _GatherWithGrad.backward runs: it kills mutants that the single-process files cannot.
    "modeling_blip2/losses.py": [
        "tests/test_modeling.py", "tests/test_lavis_reference.py", "tests/test_recipe_models.py",
        "tests/test_reliability_inputs.py", "tests/test_distributed.py",
    ],
    # test_builders.py checks the initialisation (_init_weights) of freshly built models.
    "modeling_blip2/modeling_qformer.py": [
        "tests/test_modeling.py", "tests/test_lavis_reference.py", "tests/test_outputs.py", "tests/test_builders.py",
    ],
    "modeling_blip2/modeling_stage1.py": [
        "tests/test_modeling.py", "tests/test_lavis_reference.py", "tests/test_recipe_models.py", "tests/test_outputs.py",
        "tests/test_builders.py", "tests/test_reliability_inputs.py", "tests/test_distributed.py",
    ],
    "modeling_blip2/modeling_stage2.py": ["tests/test_stage2.py", "tests/test_recipe_models.py", "tests/test_instructblip.py"],
    "metrics/__init__.py": ["tests/test_metrics_evaluate_load.py"],
    "metrics/caption_metrics.py": ["tests/test_metrics_caption.py", "tests/test_metrics_evaluate_load.py"],
    "metrics/coco_caption_scorers.py": ["tests/test_metrics_caption.py", "tests/test_metrics_evaluate_load.py"],
    "metrics/ptb_tokenizer.py": ["tests/test_metrics_caption.py", "tests/test_metrics_evaluate_load.py"],
    "metrics/retrieval_recall.py": ["tests/test_metrics_retrieval.py", "tests/test_metrics_evaluate_load.py"],
    "metrics/vqa_accuracy.py": ["tests/test_metrics_vqa.py", "tests/test_metrics_evaluate_load.py"],
    "evaluation/runner.py": ["tests/test_evaluation.py", "tests/test_recipe_opt_and_eval.py"],
    "training/collators.py": [
        "tests/test_data_collators.py", "tests/test_processing_stage2.py", "tests/test_instruction_tuning.py",
        "tests/test_recipe_opt_and_eval.py", "tests/test_reliability_data.py", "tests/test_data_datasets.py",
    ],
}

PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "-m", "not slow"]


@dataclass
class Mutant:
    module: str
    operator: str
    occurrence: int
    line: int
    col: int
    before: str = ""
    after: str = ""
    outcome: str = ""  # killed | survived | timeout | incompetent | error
    seconds: float = 0.0
    killed_by: str = ""


@dataclass
class ModuleReport:
    module: str
    tests: list
    total_mutants: int = 0
    baseline_seconds: float = 0.0
    skipped: str = ""
    mutants: list = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(1 for m in self.mutants if m.outcome == outcome)


def import_cosmic_ray(extra_path: str | None):
    if extra_path:
        sys.path.insert(0, extra_path)
    try:
        import cosmic_ray.plugins  # noqa: F401
        from cosmic_ray.ast import ast_nodes, get_ast
        from cosmic_ray.mutating import mutate_code
    except ImportError as error:
        sys.exit(f"cosmic-ray is not importable ({error}): pip install -e '.[mutation]', or "
                 "pip install --target DIR cosmic-ray and pass --cosmic-ray-path DIR")
    return cosmic_ray.plugins, ast_nodes, get_ast, mutate_code


def copy_repository(source: str, destination: Path) -> None:
    if source == "head":
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)
    else:
        files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], check=True, capture_output=True).stdout
        for name in filter(None, files.decode().split("\0")):
            source_path = REPO / name
            if source_path.is_file():
                target = destination / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source_path, target)
    # The editable install maps modeling_blip2.<sub> to top-level folders; mirror that in the copy with links.
    package_dir = tomllib.loads((destination / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in package_dir.items():
        parts = package.split(".")
        if len(parts) == 2 and parts[0] == "modeling_blip2":
            link = destination / "modeling_blip2" / parts[1]
            if not link.exists():
                link.symlink_to(Path("..") / folder, target_is_directory=True)


def tests_for(module: str, overrides: dict) -> list:
    if module in overrides:
        return overrides[module]
    if module in TEST_MAP:
        return TEST_MAP[module]
    for pattern, tests in TEST_MAP.items():
        if "*" in pattern and fnmatch.fnmatch(module, pattern):
            return tests
    return []


def test_env(copy: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(copy)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutant written within the same second must not reuse a stale .pyc
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def run_pytest(copy: Path, tests: list, timeout: float) -> tuple[str, float, str]:
    """(outcome, seconds, first failed test or last output line) with outcome passed | failed | timeout | error."""
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", *PYTEST_ARGS, *tests], cwd=copy, env=test_env(copy),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return "timeout", time.monotonic() - start, ""
    seconds = time.monotonic() - start
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    detail = failed.group(1) if failed else (output.strip().splitlines() or [""])[-1]
    if process.returncode == 0:
        return "passed", seconds, detail
    if process.returncode in (1, 2):  # 1: a test failed; 2: interrupted, e.g. an error at collection (import)
        return "failed", seconds, detail
    return "error", seconds, f"pytest exit {process.returncode}: {detail}"


def enumerate_mutants(path: Path, module: str, cosmic) -> list:
    plugins, ast_nodes, get_ast, _ = cosmic
    tree = get_ast(path.read_text())
    mutants = []
    for name in plugins.operator_names():
        operator_class = plugins.get_operator(name)
        if operator_class.arguments():  # needs a configuration (variable inserter/replacer): not used
            continue
        operator = operator_class()
        occurrence = 0
        for node in ast_nodes(tree):
            for start, _end in operator.mutation_positions(node):
                mutants.append(Mutant(module, name, occurrence, start[0], start[1]))
                occurrence += 1
    return mutants


def sample_mutants(mutants: list, sample: int | None, per_site: bool, rng: random.Random) -> list:
    if per_site:
        sites: dict = {}
        for mutant in mutants:
            sites.setdefault((mutant.line, mutant.col), []).append(mutant)
        pool = [rng.choice(group) for _, group in sorted(sites.items())]
    else:
        pool = list(mutants)
    rng.shuffle(pool)
    return pool if sample is None else pool[:sample]


def changed_lines(original: str, mutated: str) -> tuple[str, str]:
    before, after = [], []
    for line in difflib.unified_diff(original.splitlines(), mutated.splitlines(), lineterm="", n=0):
        if line.startswith("-") and not line.startswith("---") and line[1:].strip():
            before.append(line[1:].strip())
        elif line.startswith("+") and not line.startswith("+++") and line[1:].strip():
            after.append(line[1:].strip())
    return " / ".join(before), " / ".join(after)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", default=DEFAULT_MODULES, help="paths or globs relative to the repository")
    parser.add_argument("--sample", type=int, default=None, help="mutants per module (seeded sample); all when omitted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=30.0, help="no new mutant starts after this wall time")
    parser.add_argument("--all-operators-per-site", action="store_true",
                        help="sample among all mutants instead of one random operator per mutation site")
    parser.add_argument("--operators", default=None, help="regex: keep only the cosmic-ray operators it matches")
    parser.add_argument("--timeout-factor", type=float, default=3.0, help="mutant timeout = factor x baseline + 30 s")
    parser.add_argument("--tests", action="append", default=[], metavar="MODULE=TEST[,TEST...]")
    parser.add_argument("--source", choices=["head", "worktree"], default="head",
                        help="copy the committed HEAD (default) or the tracked files as they are in the working tree")
    parser.add_argument("--cosmic-ray-path", default=None, help="folder to add to sys.path to import cosmic-ray")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    parser.add_argument("--json", default=None, help="also write the full results here")
    args = parser.parse_args(argv)

    cosmic = import_cosmic_ray(args.cosmic_ray_path)
    mutate_code = cosmic[3]
    overrides = {}
    for item in args.tests:
        module, _, tests = item.partition("=")
        overrides[module] = [t for t in tests.split(",") if t]
    deadline = time.monotonic() + args.minutes * 60
    rng = random.Random(args.seed)

    workdir = Path(tempfile.mkdtemp(prefix="mutation-tree-"))
    copy = workdir / "repo"
    copy.mkdir()
    print(f"copy of the repository ({args.source}): {copy}", flush=True)
    copy_repository(args.source, copy)

    modules = []
    for pattern in args.modules:
        matches = sorted(str(p.relative_to(copy)) for p in copy.glob(pattern) if p.is_file())
        modules.extend(m for m in matches if m not in modules)

    reports, queues = {}, {}
    try:
        for module in modules:
            tests = tests_for(module, overrides)
            report = reports[module] = ModuleReport(module, tests)
            path = copy / module
            original = path.read_text()
            if not tests:
                report.skipped = "no test files mapped"
                continue
            all_mutants = enumerate_mutants(path, module, cosmic)
            if args.operators:
                all_mutants = [m for m in all_mutants if re.search(args.operators, m.operator)]
            report.total_mutants = len(all_mutants)
            if not all_mutants:
                report.skipped = "no mutants"
                continue
            if time.monotonic() > deadline:
                report.skipped = "time budget spent before its baseline"
                continue
            outcome, seconds, detail = run_pytest(copy, tests, timeout=max(60 * 10, args.minutes * 60))
            report.baseline_seconds = seconds
            if outcome != "passed":
                report.skipped = f"baseline {outcome}: {detail}"
                continue
            try:  # canary: the mapped tests must import this very file of the copy
                path.write_text("raise RuntimeError('mutation canary')\n" + original)
                canary, _, _ = run_pytest(copy, tests, timeout=seconds * args.timeout_factor + 30)
            finally:
                path.write_text(original)
            if canary != "failed":
                report.skipped = f"canary {canary}: the mapped tests do not import {module} from the copy"
                continue
            print(f"{module}: {len(all_mutants)} mutants, baseline {seconds:.0f}s over {' '.join(tests)}", flush=True)
            queues[module] = sample_mutants(all_mutants, args.sample, not args.all_operators_per_site, rng)

        # Interleave the modules so that a time budget spreads over all of them.
        while any(queues.values()) and time.monotonic() < deadline:
            for module in list(queues):
                if not queues[module] or time.monotonic() >= deadline:
                    continue
                mutant = queues[module].pop(0)
                report = reports[module]
                path = copy / module
                original = path.read_text()
                operator = cosmic[0].get_operator(mutant.operator)()
                mutated = mutate_code(original, operator, mutant.occurrence)
                if mutated is None:
                    continue
                mutant.before, mutant.after = changed_lines(original, mutated)
                try:
                    with warnings.catch_warnings():  # e.g. "is" with a literal: the mutant is still valid code
                        warnings.simplefilter("ignore")
                        compile(mutated, str(path), "exec")
                except SyntaxError:
                    mutant.outcome = "incompetent"
                    report.mutants.append(mutant)
                    continue
                try:
                    path.write_text(mutated)
                    outcome, mutant.seconds, detail = run_pytest(
                        copy, report.tests, timeout=report.baseline_seconds * args.timeout_factor + 30)
                finally:
                    path.write_text(original)
                mutant.outcome = {"passed": "survived", "failed": "killed"}.get(outcome, outcome)
                mutant.killed_by = detail if mutant.outcome == "killed" else ""
                report.mutants.append(mutant)
                print(f"  {mutant.outcome:9s} {module}:{mutant.line} {mutant.operator} "
                      f"[{mutant.before} -> {mutant.after}] {mutant.seconds:.0f}s {mutant.killed_by}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print("\nmodule                               mutants tried killed survived timeout incompetent  kill-rate (timeouts as kills)")
    totals = {"tried": 0, "killed": 0, "survived": 0, "timeout": 0}
    for module, report in reports.items():
        if report.skipped:
            print(f"{module:38s} skipped: {report.skipped}")
            continue
        killed, survived, timeout = report.count("killed"), report.count("survived"), report.count("timeout")
        tried = len(report.mutants)
        for key, value in zip(totals, (tried, killed, survived, timeout)):
            totals[key] += value
        rate = f"{killed / (killed + survived):6.1%}" if killed + survived else "   n/a"
        rate_t = f"{(killed + timeout) / (killed + survived + timeout):6.1%}" if killed + survived + timeout else "n/a"
        print(f"{module:38s} {report.total_mutants:7d} {tried:5d} {killed:6d} {survived:8d} {timeout:7d} "
              f"{report.count('incompetent'):11d}  {rate} ({rate_t})")
    k, s, t = totals["killed"], totals["survived"], totals["timeout"]
    if k + s:
        print(f"{'TOTAL':38s} {'':7s} {totals['tried']:5d} {k:6d} {s:8d} {t:7d} {'':11s}  {k / (k + s):6.1%} "
              f"({(k + t) / (k + s + t):6.1%})")
    print("\nsurvivors (judge each: equivalent, or a test gap):")
    for module, report in reports.items():
        for mutant in report.mutants:
            if mutant.outcome in ("survived", "timeout", "error"):
                print(f"  {module}:{mutant.line}  {mutant.operator}  [{mutant.outcome}]\n      - {mutant.before}\n"
                      f"      + {mutant.after}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {m: {**{k: v for k, v in asdict(r).items() if k != "mutants"}, "mutants": [asdict(x) for x in r.mutants]}
             for m, r in reports.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
