"""Distributed plumbing: one process on a CPU, `torchrun` + FSDP2 on one or several GPU boxes.

docs/ARCHITECTURE.md "Backends": the model trains in one process on CPU, or under `torchrun
--nproc_per_node 8` with FSDP2 on a GPU box; several nodes are plain multi-node torchrun. This is
engineering, not paper: what we know of KLong does not say how it distributes training.
Every helper is the identity (or the plain single-process path) when the process was not
started by torchrun, so klong.py and grpo.py call them unconditionally and have no
`if distributed` branches.

Departures: checkpoints are sharded (`checkpoint-N/dcp/`), not the save_pretrained folders
docs/ARCHITECTURE.md describes; only each stage's `final/` is a save_pretrained folder. RL rollouts run
on rank 0 only (grpo.run_rl): the simple correct layout, documented in README "Scaling up".

What a rank does (W ranks, rank r):
- data: each optimizer step's micro-batches (SFT) or task groups (RL) are dealt round-robin,
  `items[r::W]`; ranks with one item fewer run a padding item with no loss, so every rank makes
  the same number of forward/backward calls (FSDP's collectives must line up);
- loss: divided by the *global* normaliser (supervised tokens of the step, all-reduced; or RL's
  1/(n·K) per task over all tasks), and FSDP reduces gradients by SUM (not its default mean), so
  Σ_r ∇L_r = ∇L of one process doing the whole step;
- FSDP2: `fully_shard` per decoder layer, then the root (embeddings, final norm, LM head);
  bf16 compute with fp32 master weights and fp32 gradient reduction when cfg.dtype = bfloat16;
- checkpoints: torch.distributed.checkpoint, one file per rank, reloadable by any world size
  (resharded on load); the final model is gathered on rank 0 and written as a save_pretrained
  folder that any transformers-compatible server loads.
"""
from __future__ import annotations

import os
import shutil
import types
import warnings
from pathlib import Path

import torch
import torch.distributed as tdist


# ----------------------------------------------------------------------------- process group

def init(device_type: str = "cpu") -> None:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK); nothing when those are absent. nccl on CUDA, with rank
    r on GPU LOCAL_RANK (so `torch.device("cuda")` means that GPU from here on); gloo on CPU."""
    if "WORLD_SIZE" not in os.environ or tdist.is_initialized():
        return
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    tdist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def close() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def world() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one that prints, logs, plots, runs rollouts and writes non-sharded files."""
    return rank() == 0


def print0(*args) -> None:
    """print on rank 0 only (progress lines)."""
    if is_main():
        print(*args, flush=True)


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def _comm_device() -> torch.device:
    """Where collective buffers live: the rank's GPU for nccl, the CPU for gloo."""
    if tdist.is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- data and sums

