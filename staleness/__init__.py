"""Staleness: version accounting and admission control (torch-free, and imports nothing of the
rest of the project); the experiment tooling is in staleness.experiments."""

from staleness.admission import AdmissionController
from staleness.config import StalenessConfig
from staleness.metrics import StalenessBoundError, check_staleness_bound, staleness_histogram, staleness_summary

__all__ = [
    "AdmissionController",
    "StalenessBoundError",
    "StalenessConfig",
    "check_staleness_bound",
    "staleness_histogram",
    "staleness_summary",
]
