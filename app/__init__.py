"""Connector credentials service: stores connector credentials and hands out request headers."""

__version__ = "0.1.0"
