"""What a user gets from plain Hugging Face Trainer + PEFT on an InternLM2-1.8B-shaped model.

Adapted from the project's reference script (shared/reference/hf_trainer_baseline.py, which does not
travel to the GPU machine): same model, data, Trainer arguments and timing; added: a tiny CPU shape,
per-step losses (logging_steps=1) and samples taken in order, so chatforge can be fed the same data.
SCENARIO words: hf_{lora|qlora|full}[_gc][_bN][_liger]  (qlora needs bitsandbytes, liger liger-kernel).
"""

import re
import time

import torch
from torch.utils.data import Dataset, SequentialSampler
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

WARM = 5
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cfg(tiny: bool = False):
    if tiny:
        return LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            rope_theta=1e6,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
    return LlamaConfig(
        vocab_size=92544,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


class Rand(Dataset):
    def __init__(self, n, seq, vocab=92544):
        self.n, self.seq, self.vocab = n, seq, vocab

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x = torch.randint(0, self.vocab, (self.seq,), generator=g)
        return {"input_ids": x, "labels": x.clone()}


class Clock(TrainerCallback):
    def __init__(self):
        self.t, self.loss = [], []

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.loss.append(float(logs["loss"]))


class InOrder(Trainer):
    """Samples in index order (the reference shuffles; the order does not change the speed)."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def build(name: str, tiny: bool, device: str, lora_dropout: float = 0.1):
    """The model of a scenario, built as the reference builds it (seed 0, random weights)."""
    lora, qlora = "lora" in name, "qlora" in name
    torch.manual_seed(0)
    dtype = torch.bfloat16 if lora and device == "cuda" else torch.float32
    with torch.device(device):
        torch.set_default_dtype(dtype)
        model = LlamaForCausalLM(cfg(tiny))
        torch.set_default_dtype(torch.float32)
    if qlora:  # the seed's recipe: NF4 + double quantisation, reloaded through from_pretrained
        from transformers import BitsAndBytesConfig

        folder = f"/tmp/rand_{'tiny' if tiny else '18b'}"
        model.save_pretrained(folder)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        model = LlamaForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            device_map={"": 0} if device == "cuda" else None,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            ),
        )
    return model


def add_lora(model, lora_dropout: float, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(
        model,
        LoraConfig(r=64, lora_alpha=16, lora_dropout=lora_dropout, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"),
    )


def run(name: str, tiny: bool = False, steps: int = 30, seq: int = 2048, warm: int = WARM) -> dict:
    """Train one scenario with HF Trainer; returns tokens/s, peak memory and per-step losses."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lora, qlora, liger, gc = "lora" in name, "qlora" in name, "liger" in name, "_gc" in name
    found = re.search(r"_b(\d+)", name)
    bs = int(found.group(1)) if found else 1
    model = build(name, tiny, device)
    if qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    if lora:
        model = add_lora(model, 0.1)
    cuda = device == "cuda"
    args = TrainingArguments(
        output_dir="/tmp/o",
        per_device_train_batch_size=bs,
        max_steps=steps,
        learning_rate=2e-4,
        bf16=cuda,
        gradient_checkpointing=gc,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        dataloader_num_workers=2 if cuda else 0,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        lr_scheduler_type="constant",
        use_liger_kernel=liger,
        use_cpu=not cuda,
        disable_tqdm=True,
    )
    clock = Clock()
    vocab = model.config.vocab_size
    tr = InOrder(model=model, args=args, train_dataset=Rand(bs * steps, seq, vocab), callbacks=[clock])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tr.train()
    dt = (clock.t[-1] - clock.t[warm - 1]) / (len(clock.t) - warm)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return {
        "name": name,
        "method": "qlora" if qlora else ("lora" if lora else "full"),
        "global_batch": bs,
        "micro_batch": bs,
        "tok_s": bs * seq / dt,
        "peak_gib": peak,
        "losses": clock.loss,
        "step_ms": dt * 1000,
    }
