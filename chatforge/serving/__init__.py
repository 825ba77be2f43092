"""Talk to a model: the terminal chat, the browser chat (Gradio), the OpenAI-compatible API, and who may connect."""
