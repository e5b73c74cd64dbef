"""
parallel.py -- how the two models are spread over the processes of a torchrun job, and what keeps them in step.

    torchrun --standalone --nproc_per_node=8 train.py --parallel fsdp --student ... --teacher ...   # one 8-GPU node
    torchrun --standalone --nproc_per_node=2 train.py --parallel fsdp                                # the same on CPU

Two layouts (train.py --parallel):

  ddp   every rank holds the whole student (fp32 weights, gradients, AdamW: 16 B per parameter) and the whole
        teacher; gradients are all-reduced once per step. The default: simplest, fastest when both models fit.
  fsdp  torch's FSDP2 (`fully_shard`): the student is sharded per decoder layer and at the root, so each rank
        holds 1/world of its weights, gradients and optimizer state, and all-gathers one layer at a time for the
        forward and backward; the teacher is sharded the same way for inference (no gradients, no optimizer). A
        Qwen3-4B student (64 GB of fp32 training state) and a Qwen3-30B-A3B teacher (61 GB in bf16) need this on
        80 GB GPUs: each of 8 ranks holds 8 + 7.6 GB of them.

What FSDP asks of the rest of the code, and where it is done:

  * Every forward of a sharded model is a collective (each layer's all-gather), so every rank must run the SAME
    sequence of forwards of the same models, whatever its own data. Sampling stops when the rows of ALL ranks have
    ended (sample._decode asks any_rank), the probe runs as many chunks of states as the busiest rank has
    (topd.probe_divergence asks max_over_ranks; a rank with fewer probes a stand-in state and drops the result),
    the guidance phase runs as many rounds as the busiest rank (train.guidance_phase, as under DDP), and evaluation
    gives every rank the same number of batches (eval_aime.evaluate). A rank that skipped one forward would hang
    the job: tests/test_parallel.py runs one rank whose rollouts all stop at their first token beside one whose
    rollouts all run to the cap, in every mode, under a timeout.
  * The fused head-and-loss (fused_kernels.Head) reads the LM head's weight outside the module's own forward. Under
    FSDP2 that attribute is a shard (a DTensor) between forwards; the root module keeps its parameters unsharded
    from its forward until its backward (FSDP2 never reshards the root after forward), so sample.hidden_states_out
    reads the weight AFTER the forward, where it is the full tensor and its gradient reaches FSDP's
    reduce-scatter like any other. The teacher, which has no backward, keeps its embedding and LM head out of the
    sharding (replicated: 0.6 GB each for Qwen3-30B-A3B in bf16), so the Heads it hands over stay valid for the
    whole step.
  * Gradient accumulation: set_requires_gradient_sync(False) on every backward but the step's last (grad_sync),
    the same rule as DDP's no_sync(). Both average gradients over ranks, hence train.py's loss * world.
  * Checkpoints: the HF folder is gathered on rank 0 (full_state_dict, offloaded to CPU) so that transformers and
    vLLM load it as before; the optimizer state is saved sharded with torch.distributed.checkpoint (DCP), each
    rank writing its own shard, and DCP reshards it on load when the number of processes changed.

Mixed precision under FSDP on CUDA: bf16 parameters for compute, fp32 gradient reduction, fp32 master weights and
optimizer state (MixedPrecisionPolicy); on CPU everything is fp32.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

LAYOUTS = ("ddp", "fsdp")


# ----------------------------------------------------------------------------------------------------------------
# Process group and collectives (the same calls work with 1 process: they do nothing)
# ----------------------------------------------------------------------------------------------------------------

def dist_init(device_kind: str, timeout_minutes: float = 60.0):
    """(rank, world, local_rank). torchrun sets RANK/WORLD_SIZE; a plain `python train.py` is world 1.

    timeout_minutes: how long a collective may wait for the slowest rank before the job is aborted (train.py
    --dist-timeout). NCCL's default of 10 minutes kills a run whose ranks wait at a collective while one of them
    still decodes a long evaluation batch or saves a large checkpoint."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)  # before the group exists: NCCL binds each rank to its current device
    dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size(), local_rank


def comm_device() -> torch.device:
    """The device the process group's collectives take their tensors on.

    NCCL serves CUDA tensors only (torch.distributed.Backend.backend_capability["nccl"] == ["cuda"]): a CPU tensor
    handed to it fails at the collective. Gloo serves CPU tensors. Every collective of this repository goes through
    the helpers below, which move their tensor here and back (tests/test_parallel.py checks that no other file calls
    a collective itself): a caller never has to know the backend. No process group: the CPU."""
    if not dist.is_initialized():
        return torch.device("cpu")
    group = dist.distributed_c10d._get_default_group()
    types = {d.type for d in getattr(group, "_device_types", [])} or set(
        dist.Backend.backend_capability.get(str(dist.get_backend()).split(":")[-1], ["cpu"]))
    if "cpu" in types:
        return torch.device("cpu")
    kind = sorted(types)[0]  # a backend for accelerators only (NCCL: cuda)
    return torch.device(kind, getattr(torch, kind).current_device())


