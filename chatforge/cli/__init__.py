"""The `chatforge` command: one module per command group, each parsing flags and calling one library
function; `main` ties them together."""

from chatforge.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
