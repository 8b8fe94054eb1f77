"""The worknode service: replicas of configured subjects on one node, with metrics."""

from services.worknode._metrics import ServiceMetrics
from services.worknode._service import (
    MetricsEndpoint,
    WorknodeService,
    load_identity,
    load_or_create_signer,
    read_cluster_secret,
    read_roster,
    read_roster_entries,
)
from services.worknode._settings import WorknodeSettings

__all__ = [
    "MetricsEndpoint",
    "ServiceMetrics",
    "WorknodeService",
    "WorknodeSettings",
    "load_identity",
    "load_or_create_signer",
    "read_cluster_secret",
    "read_roster",
    "read_roster_entries",
]
