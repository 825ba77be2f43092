"""Checks that a converted or merged model still computes what its source did: a probe batch of chats
and the logits at its real (unpadded) positions."""

from __future__ import annotations

import torch

from chatforge.models.chat_tokens import prompt_ids

PROBE = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "你是谁？"}],
]


def probe_batch(tokenizer) -> dict[str, torch.Tensor]:
    rows = [prompt_ids(tokenizer, m) for m in PROBE]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


@torch.inference_mode()
def masked_logits(model, batch) -> torch.Tensor:
    logits = model(**batch).logits.float()
    return logits[batch["attention_mask"].bool()]
