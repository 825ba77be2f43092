"""A trained model out: merge an adapter, convert between layouts, write GGUF (and an Ollama Modelfile)."""
