"""Several GPUs and machines, on existing engines only.

The ranks are started by chatforge/training/launch.py. The distribution itself is DDP, FSDP2
(torch.distributed.fsdp.fully_shard) or DeepSpeed ZeRO-2/3; nothing here reimplements them.

Batch semantics: a recipe's batch_size x grad_accum is the global batch of one optimizer step,
whatever the number of processes. Each of N ranks takes its own 1/N of the step's sample indices
(no overlap) and accumulates them in micro-batches of at most batch_size, so 1 and N processes
train on the same samples per step and log the same loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from datetime import timedelta
from typing import ClassVar, get_args

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from chatforge.config import Strategy
from chatforge.files import ChatforgeError
from chatforge.models.load import DTYPES
from chatforge.training.launch import rank_env

STRATEGIES = get_args(Strategy)


def resolve_strategy(strategy: str, method: str, world: int) -> str:
    """The strategy actually used: 'none' for one plain process; auto = DDP for adapters, FSDP2 for full."""
    if strategy not in STRATEGIES:
        raise ChatforgeError(f"recipe key 'strategy': {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if strategy == "auto":
        strategy = "fsdp2" if method == "full" else "ddp"
    if method == "qlora" and strategy != "ddp":
        raise ChatforgeError(f"strategy {strategy} cannot shard 4-bit (QLoRA) weights: use strategy ddp")
    if world == 1 and strategy in ("ddp", "fsdp2"):
        return "none"
    return strategy


@dataclass
class Parallel:
    """This process's place in the job and the strategy's operations. This base class is one plain
    process (or ranks that only share collectives); each strategy below overrides what it changes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    strategy: ClassVar[str] = "none"
    can_generate: ClassVar[bool] = True  # rank 0 alone holds whole weights (sharded strategies: every rank)
    engine: ClassVar[object] = None  # DeepSpeed's engine, once built

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_sum(self, *values: float) -> list[float]:
        """Sums over all ranks of a few numbers (one collective)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    @property
    def comm_device(self) -> str:
        return f"cuda:{self.local_rank}" if self.device.startswith("cuda") else "cpu"

    def on_main(self, fn):
        """fn() on rank 0 only; its result (or its ChatforgeError) is sent to every rank.

        Used for preprocessing: the data is tokenised once, every rank trains on the very same
        samples, and a data error stops all ranks with its message instead of leaving them waiting.
        """
        if self.world == 1:
            return fn()
        box = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except ChatforgeError as e:
                box[0] = ("error", str(e))
        torch.distributed.broadcast_object_list(box, src=0, device=self.comm_device)
        status, value = box[0]
        if status == "error":
            raise ChatforgeError(value)
        return value

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's contiguous share of one global step's sample indices.

        Raises:
            ChatforgeError: the global batch does not split evenly over the ranks.
        """
        if self.world == 1:
            return indices
        if len(indices) % self.world:
            raise ChatforgeError(
                f"global batch batch_size x grad_accum = {len(indices)} does not split over "
                f"{self.world} processes: make it a multiple of {self.world}"
            )
        share = len(indices) // self.world
        return indices[self.rank * share : (self.rank + 1) * share]

    def plan_config(self, cfg, share: int):
        """The recipe as the speed plan (speed_plan.py) sees it on this rank: micro-batches and
        checkpointing sized for this rank's share of the step, within the strategy's limits.

        Raises:
            ChatforgeError: a speed key the strategy cannot run.
        """
        changes = {"batch_size": share, "grad_accum": 1} if self.world > 1 else {}
        changes.update(self.speed_limits(cfg))
        if self.strategy != "none":  # hooks and collectives inside the step: graphs.py captures one process
            if getattr(cfg, "cuda_graphs", "auto") is True:
                raise ChatforgeError(f"recipe key 'cuda_graphs': true needs one process, not {self.strategy}")
            changes["cuda_graphs"] = False
        return dataclasses.replace(cfg, **changes) if changes else cfg

    def speed_limits(self, cfg) -> dict:
        """Speed keys this strategy turns off (recipe key -> value)."""
        return {}

    # -- wrapping

    def wrap(self, model, loss_fn):
        """The callable that trains: engine(batch) -> (summed loss, trained tokens).

        The loss runs inside the wrapper's forward (LossForward), so DDP's and FSDP2's hooks see the
        whole computation even when the loss reads the output layer's weight directly (chunked CE).
        """
        return LossForward(model, loss_fn)

    def wrap_optimizer(self, engine, optimizer, cfg, micro_batch: int, micro_batches: int):
        """DeepSpeed takes over the engine and optimizer here; other strategies return them unchanged."""
        return engine, optimizer

    def no_sync(self, engine, last: bool):
        """Skip the gradient exchange on all but the last micro-batch of a step."""
        return contextlib.nullcontext()

    # -- one optimizer step

    def backward(self, loss) -> None:
        """Backward of a loss already divided by the step's global trained-token count.

        DDP, FSDP2 and ZeRO average gradients over ranks; the loss is multiplied by the world size
        so the result is the plain sum, as in one process.
        """
        (loss * self.world).backward()

    def step(self, optimizer, params, max_norm: float):
        """Clip and apply the accumulated gradients; returns the gradient norm before clipping, as a
        tensor where it is one (reading it waits for the GPU: the caller does so once the next step's
        data is ready)."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # -- checkpoints (collective: every rank calls them; `model` is the unwrapped model)

    def full_state_dict(self, model) -> dict | None:
        """Whole weights gathered on rank 0 for sharded strategies; None: the module's own state_dict."""
        return None

    def optimizer_state(self, model, optimizer) -> dict | None:
        """Optimizer state keyed by parameter name (portable across world sizes); rank 0 gets it."""
        return get_optimizer_state_dict(model, optimizer) if self.is_main else None

    def load_optimizer_state(self, model, optimizer, osd: dict | None) -> None:
        set_optimizer_state_dict(model, optimizer, osd)

    def save_engine_state(self, folder, tag: str) -> None:
        """DeepSpeed's own partitioned state; nothing for the other strategies."""

    def load_engine_state(self, folder, tag: str, saved_world: int) -> bool:
        return True

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@dataclass
class DataParallel(Parallel):
    """DDP: every rank holds the whole model; gradients are averaged after each step's last micro-batch."""

    strategy: ClassVar[str] = "ddp"

    def wrap(self, model, loss_fn):
        ids = [self.local_rank] if self.device.startswith("cuda") else None
        return DistributedDataParallel(super().wrap(model, loss_fn), device_ids=ids, gradient_as_bucket_view=True)

    def no_sync(self, engine, last: bool):
        return engine.no_sync() if not last else contextlib.nullcontext()


