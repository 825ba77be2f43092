"""chatforge: turn a small open chat model into your own assistant and ship it."""

__version__ = "0.1.0"
