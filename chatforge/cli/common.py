"""Help texts that several command groups share."""

TEMPLATE_HELP = (
    "chat template for a model without one (or to replace its own): chatml, llama3, internlm2, "
    "qwen2, gemma, or a .jinja / tokenizer_config.json file"
)
