"""Frozen means frozen: the commit that froze each release, and the git history check.

A release directory ``schemas/releases/vN`` is frozen by one commit, recorded in ``FREEZES``;
no later commit may touch it. The hashes test (``tests/unit/test_schemas.py``) cannot guard
this alone: the commit that edits a release can update the pinned hash too, as v3's two late
edits did. Git history cannot be edited that way without rewriting every later commit.

Invariants:

- "Later" is by ancestry, not by date: a commit touching the directory that is reachable from
  ``HEAD`` but not from the freezing commit is a post-freeze edit, whichever branch it came
  from and whatever its timestamp.
- Every commit that touched the directory counts, even one a later commit reverted
  (``--full-history``): the rule is about editing, not about the final bytes (the hash test
  covers those).
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

from broker.errors import WorknodeError

__all__ = [
    "FREEZES",
    "RELEASES_PATH",
    "FrozenHistoryError",
    "is_shallow",
    "post_freeze_commits",
]

RELEASES_PATH = "schemas/releases"
"""Where the frozen releases live, relative to the repository root."""

FREEZES: Mapping[str, str] = {
    # v1 and v2 were frozen together with the first wire contract.
    "v1": "9b60767bdbfeb079c9140904025c0cbdd86f7eed",
    "v2": "9b60767bdbfeb079c9140904025c0cbdd86f7eed",
    # v3 was first frozen by 4102c233 ("Release v3 frozen with golden vectors"), then edited
    # by 79018d19 (healer: digestsOnly, FetchStatesRequest.items) and bfaa2404 (packed
    # prefixes), each updating the pinned hash in the same commit. History is not rewritten:
    # the last of those edits is v3's effective freeze (README, "Changing the schemas").
    "v3": "bfaa2404153f591ab140b6fb46271e6a81d90bc6",
}
"""Release directory name -> full hash of the commit that froze it (one place: add a row
when a release is cut)."""


class FrozenHistoryError(WorknodeError):
    """The git history cannot answer: not a repository, or the freezing commit is unknown
    or not an ancestor of ``HEAD``. Fix ``FREEZES`` or fetch the full history."""


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def is_shallow(repo: Path) -> bool:
    """Whether ``repo`` is a shallow clone (its history is cut short)."""
    result = _git(repo, "rev-parse", "--is-shallow-repository")
    if result.returncode != 0:
        raise FrozenHistoryError(f"{repo}: not a git repository: {result.stderr.strip()}")
    return result.stdout.strip() == "true"


def post_freeze_commits(repo: Path, release: str, freezing: str,
                        releases_path: str = RELEASES_PATH) -> list[str]:
    """Commits (newest first) reachable from ``HEAD`` but not from ``freezing`` that touched
    ``releases_path/release``; empty when the release stayed frozen.

    Raises :class:`FrozenHistoryError` when ``freezing`` is not a commit of ``repo``, not an
    ancestor of ``HEAD``, or did not touch the release (a wrong hash in ``FREEZES``).
    """
    path = f"{releases_path}/{release}"
    if _git(repo, "cat-file", "-e", f"{freezing}^{{commit}}").returncode != 0:
        raise FrozenHistoryError(f"{release}: freezing commit {freezing} is not in {repo}")
    if _git(repo, "merge-base", "--is-ancestor", freezing, "HEAD").returncode != 0:
        raise FrozenHistoryError(f"{release}: freezing commit {freezing} is not an ancestor "
                                 "of HEAD")
    touched = _git(repo, "log", "--format=%H", "--full-history", "-1", freezing, "--", path)
    if touched.stdout.strip() != freezing:
        raise FrozenHistoryError(f"{release}: freezing commit {freezing} did not touch {path}")
    result = _git(repo, "log", "--format=%H", "--full-history", "--no-merges",
                  f"{freezing}..HEAD", "--", path)
    if result.returncode != 0:
        raise FrozenHistoryError(f"{release}: git log failed: {result.stderr.strip()}")
    return result.stdout.split()
