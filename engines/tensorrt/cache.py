"""The engine cache: one directory per engine, keyed by everything that changes the engine.

key = sha256(ONNX graph bytes (+ its external data) + build settings + GPU name + TensorRT
version). A new export, other precision flags or profiles, another card or another TensorRT
release therefore never load a stale engine; the same inputs always hit the same entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

_CHUNK = 1 << 20


@dataclass(frozen=True)
class BuildSettings:
    """What the builder is told besides the graph. Shapes: {input: (dims...)}, min = opt = max."""

    precision: str = "fp16"  # fp16 | bf16 | fp32
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    workspace_bytes: int = 8 << 30
    builder_optimization_level: int = 3
    extra: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.precision not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"precision must be fp16, bf16 or fp32, got {self.precision!r}")

    def canonical(self) -> str:
        data = asdict(self)
        data["shapes"] = sorted([name, list(dims)] for name, dims in self.shapes)
        data["extra"] = sorted([k, v] for k, v in self.extra)
        return json.dumps(data, sort_keys=True)


def onnx_files(onnx_path: Path) -> list[Path]:
    """The graph file and its external-data files (those named <stem>*.data next to it)."""
    onnx_path = Path(onnx_path)
    extra = sorted(p for p in onnx_path.parent.glob(f"{onnx_path.stem}*.data") if p.is_file())
    return [onnx_path, *extra]


def onnx_digest(onnx_path: Path) -> str:
    """sha256 over the graph and its external data, file names included (order fixed).

    An SDXL graph with its weights is ~10 GB per role, and a worker looks its engines up at every
    start: the digest is kept in a `<graph>.sha256.json` sidecar and reused while every file keeps
    the name, size and modification time it was hashed with (a rewritten export changes them)."""
    files = onnx_files(onnx_path)
    stamp = [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in files]
    sidecar = Path(onnx_path).with_name(f"{Path(onnx_path).name}.sha256.json")
    try:
        cached = json.loads(sidecar.read_text())
        if cached["files"] == stamp:
            return cached["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no sidecar, or an unreadable one: hash the files
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    with contextlib.suppress(OSError):  # a read-only export volume: hash again next time
        atomic_write(sidecar, json.dumps({"files": stamp, "sha256": digest.hexdigest()}).encode())
    return digest.hexdigest()


def engine_key(onnx_sha256: str, settings: BuildSettings, gpu_name: str, tensorrt_version: str) -> str:
    """The cache key of one engine (24 hex digits)."""
    material = json.dumps(
        {
            "onnx": onnx_sha256,
            "settings": settings.canonical(),
            "gpu": gpu_name,
            "tensorrt": tensorrt_version,
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:24]


def atomic_write(path: Path, data: bytes) -> None:
    """Write `path` through a uniquely named temporary file in its folder, then rename: a reader
    never sees half a file, and concurrent writers (workers starting together on a shared volume)
    never write into one another's temporary file."""
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as handle:
        temporary = Path(handle.name)
        try:
            handle.write(data)
        except BaseException:
            handle.close()
            temporary.unlink(missing_ok=True)
            raise
    temporary.replace(path)


class EngineCache:
    """<root>/<key>/engine.plan + meta.json; a shared timing cache at <root>/timing.cache."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / key

    def plan_path(self, key: str) -> Path:
        return self.entry(key) / "engine.plan"

    def lookup(self, key: str) -> Path | None:
        plan = self.plan_path(key)
        return plan if plan.is_file() and (self.entry(key) / "meta.json").is_file() else None

    def store(self, key: str, plan: bytes, meta: dict) -> Path:
        """Write an engine and its metadata; safe when several processes build the same key at once
        (each writes its own temporary file; the last rename wins with a complete engine)."""
        entry = self.entry(key)
        entry.mkdir(parents=True, exist_ok=True)
        atomic_write(self.plan_path(key), plan)
        atomic_write(entry / "meta.json", json.dumps(meta, indent=2, sort_keys=True).encode())
        return self.plan_path(key)

    @property
    def timing_cache_path(self) -> Path:
        return self.root / "timing.cache"
