"""Staleness: version accounting, admission control, off-policy corrections.

The torch-free parts are exported here; `staleness.corrections` needs torch.
"""

from staleness.admission import AdmissionController
from staleness.config import LossConfig, StalenessConfig
from staleness.metrics import StalenessBoundError, check_staleness_bound, staleness_histogram, staleness_summary

__all__ = [
    "AdmissionController",
    "LossConfig",
    "StalenessBoundError",
    "StalenessConfig",
    "check_staleness_bound",
    "staleness_histogram",
    "staleness_summary",
]
