"""Settings of a worknode service: environment variables (``WORKNODE_*``) and a TOML file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from broker.codec import CURRENT_VERSION, OLDEST_VERSION
from broker.crdt import validate_replica_id
from broker.transport import validate_token
from services._config import read_toml
from services._connection import NatsClientSettings

__all__ = ["WorknodeSettings"]


class WorknodeSettings(NatsClientSettings):
    """Everything a worknode service needs; see the README's settings table.

    The ``nats_*`` connection fields come from ``NatsClientSettings``. Sources, highest
    priority first: constructor arguments, ``WORKNODE_*`` environment
    variables (lists as JSON, e.g. ``WORKNODE_SUBJECTS='["orders","users"]'``), then the TOML
    file named by ``config_file`` (or ``WORKNODE_CONFIG_FILE``).
    """

    model_config = SettingsConfigDict(env_prefix="WORKNODE_", extra="forbid")

    node_id: str = Field(description="This node's id: names its dots and its signing key.")
    namespace: str = Field("default", description="First subject token after `wn`.")
    subjects: list[str] = Field(
        default_factory=lambda: ["demo"], description="Subjects this node replicates."
    )
    state_dir: Path = Field(Path(".worknode"), description="Store, keys, embedded server data.")
    key_file: Path | None = Field(
        None, description="Ed25519 seed file (32 bytes); default <state_dir>/<node_id>.key."
    )
    roster_file: Path | None = Field(
        None, description='JSON {"node-id": "<public key hex>" or {"key", "role", "previous", '
        '"previous_until"}}: whose envelopes to accept. Reloaded on change and on SIGHUP.'
    )
    key_reload_interval_s: float = Field(
        5.0, ge=0, le=3600,
        description="How often the roster and RPC keyring files are checked for a change "
        "(0: only on SIGHUP).",
    )
    cluster_secret_file: Path | None = Field(
        None,
        description="Merkle-tree secret shared with the healer; set it to serve healing.",
    )
    healers: list[str] = Field(
        default_factory=list,
        description="Ids (roster keys) allowed to call this node's healing endpoints; empty: "
        "the roster's healer identities (role healer; for a roster without roles, the id "
        "'healer').",
    )
    heal_rate_per_s: float = Field(
        200.0, gt=0, description="Healing requests per second one healer may make."
    )
    heal_burst: int = Field(2_000, ge=1, description="Healing requests one healer may burst.")
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(
        0, ge=0, le=65535, description="0 picks a free port; null disables."
    )
    wire_version: int = Field(CURRENT_VERSION, description="Wire version this node writes.")
    peer_version: int = Field(
        OLDEST_VERSION, description="Oldest wire version among readers (rolling upgrades)."
    )
    flush_interval_ms: float = Field(5.0, gt=0, le=10_000)
    adaptive_flush: bool = Field(
        True, description="Publish a write at once after a quiet flush window (Nagle-style)."
    )
    max_batch_ops: int = Field(5_000, gt=0, le=1_000_000)
    max_pending_ops: int = Field(100_000, gt=0, le=100_000_000)
    snapshot_every: int = Field(20_000, gt=0)
    byzantine_max_hold_s: float = Field(
        30.0, gt=0, le=3600,
        description="Seconds a peer's delta whose causal context claims dots nobody has "
        "shown is held for them at most; then it is rejected as unbacked_context and its "
        "signer counted (worknode_byzantine_rejected_total).",
    )
    evidence_max_bytes: int = Field(
        6 * 1024 * 1024, ge=0, le=256 * 1024 * 1024,
        description="Bytes of other writers' signed batches and states each subject keeps "
        "(newest first) to forward with its catch-up answers: a relay vouches only for its own "
        "writes, so another writer's write reaches a replica that missed it under that "
        "writer's own signature. Stored with snapshots up to the store's record bound.",
    )
    store_sync: Literal["full", "normal"] = Field(
        "full", description="full: fsync each commit; normal: survives kill -9, not power loss."
    )
    rpc_keyring_file: Path | None = Field(
        None,
        description='JSON {"<key id>": "<root public key hex>"}: set it to serve RPC '
        "(tokens are verified against these keys).",
    )
    rpc_revocation_subject: str = Field(
        "revocations", description="Subject of the replicated set of revoked token ids."
    )
    add_only_subjects: list[str] | None = Field(
        None,
        description="Subjects that only grow: a peer's delta or state that would remove "
        "anything held is rejected (metric reason 'removal'), a local write that would "
        "fails. Null (default): the revocation subject; [] turns it off.",
    )
    strong: dict[str, list[str]] = Field(
        default_factory=dict,
        description="STRONG worknodes per subject: subject -> worknode id prefixes ('' = "
        "every worknode of the subject). They are written and read only with consistency "
        "STRONG, through the subject's JetStream stream (a compare-and-set log).",
    )
    strong_replicas: int = Field(
        1, description="Replicas of each STRONG stream: 1 on one server (stated as such: no "
        "fault tolerance), 3 or 5 in a cluster (a Raft quorum).")
    strong_max_worknodes: int = Field(
        -1, ge=-1, description="STRONG worknodes a subject's stream holds at most (its last "
        "entry each); a STRONG write creating one more is refused by the stream. -1: no "
        "bound.")
    strong_timeout_s: float = Field(
        2.0, gt=0, le=60, description="Seconds a STRONG write or read may take; in a "
        "minority it fails then (UnavailableError), never hangs.")
    rpc_max_in_flight: int = Field(64, gt=0, le=100_000)
    rpc_max_request_bytes: int = Field(64 * 1024, ge=1024, le=64 * 1024 * 1024)
    rpc_authorize_budget_ms: float = Field(
        100, gt=0, le=10_000,
        description="Wall time one token authorization may take (in a worker process, off "
        "the event loop); a token over it is refused (RESOURCE_EXHAUSTED, token_limit).",
    )
    rpc_authorize_workers: int = Field(
        1, ge=1, le=64, description="Worker processes authorizing tokens not yet cached."
    )
    rpc_rate_per_s: float = Field(
        1_000, gt=0, description="RPC requests one token holder may make per second, on "
        "this node (over it: RESOURCE_EXHAUSTED): one caller cannot take every slot.")
    rpc_burst: int = Field(2_000, ge=1, description="RPC requests one holder may burst.")
    config_file: Path | None = None

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, v: str) -> str:
        return validate_replica_id(v)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        return validate_token(v, "namespace")

    @field_validator("rpc_revocation_subject")
    @classmethod
    def _revocation_subject(cls, v: str) -> str:
        return validate_token(v, "subject")

    @field_validator("add_only_subjects")
    @classmethod
    def _add_only_subjects(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [validate_token(s, "subject") for s in v]

    @field_validator("strong")
    @classmethod
    def _strong(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for subject, prefixes in v.items():
            validate_token(subject, "subject")
            for p in prefixes:
                if p:
                    validate_token(p, "worknode id prefix")
        return v

    @field_validator("strong_replicas")
    @classmethod
    def _strong_replicas(cls, v: int) -> int:
        if v not in (1, 3, 5):
            raise ValueError(f"strong_replicas must be 1, 3 or 5, got {v}")
        return v

    @field_validator("healers")
    @classmethod
    def _healers(cls, v: list[str]) -> list[str]:
        return [validate_replica_id(h) for h in v]

    @field_validator("subjects")
    @classmethod
    def _subjects(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("configure at least one subject")
        return [validate_token(s, "subject") for s in v]

    @field_validator("wire_version", "peer_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if not OLDEST_VERSION <= v <= CURRENT_VERSION:
            raise ValueError(f"wire versions are {OLDEST_VERSION}..{CURRENT_VERSION}")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Constructor, then environment, then the TOML config file."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file(init_settings, env_settings)
        if config_file is not None:
            read_toml(config_file)  # a missing file or bad TOML: a ConfigError naming the file
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    def hosted_subjects(self) -> list[str]:
        """The configured subjects, plus the revocation subject when RPC is served."""
        extra = [self.rpc_revocation_subject] if self.rpc_keyring_file is not None else []
        return [*self.subjects, *(s for s in extra if s not in self.subjects)]

    def add_only(self, subject: str) -> bool:
        """Whether ``subject`` is add-only (``add_only_subjects``, by default the
        revocation subject)."""
        subjects = self.add_only_subjects
        return subject == self.rpc_revocation_subject if subjects is None else subject in subjects

    def key_path(self) -> Path:
        """Where this node's signing seed lives."""
        return self.key_file or self.state_dir / f"{self.node_id}.key"


def _config_file(*sources: PydanticBaseSettingsSource) -> Path | None:
    import os

    for source in sources:
        data: Any = source()
        if isinstance(data, dict) and data.get("config_file"):
            return Path(data["config_file"])
    env = os.environ.get("WORKNODE_CONFIG_FILE")
    return Path(env) if env else None


def one_shot_settings(kw: dict[str, Any], subject: str, **extra: Any) -> WorknodeSettings:
    """The settings of a one-shot command's replica of ``subject`` (a CLI write, a kinds
    registration): its node id, namespace, NATS URLs, state directory and roster from the
    command's options ``kw`` (the connection options are taken out of it), no metrics
    endpoint; ``extra``: further settings (e.g. ``strong``)."""
    from services._config import load_settings
    from services._connection import pop_connection

    connection = pop_connection(kw)
    return load_settings(WorknodeSettings, lambda: WorknodeSettings(
        node_id=kw["node_id"], namespace=kw["namespace"], subjects=[subject],
        nats_urls=list(kw["nats_urls"]), state_dir=kw["state_dir"], roster_file=kw.get("roster"),
        metrics_port=None, **extra, **connection,
    ))
