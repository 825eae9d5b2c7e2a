"""KLong, the pipeline: `python klong.py --stage factory|sft|rl|eval`.

KLong (arXiv 2602.17547) trains agents for tasks whose trajectories do not fit a context window:
(1) comprehensive SFT, (2) Research-Factory (factory.py), (3) trajectory-splitting SFT (split.py
+ the loop here), (4) progressive RL (grpo.py); evaluation on PaperBench-format tasks.

This file owns the one typed config (`Config`, presets `tiny` and `8gpu`, every field a flag),
model + tokenizer loading, the SFT loop used for stages 1 and 3, and checkpoints. The tiny preset
runs every stage on a 2-core CPU in minutes, offline: a Llama-style model built from a config with
random weights and a BPE tokenizer trained in memory (chat.py).

Departures from the paper, each stated where it is coded:
- the paper's SFT loss is a sum over sub-trajectories; we normalise by the number of supervised
  tokens in the optimizer step (the usual token-mean; it only rescales the learning rate);
- sub-trajectories of one trajectory are packed with a single shared copy of p (split.pack);
  the loss and gradients equal those of the separate sequences (tests/test_sft.py).
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

import chat
import dist
import split
from kernels.masked_attention import HF_KEY, register_hf
from kernels.fused_loss import token_logprobs


# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    """Every knob of every stage. Presets only change numbers (ARCHITECTURE.md "Scale-down knobs")."""
    preset: str = "tiny"
    """Starting values: `tiny` (2-core CPU, minutes) or `8gpu` (one 8-GPU box, documented run)."""
    run_dir: str = "runs/tiny"
    """Where every stage reads and writes: factory/, sft/, rl/, eval/ below it."""
    seed: int = 0
    """Seed for data order, initial weights, sampling."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu or cuda."""

    # --- model
    model: str = "tiny"
    """`tiny` (a Llama-style config with random weights, built locally) or a Hugging Face model
    folder/path (loaded offline: nothing downloads at run time)."""
    init: str = ""
    """Start from this checkpoint folder (e.g. stage-1 SFT output) instead of `model`."""
    hidden_size: int = 128
    """tiny model: hidden width."""
    layers: int = 2
    """tiny model: decoder layers."""
    heads: int = 4
    """tiny model: query heads."""
    kv_heads: int = 2
    """tiny model: key/value heads (grouped-query attention)."""
    intermediate_size: int = 512
    """tiny model: MLP width."""
    vocab_size: int = 1024
    """tiny tokenizer: BPE vocabulary size."""
    dtype: str = "float32"
    """Training dtype of the weights: float32 or bfloat16. Under torchrun, bfloat16 means FSDP
    mixed precision: fp32 master weights, bf16 compute, fp32 gradient reduction (dist.shard)."""
    attention: str = "kernel"
    """Training attention over packed rows: kernel (kernels/masked_attention.py: Triton on CUDA,
    its per-segment SDPA reference elsewhere, 1.7× faster than the dense mask on the tiny CPU
    run) or mask (sdpa with the materialised additive [B, 1, T, T] mask)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of storing them (keeps
    one [T, H] input per layer: what makes 64K-token rows fit; costs ~one extra forward)."""

    # --- trajectory splitting (split.SplitConfig)
    context_len: int = 512
    """L_max: tokens per sub-trajectory, and the agent's live context window."""
    overlap: int = 48
    """Tokens of whole turns repeated from the previous sub-trajectory."""
    history: float = 0.25
    """Share of L_max − |p| for C_i: the overlap plus progressively truncated older turns."""
    supervise_overlap: bool = False
    """Train overlap actions again (the paper's literal loss) instead of exactly once."""
    split_mode: str = "klong"
    """klong (pinned prefix), none (baseline: head truncation), window (no pinned prefix)."""
    pack: bool = True
    """Pack the sub-trajectories of a trajectory with one shared copy of p."""
    pack_len: int = 1536
    """Tokens per packed row."""

    # --- SFT (stages 1 and 3)
    data: str = ""
    """SFT sources `PATH[:WEIGHT],...` (trajectory JSONL, chat JSON/JSONL/parquet, or a saved
    `datasets` folder). Empty: the factory's trajectories in run_dir (made if missing)."""
    sft_steps: int = 240
    """Optimizer steps."""
    batch_rows: int = 4
    """Packed rows per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-3
    """Peak AdamW learning rate."""
    warmup: int = 20
    """Linear warm-up steps, then cosine decay."""
    min_lr_ratio: float = 0.1
    """The cosine ends at lr × this."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    clip: float = 1.0
    """Gradient-norm clip."""
    save_every: int = 60
    """Checkpoint every N optimizer steps (and at the end)."""
    checkpoint_pretrained: bool = True
    """Each checkpoint also holds `model/`, a save_pretrained folder (off in 8gpu: 15 GB each;
    the stage's `final/` always is one)."""

    # --- Research-Factory (factory.FactoryConfig)
    n_tasks: int = 32
    """Synthetic training tasks to generate and distil."""
    eval_tasks: int = 12
    """Held-out synthetic tasks for evaluation."""
    attempts: int = 2
    """Teacher attempts per task (rejection sampling keeps the best)."""
    threshold: float = 0.9
    """Rejection sampling: keep a task's best attempt when its score ≥ this."""
    noise: float = 0.05
    """Scripted expert: rate of random wrong actions."""
    flaw: float = 0.65
    """Scripted expert: probability of its systematic, neutral extra turn (RL headroom)."""

    # --- progressive RL (grpo.py)
    rl_timeouts: tuple[int, ...] = (24, 48, 68)
    """T⁽¹⁾ < … < T⁽ᴹ⁾: rollout budget per stage (assistant turns in tiny, where a synthetic task
    needs 2M+2 = 50-66 turns and the evaluation budget is 68; seconds in 8gpu: 2 h, 4 h, 6 h)."""
    rl_steps: tuple[int, ...] = (2, 2, 2)
    """Optimizer steps per stage."""
    rl_timeout_unit: str = "turns"
    """What rl_timeouts count: turns (deterministic tiny runs) or seconds (wall clock)."""
    n_rollouts: int = 4
    """n: rollouts per task in a group."""
    tasks_per_step: int = 2
    """Tasks per RL step."""
    rl_lr: float = 3e-4
    """RL learning rate (AdamW)."""
    clip_eps: float = 0.2
    """ε of PPO-clip."""
    std_norm: bool = False
    """Divide the group advantage by its std (GRPO); off = the paper's Â = Q − mean."""
    kl_beta: float = 0.04
    """β of the KL(π_θ‖π_ref) term (k3 estimator)."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (log-probs are taken at the same temperature)."""
    max_new_tokens: int = 48
    """Longest action a policy may sample."""
    max_staleness: int = 1
    """Partial rollouts: drop rollouts sampled more than this many policy versions ago."""
    rollout_workers: int = 2
    """Rollouts in flight at once (partial rollouts start while the policy trains)."""
    judge_workers: int = 2
    """Judge queue worker threads."""

    # --- evaluation and back-ends
    tasks: str = ""
    """Evaluation tasks: a folder of PaperBench-format task folders (empty: held-out synthetic)."""
    seeds: int = 1
    """Evaluation: seeds (repeats) per task."""
    eval_timeout: int = 68
    """Evaluation budget per episode (same unit as rl_timeout_unit)."""
    sandbox: str = "auto"
    """Sandbox backend: auto (docker if an engine answers, else local), local or docker."""
    judge: str = "check"
    """Leaf grader: check (executable checks), openai:MODEL@URL or hf:PATH."""

    @property
    def split(self) -> split.SplitConfig:
        return split.SplitConfig(context_len=self.context_len, overlap=self.overlap,
                                 history=self.history, supervise_overlap=self.supervise_overlap,
                                 mode=self.split_mode, reserve=self.max_new_tokens + 1)


