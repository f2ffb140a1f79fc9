"""Moving a model's `production` alias (the version its bare name serves): promotion, rollback, and the
history of both, kept in the registry itself as registered-model tags, so that everyone using one tracking
server sees the same history."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from datetime import datetime, timezone
from typing import Literal

from tuneloop.artifacts import ModelVersion, Promotion
from tuneloop.config import RegistryConfig
from tuneloop.errors import TuneloopError
from tuneloop.registry.store import PRODUCTION, _client, _exists, _numbered_version, production_version

# One history entry per registered-model tag (a tag value is limited, a history is not): this prefix and a
# key that sorts in the order the entries were written (an older registry's keys are numbers: they sort first).
HISTORY = "tuneloop.history."


def promotion_refusal(version: ModelVersion, current: ModelVersion | None, force: bool) -> str | None:
    """Why `version` may not take the `production` alias from `current` (None: no version has it), or None.
    Only a version that passed an enforced gate is promoted without `force`."""
    if current is not None and current.version == version.version:
        return f"{version.name} version {version.version} is already in production"
    if version.gate_verdict == "passed" or force:
        return None
    why = {
        "failed": f"it failed the gate ({version.gate_failures or 'no failing metric recorded'})",
        "not_enforced": "it was registered with eval.enforce_gate: false, so no gate vouches for it",
    }.get(version.gate_verdict, "it was registered before tuneloop kept gate verdicts")
    return f"{version.name} version {version.version} is not promoted: {why}; --force promotes it anyway"


def promote(cfg: RegistryConfig, name: str, version: int, by: str, force: bool = False) -> Promotion:
    """Give version `version` of model `name` the `production` alias and record the move in its history.
    A version without a passed gate needs `force`, and is then recorded as forced."""
    target = _numbered_version(cfg, name, version, None)
    current = production_version(cfg, name)
    refusal = promotion_refusal(target, current, force)
    if refusal is not None:
        raise TuneloopError(f"registry: {refusal}")
    return _move(cfg, "promote", by, current, target, forced=target.gate_verdict != "passed")


def rollback_target(cfg: RegistryConfig, name: str) -> ModelVersion:
    """The version a rollback gives the `production` alias back to: the one that the latest promotion still
    in effect took it from (each rollback undoes one promotion, so a second goes one further back)."""
    in_effect: list[Promotion] = []
    for entry in history(cfg, name):
        if entry.action == "promote":
            in_effect.append(entry)
        elif in_effect:
            in_effect.pop()
    if not in_effect:
        raise TuneloopError(f"registry: nothing to roll back to: no promotion of {name} is in effect")
    if in_effect[-1].from_version is None:
        raise TuneloopError(
            f"registry: nothing to roll back to: version {in_effect[-1].to_version} was the first version of "
            f"{name} in production"
        )
    return _numbered_version(cfg, name, in_effect[-1].from_version, None)


def rollback(cfg: RegistryConfig, name: str, by: str) -> Promotion:
    """Give the `production` alias back to the version the latest promotion still in effect took it from,
    and record the move in the history."""
    target = rollback_target(cfg, name)
    return _move(cfg, "rollback", by, production_version(cfg, name), target, forced=False)


def history(cfg: RegistryConfig, name: str) -> list[Promotion]:
    """Every promotion and rollback of model `name`, oldest first; none for a model not registered."""
    from mlflow.exceptions import MlflowException

    if not _exists(cfg):
        return []
    try:
        tags = _client(cfg).get_registered_model(name).tags
    except MlflowException:
        return []
    return [Promotion(**json.loads(tags[key])) for key in sorted(key for key in tags if key.startswith(HISTORY))]


def _move(
    cfg: RegistryConfig,
    action: Literal["promote", "rollback"],
    by: str,
    current: ModelVersion | None,
    target: ModelVersion,
    forced: bool,
) -> Promotion:
    client = _client(cfg)
    entry = Promotion(
        action=action,
        who=by,
        when=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        from_version=None if current is None else current.version,
        to_version=target.version,
        verdict=target.gate_verdict,
        forced=forced,
    )
    # The alias first: a history entry must never claim a move that did not happen.
    client.set_registered_model_alias(target.name, PRODUCTION, str(target.version))
    # Nanoseconds since the epoch, then a random part: sorts in time order, and two moves at once (two
    # machines, one registry) never write the same key, with no lock to hold.
    key = f"{HISTORY}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    client.set_registered_model_tag(target.name, key, json.dumps(dataclasses.asdict(entry), sort_keys=True))
    return entry
