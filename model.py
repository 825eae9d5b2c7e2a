"""Model, tokenizer, packed log-probs and checkpoints: what SFT (sft.py) and RL (grpo.py) share.

- `load_model`: a checkpoint folder, a Hugging Face path (offline), or the tiny Llama-style config
  with random weights and the in-memory BPE (chat.py) trained on the synthetic tasks' text.
- `packed_logprobs`: log π(a_t | τ_<t) for every position of a packed batch of sub-trajectories
  (split.pack), the one quantity both losses are made of: L_SFT = −Σ log π (sft.sft_step) and the
  PPO ratio r_t = π_θ / π_old (grpo.rl_update). The decoder runs once over the packed rows with the
  shared-prefix mask (kernels/masked_attention.py); the LM head and log-softmax are fused
  (kernels/fused_loss.py), so [B·T, V] logits never exist.
- checkpoints: DCP shards (model + optimizer, any world size), the tokenizer, trainer_state.pt
  and, optionally, a save_pretrained `model/` copy; `COMPLETE` is written last (docs/ARCHITECTURE.md,
  "Data on disk").

Functions take `cfg`, any object with klong.Config's fields (this module never imports klong).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

import chat
import dist
import split
from cli import USER_ERRNOS, UserError
from kernels.fused_loss import token_logprobs, weighted_logprob_sum
from kernels.masked_attention import HF_KEY, register_hf


def pick_device(cfg) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def tiny_tokenizer(cfg):
    """The offline BPE, trained on the shipped corpus plus the synthetic tasks' own text."""
    import synthetic
    return chat.build_tiny_tokenizer(synthetic.tokenizer_text(), vocab_size=cfg.vocab_size)


def load_model(cfg, path: str | None = None, for_training: bool = True):
    """(tokenizer, model): a checkpoint folder, a Hugging Face path, or the tiny config. A model
    for training gets the masked shared-prefix attention where configured; one for sampling keeps
    sdpa (the kernel is training-time attention over packed rows, no KV cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    dtype = getattr(torch, cfg.dtype)
    path = path or cfg.init or (None if cfg.model == "tiny" else cfg.model)
    if path:
        flag = "--init" if path == cfg.init else "--model" if path == cfg.model else "checkpoint"
        if not Path(path).exists() and cfg.model != path:
            raise UserError(f"{flag} {path}: no such folder (expected a model folder: a stage's "
                            "final/ or a checkpoint's model/)")
        if Path(path).is_file() or (Path(path).is_dir() and not (Path(path) / "config.json").exists()):
            raise UserError(f"{flag} {path}: not a model folder (no config.json; expected a "
                            "stage's final/ or a checkpoint's model/)")
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as e:       # offline hub miss, missing weights, bad config
            raise UserError(f"{flag} {path}: cannot load a model ({' '.join(str(e).split())[:200]})") from e
        if not chat.is_compact(tok):
            chat.check_message_additive(tok)
        elif getattr(tok, "response_template", None) is None:   # saved before chat.py had one
            tok.response_template = chat.RESPONSE_TEMPLATE
    else:
        torch.manual_seed(cfg.seed)
        tok = tiny_tokenizer(cfg)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
            intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.context_len * 2,
            tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
            eos_token_id=chat.stop_token_id(tok), bos_token_id=None)).to(dtype)
    model.config.use_cache = False
    device = pick_device(cfg)
    if cfg.attention not in ("kernel", "mask"):
        raise ValueError(f"--attention: expected kernel or mask, got {cfg.attention!r}")
    if for_training and cfg.attention == "kernel":
        model.set_attn_implementation(register_hf())
    return tok, model.to(device)


def packed_logprobs(model, packed: split.Packed, temperature: float = 1.0) -> torch.Tensor:
    """log π(targets) for every position of a packed batch, [B, T] (0 where target = −100).

    The decoder runs once; the LM head and the log-softmax are fused (kernels/fused_loss.py:
    Triton on CUDA, its chunked reference on CPU) so [B·T, V] logits never exist. It runs as the
    model's forward (dist.call), so under FSDP the LM head's weight is gathered for the fused loss.
    """
    return dist.call(model, _packed_logprobs, packed, temperature)


def packed_logprob_sum(model, packed: split.Packed) -> torch.Tensor:
    """Σ over supervised positions of log π(target), a scalar fp32: L_SFT = −this (sft_step).

    The fused weighted sum of kernels/fused_loss.py (w = 1 on every position, targets −100 skip):
    its gradients are formed chunk by chunk in the forward (the 6·N·H·V path), so neither the
    [B·T, V] logits nor the [B·T] per-token log-probs and their backward pass exist."""
    return dist.call(model, _packed_logprob_sum, packed)


def _packed_logprob_sum(model, packed: split.Packed) -> torch.Tensor:
    hidden, head, targets = _packed_hidden(model, packed)
    return weighted_logprob_sum(hidden, head.weight, targets,
                                torch.ones_like(targets, dtype=torch.float32), bias=head.bias)


def _packed_hidden(model, packed: split.Packed):
    """(hidden states (B·T, H), LM head, targets (B·T,)) of a packed batch, one decoder pass."""
    dev = next(model.parameters()).device
    if model.config._attn_implementation == HF_KEY:
        mask = {"doc_ids": packed.doc.to(dev), "seg_ids": packed.seg.to(dev)}
    else:                                      # the same mask, materialised: [B, 1, T, T]
        mask = {"attention_mask": packed.attention_mask(next(model.parameters()).dtype).to(dev)}
    hidden = model.get_decoder()(input_ids=packed.input_ids.to(dev),
                                 position_ids=packed.position_ids.to(dev),
                                 **mask).last_hidden_state                # (B, T, H)
    B, T, H = hidden.shape
    return hidden.reshape(B * T, H), model.get_output_embeddings(), packed.targets.to(dev).reshape(-1)


def _packed_logprobs(model, packed: split.Packed, temperature: float) -> torch.Tensor:
    hidden, head, targets = _packed_hidden(model, packed)
    logp = token_logprobs(hidden, head.weight, targets, bias=head.bias,
                          temperature=temperature)                      # (B·T,)
    return logp.reshape(packed.targets.shape)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


def save_checkpoint(out: Path, model, opt, tok, state: dict, keep: int = 2,
                    pretrained: torch.dtype | None = None) -> Path:
    """`out/checkpoint-STEP/`: `dcp/` (model + optimizer, sharded by torch.distributed.checkpoint:
    one file per rank, resumable with any number of processes), the tokenizer and
    trainer_state.pt (step, scheduler, RNG, ...); with `pretrained` (a dtype) also `model/`, a
    save_pretrained folder any transformers-compatible server loads. `COMPLETE` is written last,
    so a kill during saving never leaves a checkpoint that looks whole. Every rank calls it."""
    ck = out / f"checkpoint-{state['step']}"
    tmp = out / f".tmp-checkpoint-{state['step']}"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    try:
        dist.save_sharded(tmp / "dcp", model, opt)
        if pretrained is not None:
            dist.export_pretrained(tmp / "model", model, tok, pretrained)
        if dist.is_main():
            tok.save_pretrained(tmp)
            torch.save(state, tmp / "trainer_state.pt")
            (tmp / "COMPLETE").write_text("ok")
    except (Exception, CheckpointException) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = _write_failure(e, out)
        if why is None:
            raise
        raise UserError(f"{ck}: cannot write the checkpoint ({why}); nothing was lost: the run "
                        f"resumes from the last complete checkpoint in {out}") from e
    if dist.is_main():
        shutil.rmtree(ck, ignore_errors=True)
        tmp.rename(ck)
        for old in sorted(_checkpoints(out), key=_step_of)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return ck


def _write_failure(e: BaseException, out: Path) -> str | None:
    """Why a checkpoint could not be written, when the machine is at fault (full disk, no
    permission); None for anything else (a bug: re-raised). torch reports a full disk as a
    RuntimeError, DCP wraps every rank's error in a CheckpointException."""
    seen = [e]
    if isinstance(e, CheckpointException):
        seen += [exc for exc, _ in e.failures.values()]
    for x in seen:
        if isinstance(x, OSError) and x.errno in USER_ERRNOS:
            return os.strerror(x.errno).lower()
    if any(isinstance(x, RuntimeError) and "write" in str(x) for x in seen) \
            and shutil.disk_usage(out).free < 2 ** 20:
        return "no space left on device"
    return None


