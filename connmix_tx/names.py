"""The name rule of topics and channels, shared by the queues, the connections and the router.

A name is 1-255 bytes of text (UTF-8) without whitespace or control characters (docs/api.md,
docs/queues.md).  It lives here, apart from every room that checks it, so that none of them
imports another only for the rule.
"""

from __future__ import annotations

from typing import TypeGuard

__all__ = ["MAX_NAME_BYTES", "valid_name"]

MAX_NAME_BYTES = 255


def valid_name(name: object) -> TypeGuard[str]:
    """Topic and channel names: 1-255 bytes of text, no whitespace or control characters."""
    if not isinstance(name, str) or not name:
        return False
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return False
    return not any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in name)
