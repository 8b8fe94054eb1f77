"""Frozen means frozen: no commit after a release's freezing commit touched its directory.

The real check reads this repository's git history; it skips only in a shallow clone (the
history it needs is not there). The simulated histories prove the check fails on a
post-freeze edit, on the main line or on a merged side branch, and even when the edit was
reverted.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from broker.codec import SUPPORTED_VERSIONS
from services.schemacheck._frozen import (
    FREEZES,
    FrozenHistoryError,
    is_shallow,
    post_freeze_commits,
)

ROOT = Path(__file__).resolve().parents[2]


def _repo_root() -> Path:
    result = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--show-toplevel"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, (
        f"{ROOT} is not a git checkout: the frozen-release rule needs the history "
        f"({result.stderr.strip()})")
    return Path(result.stdout.strip())


def test_every_release_has_a_freezing_commit() -> None:
    on_disk = sorted(p.name for p in (ROOT / "schemas" / "releases").glob("v*") if p.is_dir())
    assert sorted(FREEZES) == on_disk == [f"v{v}" for v in SUPPORTED_VERSIONS]


def test_no_commit_touched_a_release_after_its_freezing_commit() -> None:
    repo = _repo_root()
    if is_shallow(repo):
        pytest.skip("shallow clone: the history before HEAD is missing, so post-freeze "
                    "edits cannot be told apart (clone without --depth, or git fetch "
                    "--unshallow)")
    edited = {release: post_freeze_commits(repo, release, commit)
              for release, commit in FREEZES.items()}
    assert edited == {release: [] for release in FREEZES}


def test_v3_first_freeze_was_edited_twice_afterwards() -> None:
    """The history the effective freeze of v3 accounts for (README): measured from its first
    freeze, the check finds the two later edits."""
    repo = _repo_root()
    if is_shallow(repo):
        pytest.skip("shallow clone: the history before HEAD is missing")
    first_freeze = "4102c233382044b61126c90a67ee4ca795e6ea29"
    assert post_freeze_commits(repo, "v3", first_freeze) == [
        FREEZES["v3"], "79018d19e424696b05142226f3e65d9e9dddb88d",
    ]


# --- simulated histories -----------------------------------------------------------------------


class _Repo:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.env = {**os.environ, "HOME": str(path), "GIT_CONFIG_NOSYSTEM": "1",
                    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
                    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
        self.git("init", "-q", "-b", "main")

    def git(self, *args: str) -> str:
        result = subprocess.run(["git", "-C", str(self.path), *args], capture_output=True,
                                text=True, env=self.env, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def commit(self, message: str, **files: str) -> str:
        for name, text in files.items():
            target = self.path / name.replace("__", "/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            self.git("add", str(target))
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD")


_V1 = "schemas__releases__v1__a.capnp"


@pytest.fixture
def repo(tmp_path: Path) -> _Repo:
    return _Repo(tmp_path)


def test_a_post_freeze_edit_is_found(repo: _Repo) -> None:
    repo.commit("start", **{"README": "x"})
    freeze = repo.commit("freeze v1", **{_V1: "@0x1;\n"})
    repo.commit("unrelated", **{"README": "y", "schemas__b.capnp": "@0x2;\n"})
    assert post_freeze_commits(repo.path, "v1", freeze) == []

    edit = repo.commit("edit v1 after its freeze", **{_V1: "@0x1;\n# changed\n"})

    assert post_freeze_commits(repo.path, "v1", freeze) == [edit]
    assert post_freeze_commits(repo.path, "v1", edit) == []  # a later effective freeze


def test_an_edit_on_a_merged_branch_and_a_reverted_edit_are_found(repo: _Repo) -> None:
    freeze = repo.commit("freeze v1", **{_V1: "@0x1;\n"})
    repo.git("checkout", "-q", "-b", "side")
    side = repo.commit("side edit", **{_V1: "@0x1;\n# side\n"})
    repo.git("checkout", "-q", "main")
    repo.commit("main work", **{"README": "z"})
    repo.git("merge", "-q", "--no-edit", "side")
    edit = repo.commit("edit", **{_V1: "@0x1;\n# again\n"})
    revert = repo.commit("put it back", **{_V1: "@0x1;\n# side\n"})

    assert set(post_freeze_commits(repo.path, "v1", freeze)) == {side, edit, revert}


def test_a_wrong_freezing_commit_is_an_error(repo: _Repo) -> None:
    other = repo.commit("no release here", **{"README": "x"})
    repo.commit("freeze v1", **{_V1: "@0x1;\n"})

    with pytest.raises(FrozenHistoryError, match="did not touch"):
        post_freeze_commits(repo.path, "v1", other)
    with pytest.raises(FrozenHistoryError, match="is not in"):
        post_freeze_commits(repo.path, "v1", "0" * 40)


def test_a_shallow_clone_is_detected(repo: _Repo, tmp_path_factory: pytest.TempPathFactory) -> None:
    repo.commit("one", **{_V1: "@0x1;\n"})
    repo.commit("two", **{"README": "x"})
    clone = tmp_path_factory.mktemp("clone") / "c"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{repo.path}", str(clone)],
                   check=True, capture_output=True, timeout=60, env=repo.env)

    assert is_shallow(clone)
    assert not is_shallow(repo.path)
