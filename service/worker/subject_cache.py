"""A worker's projected reference tokens: an LRU on its device, then the store every worker shares.

The worker keys every reference of a job by its feature key (service/subjects/ids.py: the image
and the worker's own `MODEL_VERSION`, so a worker never takes tokens of another model version,
even mid-upgrade) and looks its tokens up before preparing the job: in its own LRU (`SUBJECT_CACHE_SIZE`
entries, on the device), then in the shared store (Redis, or the all-in-one process), else the
runner encodes the photo and hands the tokens back (`SubjectInput.on_encoded`): they enter the LRU,
and for a stored subject (`POST /subjects`) they are written to the shared store for the others,
off the preparation thread. An inline photo whose tokens are cached skips the encoders too.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from service import metrics
from service.queue.protocol import QueueUnavailableError, SubjectSpec
from service.settings import Settings
from service.subjects.ids import feature_key
from service.subjects.store import StoredTokens, SubjectStore, process_store

logger = logging.getLogger(__name__)


def to_stored(tokens: torch.Tensor, encode_s: float) -> StoredTokens:
    flat = tokens.detach().contiguous().cpu().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes()
    return StoredTokens(data, tuple(tokens.shape), str(tokens.dtype).removeprefix("torch."), encode_s)


def from_stored(stored: StoredTokens) -> torch.Tensor:
    dtype = getattr(torch, stored.dtype)
    return torch.frombuffer(bytearray(stored.data), dtype=dtype).reshape(stored.shape)


class TokenCache:
    """One per worker process (one runner), made by its entry point and handed to the worker."""

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenCache:
        return cls(settings.subject_cache_size, process_store(settings), settings.reference_version)

    def __init__(self, capacity: int, store: SubjectStore | None, version: str) -> None:
        self._capacity = capacity
        self._version = version
        self._store = store
        self._entries: OrderedDict[str, tuple[torch.Tensor, float]] = OrderedDict()
        self._lock = threading.Lock()  # the preparation and stepping threads both prepare jobs
        self._device: torch.device | None = None  # the runner's, learnt from its first encoding
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="subject-tokens")

    def inputs(self, subject: SubjectSpec) -> dict[str, Any]:
        """`SubjectInput` fields for one reference: its cached `tokens`, or an `on_encoded` hook."""
        key = feature_key(subject.image, subject.width, subject.height, self._version)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        if entry is not None:
            return self._hit("device", entry)
        stored = self._shared(key)
        if stored is not None:
            tokens = from_stored(stored)
            if self._device is not None:
                tokens = tokens.to(self._device)
            self._remember(key, tokens, stored.encode_s)
            return self._hit("shared", (tokens, stored.encode_s))
        metrics.SUBJECT_TOKENS.labels(outcome="miss").inc()

        def on_encoded(tokens: torch.Tensor, encode_s: float) -> None:
            self._device = tokens.device
            self._remember(key, tokens, encode_s)
            if subject.shared and self._store is not None:
                self._writer.submit(self._share, key, tokens, encode_s)

        return {"on_encoded": on_encoded}

    @staticmethod
    def _hit(where: str, entry: tuple[torch.Tensor, float]) -> dict[str, Any]:
        tokens, encode_s = entry
        metrics.SUBJECT_TOKENS.labels(outcome=f"{where}_hit").inc()
        metrics.ENCODER_SECONDS_SAVED.inc(encode_s)
        return {"tokens": tokens}

    def _shared(self, key: str) -> StoredTokens | None:
        if self._store is None:
            return None
        try:
            return self._store.get_tokens(key)
        except QueueUnavailableError as error:  # the encoders still work without the store
            logger.warning("shared subject tokens unavailable (%s); encoding", error)
            return None

    def _remember(self, key: str, tokens: torch.Tensor, encode_s: float) -> None:
        if self._capacity == 0:
            return
        with self._lock:
            self._entries[key] = (tokens, encode_s)
            self._entries.move_to_end(key)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)

    def _share(self, key: str, tokens: torch.Tensor, encode_s: float) -> None:
        try:
            if not self._store.put_tokens(key, to_stored(tokens, encode_s)):
                logger.info("subject tokens %s not shared: the queue's byte budget is full", key[:12])
        except Exception as error:  # sharing is an optimisation: never fail a job for it
            logger.warning("could not share subject tokens %s: %s", key[:12], error)
