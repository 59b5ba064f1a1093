"""Configs for the staleness bound and the off-policy loss.

Both are msgspec Structs so a recipe's TOML table decodes straight into them
(`msgspec.convert(table, LossConfig)`); `__post_init__` checks ranges on both
that path and direct construction, so a bad value fails at startup with the
field's name instead of as a NaN many steps later.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class StalenessConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """AReaL-style bound: accepted + in-flight samples <= (t + eta + 1) * batch_size.

    `batch_size` counts SAMPLES (trajectories) consumed per trainer step, i.e.
    groups_per_step * group_size; `AdmissionController.admit(n)` takes samples too.
    """

    eta: int = 0
    batch_size: int = 1
    # Optional cap on concurrently running rollouts, whatever the staleness budget allows.
    max_in_flight: int | None = None

    def __post_init__(self) -> None:
        check_field(self.eta >= 0, "eta", self.eta, ">= 0")
        check_field(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check_field(self.max_in_flight is None or self.max_in_flight >= 1, "max_in_flight", self.max_in_flight, ">= 1")

    @classmethod
    def from_groups(cls, *, eta: int, groups_per_step: int, group_size: int, **kwargs) -> StalenessConfig:
        return cls(eta=eta, batch_size=groups_per_step * group_size, **kwargs)


Correction = Literal["decoupled_ppo", "tis", "none"]
Aggregation = Literal["token_mean", "seq_mean_token_mean"]


class LossConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Policy objective and off-policy correction (see staleness.corrections)."""

    correction: Correction = "decoupled_ppo"
    clip_eps: float = 0.2
    # Upper clip bound 1 + clip_eps_high (DAPO "clip-higher"); None = symmetric.
    clip_eps_high: float | None = None
    # Dual-clip constant c > 1 bounding the loss of negative-advantage tokens; None = off.
    dual_clip_c: float | None = None
    # Cap C on the behavior importance weight pi_prox / pi_behav.
    is_cap: float = 5.0
    # "truncate": w = min(w, C) (TIS); "mask": tokens with w > C get weight 0 (AReaL).
    is_mode: Literal["truncate", "mask"] = "truncate"
    aggregation: Aggregation = "token_mean"
    # GRPO advantages: (r - mean_group) / (std_group + eps); False = Dr.GRPO (no std division).
    adv_std_norm: bool = True
    adv_eps: float = 1e-6
    # KL(current || reference) penalty with the k3 estimator; 0 = no reference model is kept.
    kl_coef: float = 0.0

    def __post_init__(self) -> None:
        check_field(self.clip_eps > 0, "clip_eps", self.clip_eps, "> 0")
        check_field(self.clip_eps_high is None or self.clip_eps_high > 0, "clip_eps_high", self.clip_eps_high, "> 0")
        check_field(self.dual_clip_c is None or self.dual_clip_c > 1, "dual_clip_c", self.dual_clip_c, "> 1")
        check_field(self.is_cap >= 1, "is_cap", self.is_cap, ">= 1")
        check_field(self.adv_eps >= 0, "adv_eps", self.adv_eps, ">= 0")
        check_field(self.kl_coef >= 0, "kl_coef", self.kl_coef, ">= 0")


def check_field(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} must be {rule}")
