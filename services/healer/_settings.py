"""Settings of the healer service: ``WORKNODE_HEALER_*`` environment variables and TOML."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from broker.crdt import validate_replica_id
from broker.transport import validate_token
from services._connection import NatsClientSettings

__all__ = ["HealerSettings"]


class HealerSettings(NatsClientSettings):
    """What the healer needs; see the README's healing section (the ``nats_*`` connection
    fields come from ``NatsClientSettings``)."""

    model_config = SettingsConfigDict(env_prefix="WORKNODE_HEALER_", extra="forbid")

    node_id: str = Field("healer", description="Signs repairs and heal reports.")
    namespace: str = "default"
    subjects: list[str] = Field(
        default_factory=list,
        description="Subjects to heal (metrics labels); empty: every subject replicas serve.",
    )
    nats_urls: list[str] = Field(min_length=1, description="NATS servers of the replicas.")
    state_dir: Path = Path(".worknode/healer")
    key_file: Path | None = None
    roster_file: Path | None = None
    key_reload_interval_s: float = Field(
        5.0, ge=0, le=3600,
        description="How often the roster file is checked for a change (0: only on SIGHUP).",
    )
    cluster_secret_file: Path = Field(
        description="The secret every replica keys its Merkle tree with (same file)."
    )
    interval_s: float = Field(10.0, gt=0, description="Heal every subject this often.")
    membership_poll_s: float = Field(
        1.0, gt=0, description="Discovery poll: heal at once on change."
    )
    discover_timeout_s: float = Field(
        0.3, gt=0, description="Discovery: how long to wait for replicas' answers at most."
    )
    discover_idle_s: float = Field(
        0.05, ge=0, description=(
            "A membership poll of the heal loop ends this long after the last answer once at "
            "least as many replicas answered as last time (0: always wait discover_timeout_s), "
            "so a returning replica is healed at once. Scheduled and triggered heals, and "
            "one-shot heals (`worknode healer --once`, `worknode up`), wait the whole "
            "discover_timeout_s."
        ),
    )
    retry_s: float = Field(1.0, gt=0, description="Retry delay after a failed or partial heal.")
    max_rounds: int = Field(3, ge=1, le=20, description="Re-checks while writes keep landing.")
    bytes_per_second: float = Field(20e6, gt=0, description="Throttle on bytes moved.")
    fetch_batch: int = Field(
        500, ge=1, le=2_000,
        description="Keys per fetch/apply call (replicas refuse fetches of more than 2,000).",
    )
    hash_bytes: int = Field(
        6, ge=4, le=32,
        description="Bytes of each node value and leaf digest on the wire (their low bytes).",
    )
    item_bytes: int = Field(
        4, ge=0, le=32,
        description="Leaves send item digests alone, this many low bytes each (0: keys too).",
    )
    request_timeout_s: float = Field(5.0, gt=0)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(0, ge=0, le=65535, description="0: a free port.")

    @field_validator("node_id")
    @classmethod
    def _node(cls, v: str) -> str:
        return validate_replica_id(v)

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: str) -> str:
        return validate_token(v, "namespace")

    @field_validator("subjects")
    @classmethod
    def _subjects(cls, v: list[str]) -> list[str]:
        return [validate_token(s, "subject") for s in v]

    def key_path(self) -> Path:
        """Where the healer's signing seed lives."""
        return self.key_file or self.state_dir / f"{self.node_id}.key"