def _on_comm_device(x: torch.Tensor) -> torch.Tensor:
    device = comm_device()
    return x if x.device == device else x.to(device)


def all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    """x reduced over ranks (SUM by default), in place and returned, on x's own device; the collective itself runs on
    comm_device(). x itself when no process group exists."""
    if dist.is_initialized():
        y = _on_comm_device(x)
        dist.all_reduce(y, op=op or dist.ReduceOp.SUM)
        if y is not x:
            x.copy_(y)
    return x


def all_gather_numbers(values: list[float]) -> list[list[float]]:
    """Every rank's list of floats (the same length on every rank), in rank order, as float64."""
    local = torch.tensor(values, dtype=torch.float64, device=comm_device())
    if not dist.is_initialized():
        return [local.tolist()]
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [g.tolist() for g in gathered]


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order ([obj] without a process group). torch sends the pickled bytes on
    the group's device itself (NCCL: the current CUDA device, set in dist_init)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """x overwritten in place with rank src's x, on x's own device (the collective runs on comm_device())."""
    if dist.is_initialized():
        y = _on_comm_device(x)
        dist.broadcast(y, src=src)
        if y is not x:
            x.copy_(y)
    return x


def barrier() -> None:
    """Every rank waits until all have arrived (nothing without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, lockstep: bool) -> bool:
    """flag OR-ed over all ranks when the models are sharded (lockstep), else flag: "is any rank still busy?"."""
    if not (lockstep and dist.is_initialized()):
        return flag
    return bool(all_reduce(torch.tensor([int(flag)], device=comm_device()), dist.ReduceOp.MAX))


def max_over_ranks(n: int, lockstep: bool) -> int:
    """The largest n of any rank under lockstep (how many forwards everyone must run), else n."""
    if not (lockstep and dist.is_initialized()):
        return n
    return int(all_reduce(torch.tensor([n], device=comm_device()), dist.ReduceOp.MAX))


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model, enabled: bool = True):
    """FSDP: the model's parameters all-gathered ONCE for a phase of many forwards (the rollouts: one forward per
    generated token), kept whole through it, and resharded at its end, instead of one all-gather per layer per
    token (36 collectives per token for Qwen3-4B). The price is the whole model in its compute dtype for the phase
    (Qwen3-4B in bf16: 8 GB per rank); train.py --no-unshard-rollouts turns it off when memory is short. Every rank
    enters and leaves together (each unshard is a collective, in the same module order everywhere). A no-op for a
    model that is not sharded."""
    if not enabled or not is_sharded(model):
        yield
        return
    modules = [m for m in model.modules() if is_sharded(m)]  # the layers, then... the same order on every rank
    for module in modules:
        module.unshard()
    model.set_reshard_after_forward(False)  # every forward of the phase keeps them
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)  # FSDP2's defaults: layers reshard after their forward ...
        model.set_reshard_after_forward(False, recurse=False)  # ... the root does not (its backward follows)
        for module in modules:
            module.reshard()


def grad_sync(model, sync: bool):
    """Only the step's last backward should reduce gradients over ranks: DDP's no_sync() on the others, FSDP's
    set_requires_gradient_sync(False) (gradients then accumulate unsharded on each rank until the last one)."""
    if is_sharded(model):
        return _fsdp_sync(model, sync)
    return contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()


@contextlib.contextmanager
def _fsdp_sync(model, sync: bool):
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ----------------------------------------------------------------------------------------------------------------
# The two layouts
# ----------------------------------------------------------------------------------------------------------------

def decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer blocks of an HF causal LM (the unit of sharding: one all-gather per block)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None) or getattr(getattr(inner, "decoder", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers found at model.model.layers; --parallel fsdp "
                         "needs to know the blocks to shard")
    return list(layers)


def fsdp_policy(compute_dtype: torch.dtype):
    """FSDP2's mixed precision for the student: fp32 master weights stay in the shards, the all-gathered copies are
    in the run's compute dtype (train.py --dtype: bf16 by default on CUDA, fp32 when asked for, on any device), and
    gradients are reduced in fp32. With fp32 compute nothing is cast, so FSDP and DDP agree to rounding."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                reduce_dtype=torch.float32)


