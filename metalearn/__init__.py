"""metalearn: a meta-learning experiment runner."""

__version__ = "0.1.0"
