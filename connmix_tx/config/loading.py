"""Loading a configuration: read the YAML file, walk the schema, run the role checks.

``load_config`` reads a file (default ``<home>/etc/connmix.yaml``), ``parse_config`` takes data
already parsed and ``default_config`` gives the built-in defaults.  The first problem found stops
the load with a ``ConfigError`` carrying its key path.
"""

from __future__ import annotations

import dataclasses
import os

import yaml

from connmix_tx import home
from connmix_tx.config.model import ROLES, Config, ConfigError
from connmix_tx.config.roles import check_role
from connmix_tx.config.schema import walk

__all__ = ["default_config", "load_config", "parse_config"]


def parse_config(data: object, role: str = "dev", cwd: str | None = None,
                 source: str | None = None, workers: int | None = None) -> Config:
    """Validate parsed YAML ``data`` for ``role`` and return the ``Config``.

    The whole file is validated whatever the role; duplicate ports, entry scripts and TLS files
    are checked only for the listeners ``role`` opens.  Relative paths resolve against ``cwd``
    (default: the working directory), then the home directory.  ``workers`` (``-p``) overrides
    ``engine.workers`` for the mesh port range check only; the returned config keeps the file's
    value.  Raises ``ConfigError``.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}, expected one of {', '.join(ROLES)}")
    config = walk(data, cwd)
    check_role(config, role, workers)
    return dataclasses.replace(config, source=source)


def load_config(path: str | None = None, role: str = "dev", cwd: str | None = None,
                workers: int | None = None) -> Config:
    """Read and validate the YAML file ``path`` (default ``<home>/etc/connmix.yaml``).

    A relative ``path`` is taken from ``cwd``.  An empty file means all defaults.  Raises
    ``ConfigError`` with an empty key path when the file cannot be read or is not valid YAML.
    """
    filename = os.path.abspath(os.path.join(cwd or os.getcwd(), path or home.default_config_path()))
    try:
        with open(filename, "rb") as stream:
            text = stream.read()
    except OSError as exc:
        raise ConfigError("", f"cannot read {filename}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"invalid YAML in {filename}: {_yaml_problem(exc)}") from None
    return parse_config(data, role=role, cwd=cwd, source=filename, workers=workers)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line describing a YAML error: ``line N: <problem>``."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    if mark is None or not problem:
        return " ".join(str(exc).split())
    return f"line {mark.line + 1}: {' '.join(problem.split())}"


def default_config(cwd: str | None = None) -> Config:
    """The built-in defaults (what an empty file gives), without any file checks."""
    return walk({}, cwd)
