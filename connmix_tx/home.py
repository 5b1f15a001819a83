"""Where the packaged ``etc/`` and ``lua/`` folders live (the *home directory*,
docs/configuration.md, "The file").

An editable install runs from the repository, whose root holds ``etc/`` and ``lua/``; a regular
install carries copies of both in ``connmix_tx/_home`` (see ``setup.py``).
"""

from __future__ import annotations

import os

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def home_dir() -> str:
    """Return the absolute home directory: the folder that holds ``etc/`` and ``lua/``."""
    installed = os.path.join(_PACKAGE_DIR, "_home")
    if os.path.isfile(os.path.join(installed, "etc", "connmix.yaml")):
        return installed
    return os.path.dirname(_PACKAGE_DIR)


def default_config_path() -> str:
    """Return the path of the packaged default configuration, ``<home>/etc/connmix.yaml``."""
    return os.path.join(home_dir(), "etc", "connmix.yaml")


def resolve_path(path: str, cwd: str | None = None) -> str:
    """Resolve a relative config path: the working directory first, then the home directory.

    An absolute path is returned unchanged.  When the file exists in neither place, the path
    relative to the working directory is returned so that error messages name what the user wrote.
    """
    if os.path.isabs(path):
        return path
    base = cwd if cwd is not None else os.getcwd()
    candidate = os.path.abspath(os.path.join(base, path))
    if os.path.exists(candidate):
        return candidate
    in_home = os.path.abspath(os.path.join(home_dir(), path))
    if os.path.exists(in_home):
        return in_home
    return candidate
