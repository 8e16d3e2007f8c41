"""distill: turn a big teacher model into a small offline student for one task."""

__version__ = "0.1.0"
