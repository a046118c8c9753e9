"""turnrelay: a self-hostable backend for AI copilot chat."""

__version__ = "0.1.0"
