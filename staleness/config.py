"""The staleness bound: the [staleness] table of a recipe, and what admission control reads."""

from __future__ import annotations

import msgspec


class StalenessConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """[staleness] AReaL-style bound: nothing staler than eta versions is trained on, and admission
    keeps accepted + in-flight samples <= (t + eta + 1) x the batch, so nothing is generated only to
    be thrown away."""

    eta: int = 1
    """Most versions a trained token may lag the trainer (0 = strictly on-policy)."""
    max_in_flight: int | None = None
    """Cap on samples being generated at once, whatever the staleness budget allows; None = no cap."""

    def __post_init__(self) -> None:
        if self.eta < 0:
            raise ValueError(f"eta={self.eta!r} must be >= 0")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(f"max_in_flight={self.max_in_flight!r} must be >= 1")