def shard_student(model, compute_dtype: torch.dtype = torch.float32):
    """FSDP2 in place: one shard group per decoder layer and the root (embeddings, final norm, LM head)."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    # the fused path makes the model return its final hidden states, a slice (a view) of the last layer's output;
    # nothing modifies them in place, which is what FSDP's warning about views is about
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    policy = fsdp_policy(compute_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def shard_teacher(model):
    """The teacher under FSDP: decoder layers sharded for inference (each all-gathered for its forward and freed
    after it); the embedding and the LM head stay whole on every rank (ignored_params) so that the hidden-state
    Heads it hands to the loss keep a valid weight for the whole step. Under DDP the teacher is simply replicated."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    whole = {model.get_input_embeddings().weight, model.get_output_embeddings().weight}
    fully_shard(model, ignored_params=whole)
    return model


def wrap_student(model, layout: str, device: torch.device):
    """The module the loss goes through: DDP(model), the student itself when from_pretrained(shard=...) already
    sharded it (FSDP: sampling, probing and saving use the same object), or the model itself (1 process)."""
    if not dist.is_initialized() or layout != "ddp":
        return model
    # No buffer sync in forward: LLMs have no buffers that need it (rotary tables are recomputed identically on every
    # rank), and a broadcast in every forward would be one more collective to keep in step. The flag was renamed in
    # torch 2.13 (forward_sync_buffers); older versions only know broadcast_buffers.
    import inspect

    ddp = torch.nn.parallel.DistributedDataParallel
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def from_pretrained(path: str, dtype: torch.dtype, device: torch.device, shard=None):
    """A causal LM from a checkpoint folder or hub id, on `device`; with `shard` (shard_student / shard_teacher) and a
    process group, sharded by it WITHOUT any rank ever holding the whole model on its device.

    Unsharded: from_pretrained, then .to(device) (DDP needs the whole model on every rank anyway).
    Sharded, for a model too big for one GPU (the paper's pair: a 64 GB fp32 student and a 61 GB bf16 teacher):
      1. every rank builds the model on the META device (shapes only, no memory) and shards it (`shard`);
      2. `to_empty` allocates each rank's shards on its device, 1/world of the model (plus whatever `shard` keeps
         whole: the teacher's embedding and LM head);
      3. rank 0 alone reads the checkpoint, into CPU memory, and set_model_state_dict(broadcast_from_rank0) sends
         each tensor to every rank, which keeps only its shard (one tensor in flight at a time);
      4. non-persistent buffers (rotary tables: not in checkpoints, left empty on the meta device) come from rank
         0's copy, broadcast.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if shard is None or not dist.is_initialized():
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    try:  # from_config knows only config.json: the checkpoint's generation_config holds more stop ids (Qwen)
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass
    shard(model)
    model.to_empty(device=device)
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=dtype) if dist.get_rank() == 0 else None  # CPU, rank 0
    set_model_state_dict(model, whole.state_dict() if whole is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    persistent = set(model.state_dict())
    source = dict(whole.named_buffers()) if whole is not None else {}
    for name, buffer in model.named_buffers():  # in the same order on every rank: the same architecture
        if name not in persistent:
            if whole is not None:
                buffer.copy_(source[name])
            broadcast_(buffer, src=0)
    del whole
    return model


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints under FSDP
# ----------------------------------------------------------------------------------------------------------------

def full_state_dict(model) -> dict | None:
    """The whole model's state dict, gathered to rank 0 on the CPU (a collective: every rank calls it; the others
    get None). Under DDP or with 1 process it is the module's own state dict."""
    if not is_sharded(model):
        return getattr(model, "module", model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    # gathered one by one, tied parameters (the LM head and the embedding) come back as two tensors: keep the first
    # name only, as the model's own state dict would, so save_pretrained writes the folder an unsharded run writes
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            state.pop(name, None)
        seen.add(id(param))
    return state


def save_optimizer(model, optimizer, folder) -> None:
    """The optimizer state: sharded with DCP (every rank writes its own shard into `folder`) under FSDP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(folder))


def load_optimizer(model, optimizer, folder) -> None:
    """Inverse of save_optimizer; DCP reshards when the checkpoint was written by another number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the structure to fill (state initialised)
    dcp.load(state, checkpoint_id=str(folder))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def plain_tensor(x: torch.Tensor) -> torch.Tensor:
    """A DTensor (e.g. the gradient norm of sharded parameters) as an ordinary tensor; others unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x
