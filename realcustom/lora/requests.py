"""The rules on a request's adapters (torch-free: the API edge checks with exactly these rules).

A request names at most `max_per_row` adapters, each once, each with a finite scale within
±SCALE_LIMIT; unknown names are refused when the caller knows the served names.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from realcustom.settings_check import SettingsError

# Adapter scales beyond this make images fall apart; a larger value is a typo, not a style.
SCALE_LIMIT = 4.0


@dataclass(frozen=True)
class LoRAChoice:
    """One adapter of a request and its scale (0 = off, 1 = as trained)."""

    name: str
    scale: float = 1.0


def check_loras(loras: Sequence[LoRAChoice], max_per_row: int, served: Collection[str] | None = None) -> None:
    if len(loras) > max_per_row:
        raise SettingsError("loras", f"at most {max_per_row} adapters per request, got {len(loras)}")
    seen: set[str] = set()
    for choice in loras:
        if choice.name in seen:
            raise SettingsError("loras", f"adapter {choice.name!r} is named twice; give it one scale")
        seen.add(choice.name)
        if not math.isfinite(choice.scale) or abs(choice.scale) > SCALE_LIMIT:
            raise SettingsError(
                "loras", f"adapter {choice.name!r} scale must be within ±{SCALE_LIMIT}, got {choice.scale}"
            )
        if served is not None and choice.name not in served:
            known = ", ".join(sorted(served)) or "none"
            raise SettingsError("loras", f"unknown adapter {choice.name!r} (served: {known})")
