"""connmix-tx: a distributed WebSocket / TCP long-connection engine scripted in Lua, on Twisted."""

from connmix_tx._version import __version__

__all__ = ["__version__"]