PRESETS: dict[str, dict] = {
    "tiny": {},
    # One 8-GPU box (H100/H200 80-141 GB): a 7B model at 64K context. FSDP2 across the 8 GPUs,
    # bf16 compute (fp32 master weights), activation checkpointing, fused loss + masked attention
    # kernels (memory budget: README "Scaling up"); numbers follow the paper where it gives them
    # (RL stages of 2 h / 4 h / 6 h) and common practice where it does not.
    "8gpu": dict(run_dir="runs/8gpu", model="Qwen/Qwen2.5-7B-Instruct", dtype="bfloat16",
                 activation_checkpointing=True,
                 context_len=65536, overlap=4096, history=0.3, pack_len=131072, sft_steps=2000,
                 batch_rows=1, grad_accum=8, lr=1e-5, warmup=100, save_every=200,
                 checkpoint_pretrained=False,
                 n_tasks=1000, eval_tasks=20, attempts=4, threshold=0.5,
                 rl_timeouts=(7200, 14400, 21600), rl_steps=(50, 50, 50), rl_timeout_unit="seconds",
                 n_rollouts=8, tasks_per_step=8, rl_lr=1e-6, max_new_tokens=8192,
                 rollout_workers=64, judge_workers=32, seeds=3, eval_timeout=43200,
                 sandbox="docker"),
}


