"""The rules on adapters that need no model (torch-free: the API edge checks with exactly these rules).

A request names at most `max_per_row` adapters, each once, each with a finite scale within
±SCALE_LIMIT; unknown names are refused when the caller knows the served names. Each broken rule
is a `SettingsError` on the field `loras` whose `code` says which (`too_many_loras`,
`invalid_lora`, `unknown_lora`).

Where a served adapter may come from (`check_source`): a name in the LoRA directory, or a hub id
the operator allowed. Never a URL and never a path: adapters are code-like artefacts, and a name
that could climb out of the directory is refused before any file is touched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from realcustom.settings_check import SettingsError

# Adapter scales beyond this make images fall apart; a larger value is a typo, not a style.
SCALE_LIMIT = 4.0
# Adapter names (also file stems in the LoRA directory): no separators, nothing to climb with.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# A hub id: `owner/repo` or `owner/repo/path/in/repo.safetensors`.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(/[^/].*\.safetensors)?$")


@dataclass(frozen=True)
class LoRAChoice:
    """One adapter of a request and its scale (0 = off, 1 = as trained)."""

    name: str
    scale: float = 1.0


def is_name(text: str) -> bool:
    return bool(NAME.match(text)) and ".." not in text


def check_loras(loras: Sequence[LoRAChoice], max_per_row: int, served: Collection[str] | None = None) -> None:
    if len(loras) > max_per_row:
        raise SettingsError(
            "loras", f"at most {max_per_row} adapters per request, got {len(loras)}", code="too_many_loras"
        )
    seen: set[str] = set()
    for choice in loras:
        if choice.name in seen:
            raise SettingsError(
                "loras", f"adapter {choice.name!r} is named twice; give it one scale", code="invalid_lora"
            )
        seen.add(choice.name)
        if not math.isfinite(choice.scale) or abs(choice.scale) > SCALE_LIMIT:
            raise SettingsError(
                "loras",
                f"adapter {choice.name!r} scale must be within ±{SCALE_LIMIT}, got {choice.scale}",
                code="invalid_lora",
            )
        if served is not None and choice.name not in served:
            known = ", ".join(sorted(served)) or "none"
            raise SettingsError(
                "loras",
                f"unknown adapter {choice.name!r} (served: {known}; GET /v1/loras)",
                code="unknown_lora",
            )


class SourceNotAllowed(ValueError):
    """A source a served adapter may not come from; the message says what is allowed."""


def check_source(source: str, hub_ids: Collection[str]) -> str:
    """`source` as given when it is a name (a file or folder in the LoRA directory) or one of the
    allowed hub ids; `SourceNotAllowed` otherwise (URLs, paths, hub ids nobody allowed)."""
    if is_name(source):
        return source
    if "://" in source:
        raise SourceNotAllowed(f"{source!r}: adapters are never downloaded from URLs")
    if source in hub_ids and HUB_ID.match(source):
        return source
    allowed = ", ".join(sorted(hub_ids)) or "none configured"
    raise SourceNotAllowed(
        f"{source!r} is neither an adapter name in the LoRA directory (1-100 letters, digits, '.', '_', "
        f"'-') nor an allowed hub id (LORA_HUB_IDS: {allowed})"
    )
