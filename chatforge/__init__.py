"""chatforge: turn a small open chat model into your own assistant and ship it.

The library's entry points, one per command of the `chatforge` CLI (chatforge/cli/ parses the flags and calls
these). The code is laid out by workflow stage: README.md, "How the code is laid out".
"""

from chatforge.config import load_recipe
from chatforge.data.identity import IdentitySpec, write_identity_data
from chatforge.data.tools import check as check_data
from chatforge.data.tools import convert as convert_data
from chatforge.evaluation import evaluate, evaluate_data
from chatforge.export.convert import convert
from chatforge.export.gguf import export_gguf
from chatforge.export.merge import merge
from chatforge.files import ChatforgeError
from chatforge.hub.app import write_app
from chatforge.hub.publish import publish
from chatforge.inference.generate import generate_batch, stream_reply
from chatforge.models.load import DEFAULT_MODEL, load_model, load_tokenizer
from chatforge.pipeline import assistant
from chatforge.serving.chat import chat
from chatforge.serving.openai_api import serve_api
from chatforge.serving.web import serve_web
from chatforge.training.trainer import train

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_MODEL",
    "ChatforgeError",
    "IdentitySpec",
    "assistant",
    "chat",
    "check_data",
    "convert",
    "convert_data",
    "evaluate",
    "evaluate_data",
    "export_gguf",
    "generate_batch",
    "load_model",
    "load_recipe",
    "load_tokenizer",
    "merge",
    "publish",
    "serve_api",
    "serve_web",
    "stream_reply",
    "train",
    "write_app",
    "write_identity_data",
]