def _field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (for --help)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and \
                isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _parse_value(typ, text: str):
    typ = str(typ)
    if typ.startswith("tuple"):
        inner = float if "float" in typ else int
        return tuple(inner(x) for x in text.split(",") if x.strip())
    if typ == "bool":
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    return {"int": int, "float": float}.get(typ, str)(text)


def parse_args(argv=None) -> tuple[str, Config]:
    docs = _field_docs(Config)
    ap = argparse.ArgumentParser(
        prog="klong.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="KLong: train agents on tasks longer than their context window "
                    "(factory → trajectory-splitting SFT → progressive RL → eval). Every field of "
                    "the config is a flag; a preset gives the starting values.")
    ap.add_argument("--stage", required=True, choices=["factory", "sft", "rl", "eval"],
                    help="factory: synthetic tasks + distilled trajectories; sft: (trajectory-"
                         "splitting) SFT; rl: progressive RL; eval: score a checkpoint on held-out "
                         "tasks")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        ap.add_argument(flag, dest=f.name, default=None, metavar=kind.upper().split("[")[0],
                        type=lambda s, t=f.type: _parse_value(t, s),
                        help=f"{docs.get(f.name, '')} (tiny: {f.default})")
    a = ap.parse_args(argv)
    preset = a.preset or "tiny"
    if preset not in PRESETS:
        ap.error(f"--preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    values = {**PRESETS[preset], "preset": preset}
    values.update({f.name: getattr(a, f.name) for f in fields(Config)
                   if getattr(a, f.name) is not None})
    return a.stage, Config(**values)


# ----------------------------------------------------------------------------- model

def pick_device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def tiny_tokenizer(cfg: Config):
    """The offline BPE, trained on the shipped corpus plus the synthetic tasks' own text."""
    import factory
    return chat.build_tiny_tokenizer(factory.tokenizer_text(), vocab_size=cfg.vocab_size)


def load_model(cfg: Config, path: str | None = None, for_training: bool = True):
    """(tokenizer, model): a checkpoint folder, a Hugging Face path, or the tiny config. A model
    for training gets the masked shared-prefix attention where configured; one for sampling keeps
    sdpa (the kernel is training-time attention over packed rows, no KV cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    dtype = getattr(torch, cfg.dtype)
    path = path or cfg.init or (None if cfg.model == "tiny" else cfg.model)
    if path:
        if not Path(path).exists() and cfg.model != path:
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        if not chat.is_compact(tok):
            chat.check_message_additive(tok)
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


def _packed_logprobs(model, packed: split.Packed, temperature: float) -> torch.Tensor:
    dev = next(model.parameters()).device
    if model.config._attn_implementation == HF_KEY:
        mask = {"doc_ids": packed.doc.to(dev), "seg_ids": packed.seg.to(dev)}
    else:                                      # the same mask, materialised: [B, 1, T, T]
        mask = {"attention_mask": packed.attention_mask(next(model.parameters()).dtype).to(dev)}
    hidden = model.get_decoder()(input_ids=packed.input_ids.to(dev),
                                 position_ids=packed.position_ids.to(dev),
                                 **mask).last_hidden_state                # (B, T, H)
    head = model.get_output_embeddings()
    B, T, H = hidden.shape
    logp = token_logprobs(hidden.reshape(B * T, H), head.weight, packed.targets.to(dev).reshape(-1),
                          bias=head.bias, temperature=temperature)      # (B·T,)
    return logp.reshape(B, T)


# ----------------------------------------------------------------------------- SFT data

def _chat_example(d: dict, where: str) -> split.Trajectory:
    """A comprehensive-SFT chat example ({"messages": [...]}) as a one-prefix-free trajectory."""
    if "prefix_len" in d:
        return split.trajectory_from_dict(d, where)
    return split.trajectory_from_dict(
        {"id": str(d.get("id", where)), "task_id": str(d.get("task_id", "chat")),
         "messages": d.get("messages"), "prefix_len": 0}, where)


def load_source(path: str) -> list[split.Trajectory]:
    """Trajectory JSONL, chat JSON/JSONL/parquet, or a saved `datasets` folder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--data: {path} does not exist")
    if p.suffix == ".jsonl" or (p.suffix == ".json" and p.read_text()[:1] != "["):
        out = []
        with open(p) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        d = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise split.RecordError(f"{p}:{n}: not valid JSON ({e.msg})") from None
                    out.append(_chat_example(d, f"{p}:{n}"))
        return out
    import datasets
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
    else:
        kind = {".json": "json", ".parquet": "parquet"}.get(p.suffix)
        if kind is None:
            raise ValueError(f"--data: {path}: expected .jsonl, .json, .parquet or a folder")
        ds = datasets.load_dataset(kind, data_files=str(p), split="train")
    return [_chat_example(dict(r), f"{p}:{i + 1}") for i, r in enumerate(ds)]


def mix_sources(spec: str, seed: int) -> list[split.Trajectory]:
    """`a.jsonl:0.7,b.parquet:0.3` → examples drawn in proportion to the weights; the mix has as
    many examples as the sources together (a small source is repeated, a large one subsampled)."""
    parts = []
    for item in spec.split(","):
        path, _, w = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "1")
        if not path or not _is_float(w):
            path, w = item.strip(), "1"
        parts.append((load_source(path), float(w)))
    total, wsum = sum(len(s) for s, _ in parts), sum(w for _, w in parts)
    quota = [total * w / wsum for _, w in parts]
    counts = [int(q) for q in quota]            # largest remainder: the counts sum to `total`
    for i in sorted(range(len(parts)), key=lambda i: counts[i] - quota[i])[:total - sum(counts)]:
        counts[i] += 1
    rng = random.Random(seed)
    mixed = []
    for (src, _), k in zip(parts, counts):
        order = [i for _ in range(k // max(len(src), 1) + 1) for i in rng.sample(range(len(src)), len(src))]
        mixed += [src[i] for i in order[:k]]
    rng.shuffle(mixed)
    return mixed


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def build_rows(trajs: list[split.Trajectory], tok, cfg: Config) -> list[list[split.TokenizedSub]]:
    """Split every trajectory (split.py), tokenise, and group sub-trajectories into rows."""
    count, encode = chat.count_tokens(tok), split.cached_encoder(tok)
    subs = []
    for t in trajs:
        subs += [split.tokenize(s, encode) for s in split.split_trajectory(t, count, cfg.split)]
    rows, row, used = [], [], 0
    for s in subs:   # greedy: a row's sub-trajectories are consecutive, so p is shared
        shared = cfg.pack and row and row[-1].traj_id == s.traj_id
        need = len(s.input_ids) - (s.prefix_tokens if shared else 0)
        if row and (not cfg.pack or used + need > cfg.pack_len):
            rows.append(row)
            row, used, need = [], 0, len(s.input_ids)
        row.append(s)
        used += need
    return rows + ([row] if row else [])


# ----------------------------------------------------------------------------- SFT loop

def sft_step(model, opt, batches: list[split.Packed], clip: float) -> tuple[float, float]:
    """One optimizer step over micro-batches (gradient accumulation); returns (loss, grad norm).

    L_SFT = − Σ_i Σ_t log P_θ(a_t | τ⁽ⁱ⁾_<t) over the supervised tokens of the step, divided by
    their number (the paper sums; the token mean only rescales the learning rate).

    Under torchrun `batches` is this rank's share of the step's micro-batches; the normaliser is
    the step's supervised-token count summed over ranks and FSDP sums the ranks' gradients
    (dist.shard), so the step is the one-process step. Loss and norm are global.
    """
    n_tok = max(dist.all_reduce_sum(sum(b.n_supervised for b in batches)), 1)
    loss_sum = 0.0
    for b in batches:
        loss = -packed_logprobs(model, b).sum() / n_tok                  # logp: (B, T)
        loss.backward()
        loss_sum += loss.item()
    gnorm = dist.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return dist.all_reduce_sum(loss_sum), gnorm


def lr_lambda(cfg: Config, total: int):
    """Linear warm-up to lr, then cosine to lr × min_lr_ratio."""
    def f(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, total - cfg.warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1)))
    return f


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
    dist.save_sharded(tmp / "dcp", model, opt)
    if pretrained is not None:
        dist.export_pretrained(tmp / "model", model, tok, pretrained)
    if dist.is_main():
        tok.save_pretrained(tmp)
        torch.save(state, tmp / "trainer_state.pt")
        (tmp / "COMPLETE").write_text("ok")
        shutil.rmtree(ck, ignore_errors=True)
        tmp.rename(ck)
        for old in sorted(_checkpoints(out), key=_step_of)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return ck


