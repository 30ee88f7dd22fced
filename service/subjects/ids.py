"""Subject ids and token-cache keys: digests of the normalised image and the model version.

The feature key names what the reference encoders and projector make of one image under one
model version: equal keys, equal tokens, whoever uploaded the photo. A subject id is the feature
key seen by one owner, so two callers never share an id (a foreign id is simply unknown).
"""

from __future__ import annotations

import hashlib

# Hex digits of a subject id (128 bits).
ID_LENGTH = 32


def feature_key(rgb: bytes, width: int, height: int, version: str) -> str:
    """Key of the projected tokens of an 8-bit RGB image (as decoded at the edge) under `version`."""
    digest = hashlib.sha256(f"reference\0{version}\0{width}x{height}\0".encode())
    digest.update(rgb)
    return digest.hexdigest()


def subject_id(owner: str, key: str) -> str:
    """The id `owner` knows the image of feature key `key` by."""
    return hashlib.sha256(f"subject\0{owner}\0{key}".encode()).hexdigest()[:ID_LENGTH]
