"""API keys, each belonging to a project: from a YAML file or an environment variable (`serve.api_keys`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml

from tuneloop.errors import TuneloopError


def load_api_keys(spec: str, environ: Mapping[str, str]) -> dict[str, str]:
    """key -> project from `spec`: a YAML file mapping each key to its project, or `env:NAME`, the
    variable NAME of `environ` holding `key=project` pairs separated by commas."""
    if spec.startswith("env:"):
        name = spec.removeprefix("env:")
        if not environ.get(name):
            raise TuneloopError(f"serve.api_keys: the environment variable {name} is not set")
        pairs = [pair.strip() for pair in environ[name].split(",") if pair.strip()]
        keys = {}
        for number, pair in enumerate(pairs, 1):
            key, equals, project = pair.partition("=")
            if not equals or not key.strip() or not project.strip():
                raise TuneloopError(f"serve.api_keys: {name}, pair {number}: expected key=project")
            keys[key.strip()] = project.strip()
        return keys
    path = Path(spec).expanduser()
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise TuneloopError(f"serve.api_keys: cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise TuneloopError(f"serve.api_keys: {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(loaded, dict) or not loaded or not all(
        isinstance(k, str) and isinstance(v, str) and k and v for k, v in loaded.items()
    ):
        raise TuneloopError(f"serve.api_keys: {path} must map each key to its project, e.g. `sk-abc: support-team`")
    return dict(loaded)
