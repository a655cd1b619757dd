"""Optional signing of control-topic messages (calibrations, model messages) with a shared key.

When the agent has `control_key` (AMA_CONTROL_KEY in the environment), every control message must
carry a `signature` header: the hex HMAC-SHA256 of its value under that key. `ama-stream calibrate
--publish` signs with the same variable. Anyone who can write the topic but lacks the key can then
change nothing: unsigned or wrongly signed messages are refused (and counted).
"""
from __future__ import annotations

import hashlib
import hmac
import os

SIGNATURE_HEADER = "signature"
KEY_ENV = "AMA_CONTROL_KEY"


def signature(key: bytes, value: bytes) -> bytes:
    return hmac.new(key, value, hashlib.sha256).hexdigest().encode()


def signed_by(key: bytes, value: bytes | None, headers) -> bool:
    """The message's first `signature` header matches the value under `key` (constant-time compare)."""
    given = next((v for k, v in headers or () if str(k).lower() == SIGNATURE_HEADER), None)
    return given is not None and hmac.compare_digest(given, signature(key, value or b""))


def key_from_env() -> bytes | None:
    key = os.environ.get(KEY_ENV)
    return key.encode() if key else None
