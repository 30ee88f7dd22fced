"""A model's native output size without building it (torch-free: the API uses it for defaults).

Mirrors how `realcustom.loading.load_pipeline` picks the architecture: a spec name (`tiny`,
`sdxl-random`, ...), a training checkpoint (`base_model` in its `realcustom.json`), or a checkpoint
directory (`spec` / `default_size` in its optional `realcustom.json`, else the released SDXL).
tests/test_loading.py checks the two agree.
"""

from __future__ import annotations

import json
from pathlib import Path

# ModelSpec.default_size of every spec in realcustom.models.SPECS.
SPEC_SIZES = {"sdxl": 1024, "sd15": 512, "tiny": 128, "tiny-sd15": 128}


def native_size(model: str) -> int:
    """The side (pixels) a model generates when the caller gives no width/height."""
    name = model.removesuffix("-random")
    if name in SPEC_SIZES:
        return SPEC_SIZES[name]
    config = Path(model) / "realcustom.json"
    description = json.loads(config.read_text()) if config.is_file() else {}
    if "base_model" in description:
        return native_size(description["base_model"])
    # A directory this process cannot see (the API runs without the weights) is the released SDXL
    # unless its realcustom.json says otherwise.
    return int(description.get("default_size", SPEC_SIZES[description.get("spec", "sdxl")]))
