"""Shared pytest fixtures and options. Plain builders and constants live in modules of their own (tiny_models.py,
helpers.py, data_files.py, trainer_helpers.py, lavis_checkpoints.py, oracle_pairs.py): test modules import those, never
each other (tests/test_import_graph.py checks it).

`slow` tests (end-to-end runs of more than a few seconds) run only with `--run-slow`, except those also marked
`cross_version`: a second venv named by BLIP2_BRIDGE_OTHER_PYTHON already asks for them (without it they skip), so CI's
floor venv keeps running them with `-m "not slow or cross_version"`. `-m` still selects by mark as before.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import EntryNotFoundError


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords and "cross_version" not in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): one intra-op thread is faster
    than two, and a step that waits for both threads at every operation took several times longer whenever another
    process was busy on one of two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """HfApi's repo creation and commits, and model-card downloads, served by local folders (one per repo)."""
    root = tmp_path / "hub"
    commits = []

    def create_repo(self, repo_id, **kwargs):
        (root / repo_id).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        for operation in operations:
            destination = root / repo_id / operation.path_in_repo
            destination.parent.mkdir(parents=True, exist_ok=True)
            source = operation.path_or_fileobj
            destination.write_bytes(Path(source).read_bytes() if isinstance(source, (str, Path)) else source)
        commits.append((repo_id, commit_message, sorted(operation.path_in_repo for operation in operations)))
        return SimpleNamespace(oid=str(len(commits)))

    def load_card(repo_id, **kwargs):
        from huggingface_hub import ModelCard

        path = root / repo_id / "README.md"
        if not path.exists():
            raise EntryNotFoundError(f"{repo_id} has no README.md")
        return ModelCard(path.read_text())

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr("huggingface_hub.ModelCard.load", load_card)
    return SimpleNamespace(root=root, commits=commits)
