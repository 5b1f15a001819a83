"""The one place the version of connmix-tx is written."""

__version__ = "0.1.0"
