"""Data-parallel jobs under torchrun: process group, device, rank-0 helpers, DDP / FSDP wrapping.

`seqssm pretrain`, `pretrain-molecules`, `finetune` and `embed` open a ``session(device)``.
Started by torchrun with more than one process (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in the environment) it joins the process group; otherwise it is a no-op and the job is
the single-process one, unchanged (``SINGLE``).

  backend   NCCL when the device is CUDA, gloo on CPU; a second, gloo-only group carries the small
            control messages (settings, errors, counts, RNG states) on CPU tensors, so they never
            touch the GPU stream.
  device    cuda:LOCAL_RANK (choose the GPUs with CUDA_VISIBLE_DEVICES), or cpu with --device cpu.
  timeout   SEQSSM_DIST_TIMEOUT seconds (default 1800) for any collective, rank 0's checkpoint
            writes and evaluations included.
  errors    ``agree`` / ``on_main`` run a step that can fail on some ranks only (reading inputs,
            preparing the output) and raise the same error on every rank, so none waits forever;
            a rank that dies outright is handled by torchrun, which stops the others.

Training wraps the model with ``wrap``: DDP (every rank holds the whole model, gradients are
averaged) or, with ``fsdp=True``, FSDP2 ``fully_shard`` (parameters, gradients and optimizer state
sharded across ranks; each block is gathered only while it runs). Checkpoints are the same files
either way: rank 0 writes the full model and an optimizer state keyed by parameter index, exactly
what a single process writes, so a run may resume with another world size or without FSDP.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from seqssm.errors import SeqssmError

TIMEOUT_ENV = "SEQSSM_DIST_TIMEOUT"


class PeerFailed(SeqssmError):
    """Raised on every rank when a step failed on some rank. ``echo`` is False on the ranks that
    should stay quiet (the CLI prints the error once, on rank 0)."""

    def __init__(self, message: str, *, echo: bool):
        super().__init__(message)
        self.echo = echo


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the job. ``world_size == 1``: a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: no process group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- sharding
    def rows(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` rows: [r*n//W, (r+1)*n//W). Equal shares when W divides n;
        otherwise they differ by at most one row (and may be empty)."""
        W, r = self.world_size, self.rank
        return slice(r * n // W, (r + 1) * n // W)

    def check_divisible(self, batch: int, what: str = "--batch-size") -> None:
        if batch % self.world_size:
            raise SeqssmError(f"{what} {batch} is the global batch and must be divisible by the number of "
                              f"processes ({self.world_size}); use a multiple of {self.world_size}")

    # -- collectives (no-ops in a single process)
    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier(group=_control_group())

    def all_sum(self, values) -> list[float]:
        """Sums over the ranks, in float64 (every rank receives the same numbers)."""
        vals = [float(v) for v in values]
        if not self.enabled:
            return vals
        t = torch.tensor(vals, dtype=torch.float64)
        torch.distributed.all_reduce(t, group=_control_group())
        return t.tolist()

    def all_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over the ranks of a tensor on the training device (through the main backend)."""
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t

    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj, group=_control_group())
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=_control_group())
        return box[0]

    def agree(self, fn: Callable[[], Any]):
        """Run ``fn`` on every rank; if it fails on any, every rank raises (see PeerFailed)."""
        if not self.enabled:
            return fn()
        result, err, exc = None, None, None
        try:
            result = fn()
        except SeqssmError as e:
            err, exc = str(e), e
        except Exception as e:  # a bug: its own rank keeps the traceback
            err, exc = f"{type(e).__name__}: {e}", e
        errors = self.all_gather(err)
        failed = [(r, m) for r, m in enumerate(errors) if m is not None]
        if failed:
            first_rank, first = failed[0]
            if exc is not None and not isinstance(exc, SeqssmError):
                raise exc
            if exc is not None and self.is_main:
                raise exc  # rank 0 prints its own error
            where = "" if first_rank == 0 else f"rank {first_rank}: "
            raise PeerFailed(where + first, echo=self.is_main)
        return result

    def on_main(self, fn: Callable[[], Any]):
        """Run ``fn`` on rank 0 only and hand its result (or its error) to every rank."""
        if not self.enabled:
            return fn()
        box: list = [None, None]
        if self.is_main:
            try:
                box[0] = fn()
            except SeqssmError as e:
                box[1] = str(e)
                self.broadcast(box)
                raise
            except Exception as e:
                box[1] = f"{type(e).__name__}: {e}"
                self.broadcast(box)
                raise
            self.broadcast(box)
            return box[0]
        result, err = self.broadcast(box)
        if err is not None:
            raise PeerFailed(err, echo=False)
        return result


SINGLE = Dist()
_ACTIVE: Dist | None = None
_CONTROL = None


def current() -> Dist:
    """The Dist of the running session (SINGLE outside one)."""
    return _ACTIVE or SINGLE


def _control_group():
    return _CONTROL


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process (readable before and after a session)."""
    return int(os.environ.get("RANK", "0")) == 0


def _timeout() -> _dt.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        return _dt.timedelta(seconds=float(raw))
    except ValueError:
        raise SeqssmError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None


def _rank_device(device: str | None, local_rank: int) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK for auto/cuda, or cpu."""
    want = (device or "auto").strip()
    if want == "cpu":
        return torch.device("cpu")
    if want == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if want not in ("auto", "cuda", f"cuda:{local_rank}"):
        raise SeqssmError(f"--device {want}: under torchrun each process uses cuda:LOCAL_RANK (here cuda:{local_rank}); "
                          "give --device cuda (or auto, or cpu) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_available():
        raise SeqssmError(f"--device {want}: CUDA is not available on this machine")
    if local_rank >= torch.cuda.device_count():
        raise SeqssmError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                          "start at most that many processes per node (--nproc_per_node)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def session(device: str | None, resolve: Callable[[str | None], torch.device], *,
            final_barrier: bool = True, backend: str | None = None) -> Iterator[Dist]:
    """Join the torchrun job (if any) for the duration of a command.

    ``resolve`` turns --device into a device in a single process (each command keeps its own rules
    and messages there). Under torchrun the device is cuda:LOCAL_RANK or cpu, and the process group
    is created here and destroyed on the way out; one created by the caller is reused and left open.
    ``final_barrier``: on a clean end, wait for every rank before leaving (off for a job whose ranks
    finish at different times and meet through files instead, where a long barrier would time out).
    ``backend``: force one ("gloo" for a job whose only collectives are small control messages).
    """
    global _ACTIVE, _CONTROL
    if _ACTIVE is not None:  # nested: a command called from another one
        yield _ACTIVE
        return
    dist_mod = torch.distributed
    owned = False
    if not launched_by_torchrun() and not (dist_mod.is_available() and dist_mod.is_initialized()):
        yield Dist(device=resolve(device))
        return
    if not dist_mod.is_available():
        raise SeqssmError("this torch build has no torch.distributed; run without torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _rank_device(device, local_rank)
    if not dist_mod.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        kw = {"device_id": dev} if backend == "nccl" else {}
        dist_mod.init_process_group(backend=backend, timeout=_timeout(), **kw)
        owned = True
    world, rank = dist_mod.get_world_size(), dist_mod.get_rank()
    backend = str(dist_mod.get_backend())
    _CONTROL = dist_mod.new_group(backend="gloo", timeout=_timeout()) if backend != "gloo" else dist_mod.group.WORLD
    _ACTIVE = Dist(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend)
    try:
        yield _ACTIVE
    except BaseException:
        # The process is about to exit (non-zero), and torchrun then stops the other ranks. No barrier
        # here (it would wait for ranks that may never arrive); the group is torn down without waiting,
        # so the process ends with its own exit code rather than aborting in a communication thread.
        _ACTIVE = _CONTROL = None
        if owned:
            _abandon_group()
        raise
    # A clean end: wait for every rank (rank 0 may still be writing), then leave.
    if final_barrier:
        dist_mod.barrier(group=_CONTROL)
    _ACTIVE = _CONTROL = None
    if owned:
        dist_mod.destroy_process_group()


def _abandon_group() -> None:
    from torch.distributed import distributed_c10d as c10d

    try:
        if hasattr(c10d, "_abort_process_group"):
            c10d._abort_process_group()
        else:
            c10d.destroy_process_group()
    except Exception:  # already broken: nothing left to release
        pass


def seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Seed this rank's torch RNG (dropout) from (seed, rank, step): ranks draw different masks."""
    s = np.random.SeedSequence([int(seed), int(rank), int(step), 0x5EED]).generate_state(1, dtype=np.uint64)[0]
    torch.manual_seed(int(s) & ((1 << 63) - 1))


# ----------------------------------------------------------------------------- model wrapping


def _block_lists(model: torch.nn.Module) -> list[torch.nn.Module]:
    """FSDP units: the members of the outermost ModuleLists (the model's blocks)."""
    chosen: list[str] = []
    units: list[torch.nn.Module] = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and not any(name.startswith(c + ".") for c in chosen):
            chosen.append(name)
            units.extend(b for b in m if any(True for _ in b.parameters()))
    return units


class Replica:
    """A model prepared for data-parallel training on one rank.

    ``module``   the model (under FSDP its parameters are sharded in place)
    ``train``    what the training forward calls: the DDP wrapper, or the module itself
    ``kind``     "single", "ddp" or "fsdp"
    Gradients of ``loss * world_size`` per rank come out as the single-process gradient of the
    global batch (DDP and FSDP average over ranks).
    """

    def __init__(self, model: torch.nn.Module, dist: Dist, *, fsdp: bool = False):
        self.dist = dist
        self.module = model
        self.kind = "single" if not dist.enabled else ("fsdp" if fsdp else "ddp")
        self.shadow = None  # FSDP, rank 0: an unsharded CPU copy that checkpoints are written from
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [dist.device.index] if dist.device.type == "cuda" else None
            # No buffer broadcasts: the models' buffers are constants, and evaluation runs the bare
            # module on a subset of ranks.
            import inspect

            quiet_buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                             inspect.signature(DDP.__init__).parameters else {"broadcast_buffers": False})
            self.train = DDP(model, device_ids=ids, **quiet_buffers)
        elif self.kind == "fsdp":
            from torch.distributed.fsdp import fully_shard

            if dist.is_main:
                self.shadow = copy.deepcopy(model).cpu()
            for m in model.modules():  # the staged inference path skips the blocks' forward, where FSDP
                if hasattr(m, "lean"):  # gathers their weights: evaluate through the plain layers
                    m.lean = None
            for block in _block_lists(model):
                fully_shard(block)
            fully_shard(model)
            self.train = model
        else:
            self.train = model

    @property
    def lockstep(self) -> bool:
        """Every forward is a collective (FSDP): all ranks must run the same number of them."""
        return self.kind == "fsdp"

    def sync_grads(self, on: bool):
        """Context of one backward: gradients are reduced across ranks only when ``on`` (the last micro-batch)."""
        if self.kind == "ddp" and not on:
            return self.train.no_sync()
        if self.kind == "fsdp":
            self.module.set_requires_gradient_sync(on)
        return contextlib.nullcontext()

    def clip_grad_norm(self, params, max_norm: float) -> float:
        n = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(n, "full_tensor"):
            n = n.full_tensor()
        return float(n)

    # -- checkpoints: the same files as a single process
    def model_to_save(self) -> torch.nn.Module | None:
        """The full model on rank 0 (None elsewhere). Collective under FSDP: call on every rank."""
        if self.kind != "fsdp":
            return self.module if self.dist.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.dist.is_main:
            return None
        self.shadow.load_state_dict(sd, strict=False)
        return self.shadow

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """The optimizer state as ``optimizer.state_dict()`` of a single process (rank 0; None elsewhere)."""
        if self.kind != "fsdp":
            return optimizer.state_dict() if self.dist.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        sd = get_optimizer_state_dict(self.module, optimizer,
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.dist.is_main:
            return None
        names = _param_names(self.module, optimizer)
        index = {n: i for i, n in enumerate(names)}
        return {"state": {index[k]: v for k, v in sd["state"].items()},
                "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]}

    def load_model_state(self, state: dict) -> None:
        if self.kind != "fsdp":
            self.module.load_state_dict(state, strict=True)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True))

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if self.kind != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = _param_names(self.module, optimizer)
        sd = {"state": {names[int(i)]: v for i, v in state["state"].items()},
              "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(self.module, optimizer, sd, options=StateDictOptions(full_state_dict=True))


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in state_dict index order."""
    by_id = {}
    for name, p in model.named_parameters():
        by_id.setdefault(id(p), name)
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def lockstep_batches(n_batches: int, dist: Dist, *, lockstep: bool) -> list[int | None]:
    """This rank's batches of an evaluation: batch i goes to rank i mod W (the batches themselves are the
    single-process ones, so each example's output is the same). With ``lockstep`` the list is padded with
    None to the same length on every rank (a forward whose result is thrown away)."""
    mine: list[int | None] = list(range(dist.rank, n_batches, dist.world_size))
    if lockstep and dist.enabled:
        mine += [None] * (-(-n_batches // dist.world_size) - len(mine))
    return mine
