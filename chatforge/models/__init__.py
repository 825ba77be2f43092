"""Find and load models: a spec (alias, folder, .gguf) to a tokenizer and model; InternLM2 and GGUF readers; chat
templates and tokens; the checks that a converted model still computes what its source did."""
