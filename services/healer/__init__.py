"""The healer service: compares Merkle roots per subject and repairs what differs."""

from services.healer._metrics import HealerMetrics
from services.healer._service import HealerService, HealOutcome
from services.healer._settings import HealerSettings

__all__ = ["HealOutcome", "HealerMetrics", "HealerService", "HealerSettings"]