def checkpoint_dtype(cfg: Config) -> torch.dtype | None:
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
        keep = [ln for ln in path.read_text().splitlines() if ln.strip()
                and json.loads(ln).get("step", 0) <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def default_data(cfg: Config) -> str:
    """The factory's trajectories in run_dir; generated (offline, ~1 min, by rank 0) if missing."""
    path = Path(cfg.run_dir) / "factory" / "trajectories.jsonl"
    if dist.is_main() and not path.exists():
        print(f"[sft] no --data and no {path}: running the factory first", flush=True)
        run_factory(cfg)
    dist.barrier()
    return str(path)


def _no_loss(b: split.Packed) -> split.Packed:
    """A padding micro-batch (dist.share): the same tokens with no targets, so zero loss and zero
    gradient; it keeps a rank with one micro-batch fewer in step with FSDP's collectives."""
    return replace(b, targets=torch.full_like(b.targets, split.IGNORE))


def run_sft(cfg: Config) -> Path:
    """Stage 1 (comprehensive SFT, with --data sources) and stage 3 (trajectory-splitting SFT):
    AdamW, warm-up + cosine, accumulation, clipping, loss on labels only. Resumes from the last
    complete checkpoint in run_dir/sft. Returns the final save_pretrained folder.

    Under torchrun (dist.py) every rank runs this function: each takes its share of a step's
    micro-batches, rank 0 alone prints, logs and shows the progress bar."""
    from tqdm import tqdm
    out = Path(cfg.run_dir) / "sft"
    out.mkdir(parents=True, exist_ok=True)
    resume = latest_checkpoint(out)
    tok, model = load_model(cfg)
    model = dist.shard(model, cfg)
    trajs = mix_sources(cfg.data or default_data(cfg), cfg.seed)
    rows = build_rows(trajs, tok, cfg)
    n_sup = sum(sum(1 for y in s.labels if y != split.IGNORE) for r in rows for s in r)
    dist.print0(f"[sft] {len(trajs)} trajectories → {sum(len(r) for r in rows)} sub-trajectories "
                f"in {len(rows)} rows, {n_sup} supervised tokens; mode={cfg.split_mode} "
                f"L_max={cfg.context_len} pack={cfg.pack}; {dist.world()} process(es)")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, cfg.sft_steps))
    step = 0
    if resume:
        st = load_checkpoint(resume, model, opt)
        sched.load_state_dict(st["scheduler"])
        set_rng_state(st["rng"])
        step = st["step"]
        dist.print0(f"[sft] resumed from {resume} at step {step}")
        if dist.is_main():
            _truncate_log(out / "log.jsonl", step)
    else:
        torch.manual_seed(cfg.seed)
    model.train()
    micro = cfg.batch_rows
    per_epoch = max(1, len(rows) // micro)

    def batch(i: int) -> split.Packed:      # deterministic order: epoch e shuffled with seed + e
        epoch, k = divmod(i, per_epoch)
        order = random.Random(cfg.seed + epoch).sample(range(len(rows)), len(rows))
        subs = [s for r in order[k * micro:(k + 1) * micro] for s in rows[r]]
        return split.pack(subs, cfg.pack_len if cfg.pack else max(len(s.input_ids) for s in subs),
                          pad_id=tok.pad_token_id, share_prefix=cfg.pack)

    log = open(out / "log.jsonl", "a") if dist.is_main() else None
    bar = tqdm(total=cfg.sft_steps, initial=step, desc="sft", unit="step", dynamic_ncols=True,
               disable=not dist.is_main())
    while step < cfg.sft_steps:
        t0 = time.perf_counter()
        first = step * cfg.grad_accum                    # micro-batches first … first+grad_accum−1
        ids = dist.share(list(range(first, first + cfg.grad_accum)))   # this rank's; None = pad
        batches = [batch(i) if i is not None else _no_loss(batch(first)) for i in ids]
        loss_sum, gnorm = sft_step(model, opt, batches, cfg.clip)
        sched.step()
        step += 1
        dt = time.perf_counter() - t0
        n_tok, tokens = map(int, dist.all_reduce_sum(
            [sum(b.n_supervised for b in batches),
             sum(int(b.input_ids.numel()) for i, b in zip(ids, batches) if i is not None)]))
        rec = {"step": step, "loss": round(loss_sum, 5), "lr": sched.get_last_lr()[0],
               "grad_norm": round(float(gnorm), 4), "tokens": tokens, "supervised_tokens": n_tok,
               "tokens_per_s": round(tokens / dt, 1)}
        if log:
            log.write(json.dumps(rec) + "\n")
            log.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens / dt:.0f}")
        if step % cfg.save_every == 0 or step == cfg.sft_steps:
            save_checkpoint(out, model, opt, tok, {"step": step, "scheduler": sched.state_dict(),
                                                   "rng": rng_state(), "config": asdict(cfg)},
                            pretrained=checkpoint_dtype(cfg))
    bar.close()
    final = out / "final"
    dist.export_pretrained(final, model, tok, getattr(torch, cfg.dtype))
    dist.print0(f"[sft] done: {final}")
    return final


# ----------------------------------------------------------------------------- stages

def run_factory(cfg: Config):
    import factory
    fc = factory.FactoryConfig(out_dir=Path(cfg.run_dir) / "factory", n_tasks=cfg.n_tasks,
                               seed=cfg.seed, attempts=cfg.attempts, threshold=cfg.threshold,
                               noise=cfg.noise, flaw=cfg.flaw)
    summary = factory.run_factory(fc, backend=cfg.sandbox)
    print(f"[factory] {summary}", flush=True)
    return summary


def main(argv=None) -> int:
    stage, cfg = parse_args(argv)
    dist.init(pick_device(cfg).type)             # under torchrun: join the process group
    if dist.world() > 1 and stage in ("factory", "eval"):
        raise SystemExit(f"--stage {stage} runs in one process (python klong.py --stage {stage}); "
                         "only sft and rl are distributed under torchrun")
    torch.manual_seed(cfg.seed)
    try:
        if stage == "factory":
            run_factory(cfg)
        elif stage == "sft":
            run_sft(cfg)
        elif stage == "rl":
            import grpo
            grpo.run_rl(cfg)
        elif stage == "eval":
            import grpo
            grpo.run_eval(cfg)
    finally:
        dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
