"""Several processes, one model: PyTorch's DistributedDataParallel as launched by torchrun.

torchrun (or `finetune train --gpus N`, which calls it) starts one process per GPU and tells each its
RANK, LOCAL_RANK and WORLD_SIZE in the environment. Every process runs the same training code; this
module holds what differs: joining the process group, sharding the data, the few collectives the loop
needs, and running a step on rank 0 only (the dataset scan, the run folder) with its result or its
error handed to every rank. Without those variables everything here is a no-op for one process.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from finetune._util.devices import resolve_device
from finetune.errors import FinetuneError, UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_world = World()
_comm_device = None  # where collective tensors live: the rank's GPU under NCCL, the CPU under gloo


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise UsageError(f"{name}={os.environ[name]!r} in the environment is not a number; launch with torchrun") \
            from None


def from_env() -> World:
    """The world torchrun describes in the environment (one process when it describes none)."""
    return World(rank=_env_int("RANK", 0), size=_env_int("WORLD_SIZE", 1), local_rank=_env_int("LOCAL_RANK", 0),
                 local_size=_env_int("LOCAL_WORLD_SIZE", 1))


def current() -> World:
    """The world this process joined (one process before init)."""
    return _world


def init(device_spec: str = "auto") -> World:
    """Join torchrun's process group once: NCCL on GPUs, gloo on CPUs. Returns this process's world."""
    global _world, _comm_device
    world = from_env()
    if not world.distributed or _world.distributed:
        return _world if _world.distributed else world
    import torch
    import torch.distributed as dist

    spec = device_spec.strip().lower()
    if spec == "mps" or spec.startswith("mps:"):
        raise UsageError("--device mps: distributed training runs on CUDA GPUs or CPUs; use --device cuda or cpu")
    use_cuda = spec != "cpu" and torch.cuda.is_available()
    if spec.startswith("cuda") and not use_cuda:
        raise UsageError(f"--device {spec}: no CUDA GPU is available here; use --device cpu")
    if use_cuda:
        if world.local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {world.local_rank}: this machine has {torch.cuda.device_count()} CUDA "
                             "device(s); start at most that many processes per node (--nproc-per-node)")
        torch.cuda.set_device(world.local_rank)
        _comm_device = torch.device("cuda", world.local_rank)
    else:
        _comm_device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=_comm_device if use_cuda else None)
    atexit.register(close)
    _world = world
    return world


def device(spec: str):
    """The torch device of this process: its own GPU (cuda:LOCAL_RANK) when distributed on GPUs."""
    if not _world.distributed:
        return resolve_device(spec)
    return _comm_device


def close() -> None:
    """Leave the process group (at exit)."""
    global _world
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _world = World()


def single_process(command: str) -> None:
    """Refuse to run a one-process job under torchrun (every process would repeat it and write the same files)."""
    if from_env().distributed:
        raise UsageError(f"finetune {command} runs in one process; start it without torchrun (only `finetune "
                         "train` trains with several processes)")


def shard(items: Sequence[T], world: World | None = None) -> list[T]:
    """This rank's share: every size-th item from position rank. Shares are disjoint, cover all items, and
    differ in length by at most one."""
    w = world or _world
    return list(items[w.rank::w.size])


def on_main(fn: Callable[[], T]) -> T:
    """fn() run on rank 0 only; its result (or its FinetuneError) reaches every rank."""
    if not _world.distributed:
        return fn()
    return _run_on_main(fn, share=True)


def main_first(fn: Callable[[], T]) -> T:
    """fn() on rank 0, then (if it succeeded) on every other rank: a download or cache fill happens once."""
    if not _world.distributed:
        return fn()
    result = _run_on_main(fn, share=False)
    return result if _world.main else fn()


def _run_on_main(fn: Callable[[], T], share: bool):
    """fn() on rank 0; every rank learns whether it failed (and raises its error), and with share its result."""
    import torch.distributed as dist

    box: list = [None]
    value, error = None, None
    if _world.main:
        try:
            value = fn()
            box[0] = ("ok", value if share else None)
        except FinetuneError as e:
            error = e
            box[0] = ("error", str(e), e.exit_code)
    dist.broadcast_object_list(box, src=0, device=_comm_device)
    if box[0][0] == "error":
        if error is None:  # another rank's error: the same message and exit code here
            error = FinetuneError(box[0][1])
            error.exit_code = box[0][2]
        raise echoed(error)
    return value if _world.main else box[0][1]


def echoed(e: FinetuneError) -> FinetuneError:
    """Mark an error every rank raises together: only rank 0 prints it (see leave_together)."""
    e.collective = True
    e.echo = not _world.main
    return e


def leave_together() -> None:
    """After an error all ranks raised: wait until every rank got here (rank 0 has printed it) before exiting,
    so that torchrun, which stops the others when one exits with an error, cannot cut rank 0's message off."""
    import torch.distributed as dist

    if _world.distributed and dist.is_initialized():
        dist.barrier()


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over all ranks (float64)."""
    return _all_reduce(values, "SUM")


def all_max(values: Sequence[float]) -> list[float]:
    """Element-wise maximum over all ranks."""
    return _all_reduce(values, "MAX")


def _all_reduce(values: Sequence[float], op: str) -> list[float]:
    if not _world.distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.tolist()


def all_gather(obj) -> list:
    """Every rank's obj, in rank order (picklable objects; CPU tensors are fine)."""
    if not _world.distributed:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * _world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(model) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, so all evaluate the model rank 0 saves."""
    if not _world.distributed:
        return
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b.data, src=0)


def launch(args: list[str], nproc: int) -> int:
    """Run `torchrun --standalone --nproc-per-node nproc -m finetune ARGS` in this process; its exit code.

    A worker that fails has already printed its one-line error; torch's own failure report (a traceback
    summary) is kept out of the way, and the worker's exit code is returned.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun sets 1 thread per process (and warns) when none is set; CPUs split evenly is the better guess.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    for name in list(logging.root.manager.loggerDict):  # the workers say what went wrong; the agent's logs repeat it
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    parsed = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "finetune", *args])
    try:
        run(parsed)
    except ChildFailedError as e:
        # The first worker that exited with an error; workers torchrun then stopped by a signal come after.
        first = min(e.failures.values(), key=lambda f: (f.exitcode < 0, f.timestamp))
        return 128 - first.exitcode if first.exitcode < 0 else first.exitcode  # signal n: 128 + n, as shells say
    except SignalException as e:  # Ctrl-C or SIGTERM: torchrun passed it on; the workers stopped after their step
        return 128 + int(e.sigval)
    return 0


class EvenBatches:
    """Batch sampler over one rank's share: reshuffled each epoch from (seed, rank, epoch) alone, cut into
    exactly `steps` batches so that every rank takes every optimiser step (DDP waits for all ranks).

    Depending on nothing but those numbers, an epoch's order is the same whether the run was resumed or
    not, and whatever world size ran the epochs before. weights (one per item) draw with replacement.
    """

    def __init__(self, n: int, steps: int, seed: int, rank: int, weights=None):
        self.n, self.steps, self.seed, self.rank, self.weights = n, steps, seed, rank, weights
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        import torch

        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.rank, self.epoch))
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        else:
            order = torch.randperm(self.n, generator=g)
        for batch in torch.tensor_split(order, self.steps):
            yield batch.tolist()


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """A seed for one rank's epoch: runs repeat, ranks differ."""
    return (seed * 1_000_003 + rank * 10_007 + epoch) % 2**63
