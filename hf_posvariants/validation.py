"""The refusals every component's config check shares: a plain ValueError naming the field, the value and what
is allowed. Encodings, attention variants and the configs use them to validate the fields they own.
This file imports only the standard library: it travels with remote-code checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable


def choice_error(field: str, value, allowed: Iterable) -> ValueError:
    return ValueError(f"{field}={value!r} is not supported; allowed values are {sorted(allowed)}.")


def require_number(field: str, value, allowed: str, within: Callable[[float], bool]) -> None:
    """A finite real number for which `within` holds, else a ValueError naming the field, value and range."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (is_number and math.isfinite(value) and within(value)):
        raise ValueError(f"{field}={value!r} is not allowed; allowed values are finite numbers {allowed}.")


def require_positive(config, fields: Iterable[str], owner: str) -> None:
    """Each of `fields` of `config` positive, as `owner` (say "position_encoding='fire'") needs."""
    for field in fields:
        if not getattr(config, field) > 0:
            raise ValueError(f"{field}={getattr(config, field)!r} must be positive for {owner}.")
