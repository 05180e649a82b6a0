"""ringserve: a multi-process model inference server (see README.md and DESIGN.md)."""

__version__ = "0.1.0"