@dataclass
class FullyShardedParallel(Parallel):
    """FSDP2 (fully_shard): weights, gradients and optimizer state sharded over the ranks."""

    reshard_after_forward: object = "auto"  # recipe key fsdp_reshard_after_forward
    reduce_dtype: str = "auto"  # gradient exchange dtype

    strategy: ClassVar[str] = "fsdp2"
    can_generate: ClassVar[bool] = False

    def wrap(self, model, loss_fn):
        return shard_fsdp2(super().wrap(model, loss_fn), self)

    def no_sync(self, engine, last: bool):
        engine.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def full_state_dict(self, model) -> dict | None:
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.is_main else None

    def optimizer_state(self, model, optimizer) -> dict | None:
        osd = get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return osd if self.is_main else None

    def load_optimizer_state(self, model, optimizer, osd: dict | None) -> None:
        set_optimizer_state_dict(
            model,
            optimizer,
            osd if self.is_main else {},
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )


@dataclass
class DeepSpeedParallel(Parallel):
    """DeepSpeed ZeRO-2: optimizer state and gradients sharded; its engine takes over backward, the
    optimizer step and its own checkpoints."""

    engine: object = None

    strategy: ClassVar[str] = "deepspeed_zero2"
    stage: ClassVar[int] = 2

    def wrap_optimizer(self, engine, optimizer, cfg, micro_batch: int, micro_batches: int):
        try:
            import deepspeed  # optional (chatforge[deepspeed])
        except ImportError:
            raise ChatforgeError(
                f"strategy {self.strategy} needs DeepSpeed: pip install 'chatforge[deepspeed]'"
            ) from None
        if not self.device.startswith("cuda"):  # CPU (tests): gloo collectives, not DeepSpeed's shared-memory
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # op, which compiles for minutes first
        bf16 = self.device.startswith("cuda") and any(p.dtype == torch.bfloat16 for p in engine.parameters())
        conf = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": micro_batches,
            "train_batch_size": micro_batch * micro_batches * self.world,
            "gradient_clipping": cfg.max_grad_norm,
            "bf16": {"enabled": bf16},
            "zero_optimization": {
                "stage": self.stage,
                "overlap_comm": self.device.startswith("cuda"),
                "contiguous_gradients": True,
                "stage3_gather_16bit_weights_on_model_save": True,
            },
            "zero_allow_untested_optimizer": True,  # the recipe's own torch AdamW
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        self.engine, optimizer, _, _ = deepspeed.initialize(
            model=engine, optimizer=optimizer, config=conf, dist_init_required=False
        )
        self.register_outside_reads(deepspeed, engine)
        return self.engine, optimizer

    def register_outside_reads(self, deepspeed, engine) -> None:
        """Weights read outside their own module's call (ZeRO-3 must gather them)."""

    def backward(self, loss) -> None:
        self.engine.backward(loss * self.world, scale_wrt_gas=False)
        self.engine.step()  # counts micro-batches; steps the optimizer on the last one

    def step(self, optimizer, params, max_norm: float):
        return self.engine.get_global_grad_norm()  # DeepSpeed clipped and stepped in backward()

    def optimizer_state(self, model, optimizer) -> dict | None:
        return None  # DeepSpeed writes its own partitioned state (save_engine_state)

    def save_engine_state(self, folder, tag: str) -> None:
        self.engine.save_checkpoint(str(folder), tag=tag, save_latest=False)

    def load_engine_state(self, folder, tag: str, saved_world: int) -> bool:
        """DeepSpeed's partitioned optimizer state; only for the world size that wrote it."""
        if saved_world != self.world or not (folder / tag).is_dir():
            return False
        self.engine.load_checkpoint(
            str(folder), tag=tag, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        return True


@dataclass
class DeepSpeedZero3(DeepSpeedParallel):
    """DeepSpeed ZeRO-3: the weights sharded too, gathered layer by layer."""

    strategy: ClassVar[str] = "deepspeed_zero3"
    stage: ClassVar[int] = 3
    can_generate: ClassVar[bool] = False

    def speed_limits(self, cfg) -> dict:
        """Under ZeRO-3, `compile: auto` means off: DeepSpeed's parameter hooks made dynamo recompile per
        parameter shape (recompile limit 64 hit, no step done in 70 s on 4 x H200). `lora_groups: auto` is
        off too: ZeRO-3 gathers a projection's weights only for its own call, not for its group's first.

        Raises:
            ChatforgeError: `lora_groups: true` under ZeRO-3.
        """
        if getattr(cfg, "lora_groups", "auto") is True:
            raise ChatforgeError(
                "recipe key 'lora_groups': true does not work under deepspeed_zero3 "
                "(it gathers each projection's weights only for its own call): use auto"
            )
        return {k: False for k in ("compile", "lora_groups") if getattr(cfg, k, "auto") == "auto"}

    def register_outside_reads(self, deepspeed, engine) -> None:
        head = getattr(engine.model, "get_output_embeddings", lambda: None)()
        if head is not None:  # the chunked loss reads this weight outside its module
            deepspeed.zero.register_external_parameter(engine, head.weight)

    def full_state_dict(self, model) -> dict | None:
        sd = self.engine._zero3_consolidated_16bit_state_dict()  # what save_16bit_model writes
        return {k.removeprefix("model."): v for k, v in sd.items()} if self.is_main else None


STRATEGY_CLASSES = {
    c.strategy: c for c in (Parallel, DataParallel, FullyShardedParallel, DeepSpeedParallel, DeepSpeedZero3)
}


def for_strategy(strategy: str, cfg=None, **place) -> Parallel:
    """The Parallel of a resolved strategy ('none', 'ddp', 'fsdp2', 'deepspeed_zero2', 'deepspeed_zero3');
    `place`: rank, world, local_rank, device; `cfg`: the recipe's FSDP2 keys."""
    if strategy == "fsdp2":
        place.update(
            reshard_after_forward=getattr(cfg, "fsdp_reshard_after_forward", "auto"),
            reduce_dtype=getattr(cfg, "reduce_dtype", "auto"),
        )
    return STRATEGY_CLASSES[strategy](**place)


class LossForward(torch.nn.Module):
    """model + loss as one module, so a wrapper's forward covers the loss computation too."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def fsdp2_options(
    model, par: FullyShardedParallel, device_bytes: int
) -> tuple[torch.dtype | None, torch.dtype | None, bool]:
    """(param dtype, reduce dtype, reshard after forward) for fully_shard.

    GPU: bf16 compute; gradients are exchanged in the weights' own dtype by default (bf16 weights
    keep bf16 gradients, so an fp32 exchange would double the bytes and add nothing kept). Layers keep
    their gathered weights until backward (ZeRO-2-like: one all-gather per layer and step instead of
    two) when the whole model's 16-bit weights take under a tenth of `device_bytes`.
    """

    cuda = par.device.startswith("cuda")
    if par.reduce_dtype == "auto":
        reduce = next(iter(model.parameters())).dtype if cuda else None
    else:
        reduce = DTYPES[par.reduce_dtype]
    param = torch.bfloat16 if cuda else None
    if par.reshard_after_forward in (True, False):
        return param, reduce, par.reshard_after_forward
    gathered = sum(p.numel() for p in model.parameters()) * 2
    return param, reduce, not (cuda and gathered * 10 < device_bytes)


def shard_fsdp2(model, par: FullyShardedParallel):
    """fully_shard each decoder layer, then the root, with fsdp2_options."""
    cuda = par.device.startswith("cuda")
    mesh = init_device_mesh("cuda" if cuda else "cpu", (par.world,))
    total = torch.cuda.get_device_properties(par.local_rank).total_memory if cuda else 0
    param, reduce, reshard = fsdp2_options(model, par, total)
    mp = MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)
    layer_names = set()
    for m in model.modules():
        layer_names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_names]
    if not layers:
        raise ChatforgeError(f"FSDP2: found no decoder layers to shard in {type(model).__name__}")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    return model


def setup(cfg) -> Parallel:
    """Join the job this process was started in (torchrun or srun); one process: nothing to join.

    Raises:
        ChatforgeError: a strategy that does not fit the method, or an unknown strategy.
    """
    rank, world, local_rank = rank_env()
    cuda = torch.cuda.is_available()
    strategy = resolve_strategy(getattr(cfg, "strategy", "auto"), cfg.method, world)
    if world > 1 and not torch.distributed.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(
            "nccl" if cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=getattr(cfg, "collective_timeout", 1800)),
        )
    elif cuda:
        torch.cuda.set_device(local_rank)
    return for_strategy(strategy, cfg, rank=rank, world=world, local_rank=local_rank, device="cuda" if cuda else "cpu")
