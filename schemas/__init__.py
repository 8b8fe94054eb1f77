"""Where the Cap'n Proto wire contract lives on disk.

``schemas/*.capnp`` is the current wire version; ``schemas/releases/vN/`` holds every released
version, frozen. Shipped as package data so an installed worknode finds its schemas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

__all__ = ["CURRENT_DIR", "CURRENT_VERSION", "FILES", "RELEASES_DIR", "release_dir"]

CURRENT_DIR: Final = Path(__file__).resolve().parent
RELEASES_DIR: Final = CURRENT_DIR / "releases"
CURRENT_VERSION: Final = 3
"""The wire version ``CURRENT_DIR`` describes; equal to the newest frozen release."""

FILES: Final = ("crdt.capnp", "envelope.capnp", "rpc.capnp", "healer.capnp")


def release_dir(version: int) -> Path:
    """The directory of a frozen release, ``releases/v<version>``."""
    return RELEASES_DIR / f"v{version}"
