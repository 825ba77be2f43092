"""`chatforge recipes` and `chatforge train`: pick a recipe and fine-tune with it, on one GPU or many."""

from __future__ import annotations

from typing import get_args

from torch.distributed.elastic.multiprocessing.errors import record

from chatforge.cli.common import TEMPLATE_HELP
from chatforge.config import Strategy, copy_recipe, describe_keys, list_recipes, load_recipe
from chatforge.files import ChatforgeError
from chatforge.training import launch
from chatforge.training.parallel import Parallel
from chatforge.training.trainer import train as train_recipe


def recipes(a):
    if a.action == "list":
        for name in list_recipes(a.arg):
            print(name)
    elif a.action == "keys":
        print(describe_keys())
    elif a.action == "copy":
        if not a.arg or not a.dest:
            raise ChatforgeError("usage: chatforge recipes copy NAME DIR")
        print(copy_recipe(a.arg, a.dest))


def train(a):
    overrides = (
        list(a.overrides)
        + ([f"strategy={a.strategy}"] if a.strategy else [])
        + ([f"chat_template={a.chat_template}"] if a.chat_template else [])
    )
    cfg = load_recipe(a.recipe, overrides)  # a bad recipe fails here, before any process starts
    if (a.gpus or a.nnodes) and not launch.in_launched_rank():
        world = (a.gpus or 1) * (a.nnodes or launch.slurm_nodes().get("nnodes") or 1)
        Parallel(world=world).shard(list(range(cfg.batch_size * cfg.grad_accum)))  # splits evenly?
        args = (
            ["train", a.recipe, *overrides]
            + ["--resume"] * a.resume
            + ["--no-progress"] * a.no_progress
            + ["--allow-changes"] * a.allow_changes
        )
        rc = launch.launch(
            args,
            a.gpus or 1,
            nnodes=a.nnodes,
            node_rank=a.node_rank,
            master_addr=a.master_addr,
            master_port=a.master_port,
        )
        if rc:
            raise ChatforgeError(
                f"training stopped: torchrun exited with status {rc} (the failing rank's error is printed above)"
            )
        return
    final = record(train_recipe)(
        cfg,
        resume=a.resume,
        progress=not a.no_progress,  # torchrun shows the traceback
        allow_changes=a.allow_changes,
    )
    if launch.rank_env()[0] == 0:
        print(final)


def add_commands(sub) -> None:
    s = sub.add_parser(
        "recipes", help="list or copy the shipped recipes (xtuner list-cfg / copy-cfg), or print every recipe key"
    )
    s.add_argument("action", choices=["list", "copy", "keys"])
    s.add_argument("arg", nargs="?", help="pattern (list) or recipe name (copy)")
    s.add_argument("dest", nargs="?", help="folder to copy into")
    s.set_defaults(func=recipes)

    s = sub.add_parser("train", help="fine-tune with a recipe: chatforge train RECIPE [key=value ...]")
    s.add_argument("recipe", help="a recipe file or the name of a shipped recipe")
    s.add_argument("overrides", nargs="*", help="key=value overrides, dotted for sections (lora.r=8)")
    s.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    s.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: continue although the recipe's training keys differ from the checkpoint's",
    )
    s.add_argument("--no-progress", action="store_true")
    g = s.add_argument_group("several GPUs or machines (docs/distributed.md)")
    g.add_argument("--gpus", type=int, help="processes (GPUs) on this machine, launched through torchrun")
    g.add_argument("--nnodes", type=int, help="machines in the job (default 1, or SLURM's count)")
    g.add_argument("--node-rank", type=int, help="this machine's number, 0 .. nnodes-1 (default: SLURM's)")
    g.add_argument("--master-addr", help="address of the machine with node-rank 0")
    g.add_argument("--master-port", type=int, help="a free TCP port on that machine (default 29500)")
    g.add_argument("--strategy", choices=get_args(Strategy), help="overrides the recipe's strategy key")
    s.add_argument("--chat-template", metavar="NAME|FILE", help=TEMPLATE_HELP)
    s.set_defaults(func=train)
