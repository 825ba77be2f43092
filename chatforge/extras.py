"""Optional dependencies: a missing one is a one-line error that names the extra to install."""

from __future__ import annotations

import importlib

from chatforge.files import ChatforgeError


def require(module: str, extra: str, command: str):
    """Import `module`, which `command` needs and the `extra` of chatforge installs.

    Raises:
        ChatforgeError: the module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0]:
            raise  # the module is there; something it imports is broken
        raise ChatforgeError(
            f"{command} needs {module}, which is not installed: pip install 'chatforge[{extra}]' "
            f"(or ./install.sh in the chatforge folder)"
        ) from None