def share(items: list) -> list:
    """This rank's items, `items[r::W]`, padded with None to ⌈len/W⌉ so every rank gets the same
    count (a None is a padding item: run it with no loss). One process: `items` unchanged."""
    mine = list(items[rank()::world()])
    return mine + [None] * (-(-len(items) // world()) - len(mine))


def all_reduce_sum(x):
    """Σ over ranks of a number or a list of numbers (float64 on the wire)."""
    if not tdist.is_initialized():
        return x
    t = torch.tensor(x if isinstance(x, list) else [x], dtype=torch.float64, device=_comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    out = t.tolist()
    return out if isinstance(x, list) else out[0]


def broadcast(obj):
    """Rank 0's `obj` on every rank (pickled); one process: `obj`."""
    if not tdist.is_initialized():
        return obj
    box = [obj if is_main() else None]
    tdist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


# ----------------------------------------------------------------------------- FSDP2

def _call(self, fn, *args):
    # FSDP hooks its pre-backward onto the output; an in-place op on a view of it would drop the
    # hook, so hand back a fresh tensor ([B, T] log-probs: negligible).
    return fn(self, *args).clone()


def shard(model, cfg):
    """Activation checkpointing if cfg.activation_checkpointing; under torchrun also FSDP2.
    One process: the model as loaded (with cfg.dtype = bfloat16, plain bf16 weights).

    Activation checkpointing: transformers' per-decoder-layer checkpointing (non-reentrant), so a
    layer keeps only its input for the backward and recomputes the rest.

    FSDP2: `fully_shard` on every decoder layer (its parameters are all-gathered just before the
    layer runs and freed after), then on the root (embeddings, final norm, LM head). With
    cfg.dtype = bfloat16 the sharded parameters (the optimizer's master copy) are fp32, the
    all-gathered compute copies bf16 and gradients are reduced in fp32
    (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)).

    Gradient reduction: FSDP divides the summed gradients by the world size by default (a mean
    over ranks). Our losses are already divided by the global normaliser, so we set the divide
    factor to 1 (rather than scaling the loss by W) with plain SUM collectives (a factor ≠ W
    would otherwise use NCCL's PREMUL_SUM, which gloo lacks): the reduced gradient is Σ_r ∇L_r,
    exactly one process's gradient of the whole step.

    model.packed_logprobs runs the decoder and uses the LM head's weight directly (the fused loss
    never calls `lm_head.forward`), so the root's parameters would never be gathered. `call`
    runs such a function as the root's forward (FSDP's register_fsdp_forward_method).
    """
    if cfg.activation_checkpointing:
        model.activation_checkpointing_enable()             # non-reentrant torch checkpoint
    if not tdist.is_initialized():
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (FSDPModule, MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)
    mesh = init_device_mesh(next(model.parameters()).device.type, (world(),))
    if cfg.dtype == "bfloat16":
        model.float()                                        # fp32 master weights
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    for layer in model.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)                # Σ over ranks, not the mean
            m.set_force_sum_reduction_for_comms(True)
    model.fsdp_call = types.MethodType(_call, model)
    register_fsdp_forward_method(model, "fsdp_call")
    return model


def call(model, fn, *args):
    """fn(model, *args), run as the model's forward: under FSDP the root's parameters are
    gathered for it and its backward reduces their gradients. Plain model: just fn(model, *args)."""
    method = getattr(model, "fsdp_call", None)
    return method(fn, *args) if method is not None else fn(model, *args)


def clip_grad_norm_(parameters, max_norm: float) -> float:
    """Scale gradients so that ‖g‖₂ ≤ max_norm, ‖g‖₂ over *all* parameters; returns ‖g‖₂ before
    clipping. Under FSDP each gradient is a DTensor shard: the norm of the shards is a partial
    result that `full_tensor()` all-reduces to the global norm before the coefficient is taken."""
    from torch.distributed.tensor import DTensor
    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


# ----------------------------------------------------------------------------- checkpoints

def save_sharded(path: Path, model, opt) -> None:
    """Model + optimizer state into `path` with torch.distributed.checkpoint: every rank writes its
    own shards (`__R_0.distcp`), rank 0 the `.metadata`. Collective. One process: one file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    with warnings.catch_warnings():      # one process: DCP warns that it assumes one process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path),
                 no_dist=not tdist.is_initialized())


def load_sharded(path: Path, model, opt) -> None:
    """Load what `save_sharded` wrote into an already sharded (or plain) model and its optimizer;
    the world size may differ from the one that saved (DCP reshards on load). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=str(path), no_dist=not tdist.is_initialized())
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def full_state_dict(model) -> dict:
    """The whole model's weights as plain tensors on rank 0 ({} on other ranks): gathered from the
    shards to the CPU under FSDP (collective); in one process a detached copy on the model's
    device."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    if not tdist.is_initialized():
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def export_pretrained(path: Path, model, tok, dtype: torch.dtype) -> None:
    """A `save_pretrained` folder (safetensors + config + tokenizer) of the whole model in `dtype`,
    written by rank 0 from the gathered weights. Collective.

    The folder is exactly what a single-process run writes (write_pretrained)."""
    sd = full_state_dict(model)
    if is_main():
        shutil.rmtree(path, ignore_errors=True)
        write_pretrained(path, sd, model.config, tok, dtype)
    barrier()


def write_pretrained(path: Path, state_dict: dict, config, tok, dtype: torch.dtype) -> None:
    """`state_dict` as a `save_pretrained` folder in `dtype` (+ `config`, the tokenizer). The
    weights go into a plain copy of the architecture built on the meta device (no memory): class
    name, dtype, no FSDP traces."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict({k: v.detach().to("cpu", dtype) for k, v in state_dict.items()},
                          assign=True)
    plain.save_pretrained(path)
    tok.save_pretrained(path)
