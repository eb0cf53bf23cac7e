"""Recognising calibration samples later: a normalised key per sample, and its digest, saved with the adapter.

A CorDA adapter is only as knowledge-preserving as its calibration data is disjoint from the questions it is then
judged on. `calibrate` records the digest of every sample it used (`corda_calibration["sample_digests"]` in the saved
config), so that an evaluation can count the questions it shares with the calibration without the data itself.

The key of a sample is the text a question is recognised by, the same whatever format carries it:
  * a chat conversation (a list of messages, or a record's `messages` / conversational `prompt`): its first user turn;
  * a record: the first of its `prompt`, `question`, `instruction`, `input`, `text` fields;
  * a plain string: itself;
folded to lower case, punctuation turned into spaces, whitespace collapsed. Token-id batches have no key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional


KEY_FIELDS = ("messages", "prompt", "question", "instruction", "input", "text")
DIGEST_CHARS = 16  # 64 bits of sha256: no collision in any calibration sample of realistic size


def normalize_text(text: str) -> str:
    """Lower case, punctuation as spaces, single spaces, no outer spaces."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def _is_conversation(value: Any) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
            and isinstance(value[0], Mapping) and "content" in value[0])


def _first_user_turn(messages: Sequence[Mapping]) -> str:
    user = [m for m in messages if m.get("role") == "user"]
    return str((user or list(messages))[0]["content"])


def _key_text(sample: Any) -> Optional[str]:
    if isinstance(sample, str):
        return sample
    if _is_conversation(sample):
        return _first_user_turn(sample)
    if isinstance(sample, Mapping):
        for field in KEY_FIELDS:
            value = sample.get(field)
            if isinstance(value, str):
                return value
            if _is_conversation(value):
                return _first_user_turn(value)
    return None


def sample_key(sample: Any) -> Optional[str]:
    """The normalised text by which `sample` (a string, a conversation or a record) is recognised; None if it has
    none (e.g. token ids)."""
    text = _key_text(sample)
    return None if text is None else normalize_text(text)


def sample_digest(sample: Any) -> Optional[str]:
    """The first 16 hex digits of the sha256 of `sample_key(sample)`; None where the sample has no key."""
    key = sample_key(sample)
    return None if key is None else hashlib.sha256(key.encode("utf-8")).hexdigest()[:DIGEST_CHARS]


def calibration_overlap(samples, digests) -> int:
    """How many of `samples` (strings, conversations or records) have their digest in `digests`, a calibration's
    recorded `corda_calibration["sample_digests"]`: the samples its calibration saw."""
    known = set(digests or ())
    return sum(sample_digest(s) in known for s in samples)
