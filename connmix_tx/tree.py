"""Walking the service tree: reconfiguration, ordered stops and a printed outline.

Every long-lived object of the process is a child service somewhere under the root
(``connmix_tx.service.ConnmixService``).  A service that can take a new configuration while
running implements ``Reconfigurable``: ``reconfigure(old, new)`` gets the running configuration
and the effective new one (hot keys changed, restart-only keys as running; ``connmix_tx.reload``
computes it) and applies what concerns it alone.  ``reconfigure_tree`` visits the tree parent
first, children in the order they were added, so a part sees the new configuration before its
children (the root replaces the shared access control before the API server closes the sockets
of removed users).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Protocol, runtime_checkable

from twisted.application import service

if TYPE_CHECKING:
    from connmix_tx.config import Config


@runtime_checkable
class Reconfigurable(Protocol):
    """A service that applies the hot keys of a SIGHUP reload to itself."""

    def reconfigure(self, old: Config, new: Config) -> None:
        """Apply ``new`` (restart-only keys unchanged from ``old``) from now on."""


def children(node: Any) -> list[Any]:
    """The child services of ``node`` in the order they were added (none for a leaf)."""
    if service.IServiceCollection.providedBy(node):
        return list(node)
    return []


def walk(node: Any, depth: int = 0) -> Iterator[tuple[int, Any]]:
    """``(depth, service)`` for ``node`` and every service under it, parent first."""
    yield depth, node
    for child in children(node):
        yield from walk(child, depth + 1)


def reconfigure_tree(root: Any, old: Config, new: Config) -> None:
    """Call ``reconfigure(old, new)`` on every ``Reconfigurable`` service of the tree, parent first."""
    for _, node in walk(root):
        if isinstance(node, Reconfigurable):
            node.reconfigure(old, new)


def outline(root: Any) -> str:
    """The tree as indented lines ``name (Class)``, children under their parent (docs and tests)."""
    lines = []
    for depth, node in walk(root):
        name = getattr(node, "name", None) or "-"
        lines.append(f"{'  ' * depth}{name} ({type(node).__name__})")
    return "\n".join(lines)
