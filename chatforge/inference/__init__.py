"""Generation: batched and streamed replies, KV-cache slots, the batching engines of `chatforge serve`."""
