"""Backbone identities: how they are hashed, and when two of them give the same features.

A store's ``identity`` (``attrs["lens_cache"]["identity"]``, written by the extractor that
built it) says what made its features: the MLLM (``backbone``, ``config_hash``,
``weights_fingerprint``, and for the toy LLaVA ``weights_sha256``; the fake test
backbone's ``mllm``), its ``compute_dtype``, ``hidden_size``, ``num_image_tokens``, the
``prompt_template`` and ``question_template``, the storage ``dtype``, the
``image_geometry``, ``sam`` (``variant``, ``weights``, ``compute_dtype``), and two
records that do not change a single feature value:

* ``layers``: which layers the store *kept*. A layer's features do not depend on which
  other layers were cached beside it; whether the layer an entry point reads is there is
  checked on its own (``lens_cache.store.require_layer``).
* ``warm_start``: what the store holds beside the features for the head's initialisation
  (a pair of decoder layers per cached layer; format 2: the first cached layer's).

``name_or_path`` (where the MLLM was loaded from) does not change the features either
when the weights are fingerprinted: the same weights at two paths are one backbone. An
identity without a fingerprint keeps it, since it is then the only name of the weights.

:func:`feature_differences` is the one rule: training refuses to mix stores, ``lens-eval``
refuses a store, and ``lens-segment`` refuses a live backbone exactly when it is not empty.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

#: Identity records that do not change any feature value (see the module docstring).
FIELDS_NOT_COMPARED = ("layers", "warm_start")
#: Identity fields that name the MLLM's weights by their content.
WEIGHTS_FINGERPRINT_FIELDS = ("weights_fingerprint", "weights_sha256")
#: Where the MLLM's weights were loaded from: not compared when a fingerprint names them.
WEIGHTS_LOCATION_FIELD = "name_or_path"
#: How many differences a message lists before ``and N more``.
DIFFERENCES_SHOWN = 4


def canonical_json(value: Any) -> str:
    """The JSON text hashed for identities: sorted keys, no whitespace, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def identity_hash(identity: dict) -> str:
    """sha256 (hex) of the canonical JSON of a backbone identity."""
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


def normalise_json(value: Any) -> Any:
    """``value`` as it comes back from JSON attributes (tuples become lists, ...)."""
    return json.loads(canonical_json(value))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": leaf}``, to name exactly which setting differs."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key in sorted(value):
            flat.update(flatten(value[key], f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def describe_differences(ours: dict, theirs: dict) -> list[tuple[str, Any, Any]]:
    """``(key, ours, theirs)`` for every flattened key whose values differ (``<unset>`` where one lacks it)."""
    flat_ours, flat_theirs = flatten(normalise_json(ours)), flatten(normalise_json(theirs))
    missing = object()
    keys = sorted(set(flat_ours) | set(flat_theirs))
    return [
        (key, flat_ours.get(key, "<unset>"), flat_theirs.get(key, "<unset>"))
        for key in keys
        if flat_ours.get(key, missing) != flat_theirs.get(key, missing)
    ]


def feature_identity(identity: dict) -> dict:
    """The part of ``identity`` that fixes the feature values (JSON-normalised).

    Drops :data:`FIELDS_NOT_COMPARED`, and ``name_or_path`` when a weights fingerprint is there.
    """
    fingerprinted = any(identity.get(field) for field in WEIGHTS_FINGERPRINT_FIELDS)
    dropped = FIELDS_NOT_COMPARED + ((WEIGHTS_LOCATION_FIELD,) if fingerprinted else ())
    return {key: value for key, value in normalise_json(identity).items() if key not in dropped}


def feature_differences(ours: dict, theirs: dict) -> list[tuple[str, Any, Any]]:
    """Why features cached with identity ``ours`` and ``theirs`` cannot be used together; [] when they can.

    Returns:
        ``(flattened key, ours, theirs)`` per differing setting, sorted by key (e.g.
        ``("sam.weights", "sha256:ab..", "sha256:cd..")``).
    """
    return describe_differences(feature_identity(ours), feature_identity(theirs))


def format_differences(
    differences: Sequence[tuple[str, Any, Any]], labels: tuple[str, str] | None = None, *, shown: int = DIFFERENCES_SHOWN
) -> str:
    """``key: a (ours) vs b (theirs); ...`` for a one-line message, at most ``shown`` of them.

    Args:
        differences: :func:`feature_differences` output.
        labels: names of the two sides (``("run", "store")``); None writes ``a vs b``.
    """
    left, right = (f" ({labels[0]})", f" ({labels[1]})") if labels else ("", "")
    text = "; ".join(f"{key}: {ours!r}{left} vs {theirs!r}{right}" for key, ours, theirs in differences[:shown])
    if len(differences) > shown:
        text += f"; and {len(differences) - shown} more"
    return text