def checkpoint_dtype(cfg) -> torch.dtype | None:
    """The dtype of each checkpoint's save_pretrained copy, None when not wanted."""
    return getattr(torch, cfg.dtype) if cfg.checkpoint_pretrained else None


def load_checkpoint(ck: Path, model, opt) -> dict:
    """Restore the model and optimizer saved by `save_checkpoint` (model already built and
    sharded for this world size); returns trainer_state.pt. Every rank calls it."""
    dist.load_sharded(ck / "dcp", model, opt)
    return torch.load(ck / "trainer_state.pt", weights_only=False)


def _checkpoints(out: Path) -> list[Path]:
    return [p for p in out.glob("checkpoint-*") if (p / "COMPLETE").exists()] if out.exists() else []


def _step_of(p: Path) -> int:
    return int(p.name.split("-")[1])


def latest_checkpoint(out: Path) -> Path | None:
    cks = _checkpoints(out)
    return max(cks, key=_step_of) if cks else None


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they will be redone)."""
    if path.exists():
        keep = [ln for ln in path.read_text(errors="replace").splitlines()
                if _json_or_none(ln) is not None and _json_or_none(ln).get("step", 0) <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))   # a torn last line dropped


def _json_or_none(line: str):
    """A log line's object, None for a blank or torn one (a kill in the middle of a write)."""
    try:
        d = json.loads(line)
    except ValueError:
        return None
    return d if isinstance(d, dict) else None


def append_line(path, line: str) -> None:
    """Append one JSONL line with a single write on an O_APPEND descriptor: a kill leaves the
    file with the line whole, absent, or (a very long line, rarely) a torn tail that
    `drop_torn_tail` removes before the file is read again."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def drop_torn_tail(path) -> None:
    """Cut a last line that a kill left without its newline or unparsable (atomic rewrite)."""
    path = Path(path)
    if not path.exists():
        return
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    if lines and (not text.endswith("\n") or _json_or_none(lines[-1]) is None):
        atomic_write_text(path, "".join(ln + "\n" for ln in lines[:-1]))


def atomic_write_text(path, text: str) -> None:
    """Write a file so that a kill at any moment leaves either the old or the new content:
    a temporary file beside it, fsync, then rename over it (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
