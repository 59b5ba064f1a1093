"""The one range check every config Struct's __post_init__ uses: it runs on decoding a recipe
and on direct construction alike, so a bad value fails at start-up with the field's name."""

from __future__ import annotations


def check_field(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} must be {rule}")


def check_device(name: str, device: str | None) -> None:
    """None means "the default" wherever a device is optional."""
    import re

    check_field(
        device is None or bool(re.match(r"^(auto|cpu|cuda(:\d+)?)$", device)), name, device, "auto, cpu, cuda or cuda:N"
    )
