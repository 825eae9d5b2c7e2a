"""KLong, the pipeline: `python klong.py --stage factory|sft|rl|eval`.

KLong (arXiv 2602.17547) trains agents for tasks whose trajectories do not fit a context window:
(1) comprehensive SFT, (2) Research-Factory (factory.py), (3) trajectory-splitting SFT (split.py
+ sft.py), (4) progressive RL (grpo.py); evaluation on PaperBench-format tasks.

This file is the top of the import graph (docs/ARCHITECTURE.md, "Module map"; nothing imports it):
the one typed config (`Config`, presets `tiny` and `8gpu`, every field a flag, --help from the
field docstrings), argument parsing and the stage dispatch. Model loading, packed log-probs and
checkpoints are in model.py, the SFT loop in sft.py, RL and evaluation in grpo.py. The tiny preset
runs every stage on a 2-core CPU in minutes, offline: a Llama-style model built from a config with
random weights and a BPE tokenizer trained in memory (chat.py).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

import dist
import split
from cli import Parser, UserError, field_docs, run
from model import pick_device


# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    """Every knob of every stage. Presets only change numbers (docs/ARCHITECTURE.md "Scale-down knobs")."""
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
    shipped_init: str = "checkpoints/tiny-sft"
    """RL and eval start from this checkpoint when neither `init` nor RUN_DIR/sft/final exists:
    the tiny trajectory-splitting SFT model shipped in the repository (how it was made:
    checkpoints/tiny-sft/README.md); a relative path is taken from the repository. "" = a fresh
    random model (which solves nothing: reward 0)."""
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
    context_len: int = 384
    """L_max: tokens per sub-trajectory, and the agent's live context window (tiny: synthetic
    expert trajectories are ~1,770 tokens, ~4.6 × L_max, as the miniature needs: docs/MINIATURE.md)."""
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
    task_items: tuple[int, ...] = (24, 32)
    """Synthetic tasks: M, items per phase, drawn from this range (min, max); a task needs 2M+2
    assistant turns (docs/MINIATURE.md)."""
    task_log_words: int = 0
    """Synthetic tasks: words of log output after each accepted step (observation length: 0 =
    `w 3 ok`, 5 tokens with its header; each word adds one token)."""
    eval_tasks: int = 16
    """Held-out synthetic tasks for evaluation (and RL's greedy before/after score)."""
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
    rl_wall_s: float = 0.0
    """RL wall-clock budget in seconds (0: off, each stage runs its rl_steps). On: the stages share
    it like their rl_steps (stage m may run until rl_wall_s·(n_1+…+n_m)/Σn of RL time), steps are
    planned one ahead from the measured step times, greedy evaluations are not counted (grpo.py,
    "Stages by wall clock"); compares schedules at equal wall time (bench/progressive.py)."""
    n_rollouts: int = 4
    """n: rollouts per task in a group."""
    tasks_per_step: int = 2
    """Tasks per RL step."""
    rl_lr: float = 1e-3
    """RL learning rate (AdamW)."""
    clip_eps: float = 0.2
    """ε of PPO-clip."""
    std_norm: bool = True
    """Divide the group advantage by its std (GRPO); off = the paper's Â = Q − mean. On in tiny (a
    departure, measured: without it the tiny model's greedy policy did not move in 6 steps, with it
    it did; README "The main job"), off in 8gpu (the paper)."""
    kl_beta: float = 0.04
    """β of the KL(π_θ‖π_ref) term (k3 estimator)."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (log-probs are taken at the same temperature)."""
    max_new_tokens: int = 24
    """Longest action a policy may sample (tiny: synthetic actions are <= 15 tokens)."""
    max_staleness: int = 1
    """Partial rollouts: drop rollouts sampled more than this many policy versions ago."""
    rollout_workers: int = 8
    """Episodes in flight at once (rollouts, evaluation); they decode together on the batched
    sampler, and partial rollouts start while the policy trains."""
    judge_workers: int = 2
    """Judge queue worker threads."""
    rollout_server: str = ""
    """RL rollouts from an inference server instead of the local sampler: `vllm:URL` or
    `sglang:URL` (`KIND:MODEL@URL` names the served model); after every update the weights are
    written to `rollout_weights` and the server reloads them (rollout_server.py; vLLM needs
    VLLM_SERVER_DEV_MODE=1). "" = the local batched sampler."""
    rollout_weights: str = ""
    """With `rollout_server`: the folder the new weights are written to after every update (for
    vLLM the folder the server was started on: `vllm serve DIR`). "" = RUN_DIR/rl/served."""
    rl_eval: bool = True
    """RL: the greedy held-out score (mean ± SE over the `eval_tasks` tasks) before the first step
    and after the last, printed and written to rl/summary.json (off in 8gpu: use --stage eval)."""
    report_to: str = "none"
    """Also write every scalar of log.jsonl to a tracker: none or tensorboard (RUN_DIR/<stage>/
    tensorboard; `tensorboard --logdir RUN_DIR`)."""
    eval_every: int = 0
    """Evaluate on the held-out tasks every N RL steps (0: never); their judge jobs go through the
    RL run's judge queue at EVAL priority, ahead of the training rollouts (resolution 8)."""

    # --- evaluation and back-ends
    tasks: str = ""
    """Evaluation tasks: a folder of PaperBench-format task folders (empty: held-out synthetic)."""
    seeds: int = 1
    """Evaluation: seeds (repeats) per task."""
    eval_timeout: int = 68
    """Evaluation budget per episode (same unit as rl_timeout_unit)."""
    min_end_fraction: float = 0.5
    """KLong's scaffold guard: end_task is refused before this share of an episode's budget is
    used (RL, evaluation, the factory's teacher). The paper bans early ends without a number."""
    policy_context_len: int = 0
    """Endpoint policies (openai:MODEL@URL, e.g. the factory's teacher): their window in tokens;
    every prompt is built by split's context builder to fit it (about 4 characters a token, tools
    and answer included). 0: unknown (the whole history; rebuilt smaller on a context-length 400)."""
    sandbox: str = "local"
    """Sandbox backend: local (namespaces or bubblewrap: milliseconds a command; tiny), docker
    (8gpu) or auto (docker if an engine answers and has the image, else local)."""
    sandbox_pool: int = -1
    """Sandboxes started ahead of the RL/eval episodes that will use them (sandbox_pool.py), so
    an episode rarely waits for its sandbox while the others decode: -1 = rollout_workers, 0 =
    each episode opens its own when it starts. Each idle one holds an init process or container."""
    allow_unisolated: bool = False
    """RL/eval: allow the plain sandbox tier, which cannot hide the host (the agent could read its rubric)."""
    judge: str = "check"
    """Leaf grader: check (executable checks), openai:MODEL@URL or hf:PATH."""
    judge_max_invalid: float = 0.10
    """A judgment whose invalid leaves hold more than this share of the rubric's weight is no
    judgment: the rollout is dropped and logged (resolution 6), never scored 0."""
    judge_deadline: float = 600.0
    """Seconds a judge job may take from its submission; the queue fails it after."""
    judge_retries: int = 4
    """Tries of each judge endpoint call, and of a judge job that found the endpoint down."""
    judge_code_dev: bool = False
    """PaperBench's Code-Dev variant: grade Code Development leaves only, never reproduce. Off:
    reproduce.sh runs in a fresh sandbox before judging when Code Execution / Result Analysis
    leaves are graded from evidence (judge.needs_reproduction)."""
    reproduce_timeout: float = 3600.0
    """Seconds reproduce.sh may run in the reproduction before judging."""

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
                 sandbox="docker", shipped_init="", std_norm=False, rl_eval=False),
}


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


def _flag_type(typ):
    """The argparse type of a Config field: argparse names it in a bad value's one-line error
    (`argument --lr: invalid float value: 'abc'`)."""
    def parse(text: str):
        return _parse_value(typ, text)
    parse.__name__ = str(typ).replace("tuple[int, ...]", "comma-separated int").replace(
        "tuple[float, ...]", "comma-separated float")
    return parse


def check_config(cfg: Config) -> None:
    """Values no stage can run with raise UserError naming the flag (one line, exit 2)."""
    def bad(name: str, expected: str):
        raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: expected {expected}")
    for f in fields(Config):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            bad(f.name, "a finite number")
        if isinstance(v, tuple) and any(not math.isfinite(x) or x <= 0 for x in v):
            bad(f.name, "comma-separated numbers > 0")
    for name in ("context_len", "pack_len", "sft_steps", "batch_rows", "grad_accum", "save_every",
                 "n_rollouts", "tasks_per_step", "max_new_tokens", "rollout_workers",
                 "judge_workers", "seeds", "hidden_size", "layers", "heads", "kv_heads",
                 "intermediate_size", "vocab_size", "n_tasks", "eval_tasks", "attempts",
                 "eval_timeout", "judge_retries"):
        if hasattr(cfg, name) and getattr(cfg, name) < 1:
            bad(name, "an integer >= 1")
    if cfg.sandbox_pool < -1:
        bad("sandbox_pool", "an integer >= -1 (-1: rollout_workers; 0: none)")
    if len(cfg.task_items) != 2 or cfg.task_items[0] > cfg.task_items[1] or \
            any(int(x) != x for x in cfg.task_items):
        bad("task_items", "two integers MIN,MAX with MIN <= MAX")
    for name in ("overlap", "warmup", "seed", "eval_every", "policy_context_len", "task_log_words"):
        if hasattr(cfg, name) and getattr(cfg, name) < 0:
            bad(name, "an integer >= 0")
    for name in ("history", "threshold", "judge_max_invalid", "min_end_fraction", "min_lr_ratio"):
        if hasattr(cfg, name) and not 0 <= getattr(cfg, name) <= 1:
            bad(name, "a number in [0, 1]")
    for name in ("lr", "rl_lr", "judge_deadline", "reproduce_timeout"):
        if hasattr(cfg, name) and getattr(cfg, name) <= 0:
            bad(name, "a number > 0")
    if cfg.rl_wall_s < 0:
        bad("rl_wall_s", "seconds >= 0 (0: off)")
    if cfg.report_to not in ("none", "tensorboard"):
        bad("report_to", "none or tensorboard")
    if cfg.rollout_server:
        import rollout_server
        try:
            rollout_server.parse_spec(cfg.rollout_server)
        except ValueError as e:
            bad("rollout_server", str(e).removeprefix("expected "))
    if cfg.overlap >= cfg.context_len:
        bad("overlap", f"fewer tokens than --context-len {cfg.context_len}")
    if cfg.heads and cfg.hidden_size % cfg.heads or cfg.kv_heads and cfg.heads % cfg.kv_heads:
        bad("heads", "a divisor of --hidden-size and a multiple of --kv-heads")


def check_run_dir(cfg: Config) -> None:
    """The run directory must be a folder we can write: checked before any work (one line, exit
    2), not discovered at the first checkpoint."""
    run = Path(cfg.run_dir)
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--run-dir {cfg.run_dir}: cannot write there ({e.strerror or e})") from None


def parse_args(argv=None) -> tuple[str, Config]:
    docs = field_docs(Config)
    ap = Parser(
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
                        type=_flag_type(f.type),
                        help=f"{docs.get(f.name, '')} (tiny: {f.default})")
    ap.add_argument("--debug", action="store_true",
                    help="show the traceback of a user error (bad input exits 2 with one line)")
    a = ap.parse_args(argv)
    preset = a.preset or "tiny"
    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r}: expected one of {sorted(PRESETS)}")
    values = {**PRESETS[preset], "preset": preset}
    values.update({f.name: getattr(a, f.name) for f in fields(Config)
                   if getattr(a, f.name) is not None})
    cfg = Config(**values)
    check_config(cfg)
    return a.stage, cfg


# ----------------------------------------------------------------------------- stages

def main(argv=None) -> int:
    """The command line: bad input (a file, a flag, a folder, a full disk) prints one line on
    stderr and returns 2 (cli.run; --debug shows the traceback); a bug keeps its traceback."""
    return run(_main, argv, user_errors=(split.RecordError, split.SplitError), prog="klong.py")


def _main(argv) -> int:
    stage, cfg = parse_args(argv)
    if stage == "rl" and (list(cfg.rl_timeouts) != sorted(cfg.rl_timeouts)
                          or len(cfg.rl_timeouts) != len(cfg.rl_steps)):
        raise UserError(f"--rl-timeouts {cfg.rl_timeouts} / --rl-steps {cfg.rl_steps}: expected "
                        "growing timeouts, as many as there are stage step counts")
    check_run_dir(cfg)
    dist.init(pick_device(cfg).type)             # under torchrun: join the process group
    if dist.world() > 1 and stage in ("factory", "eval"):
        raise SystemExit(f"--stage {stage} runs in one process (python klong.py --stage {stage}); "
                         "only sft and rl are distributed under torchrun")
    torch.manual_seed(cfg.seed)
    try:
        if stage == "factory":
            import factory
            factory.run_stage(cfg)
        elif stage == "sft":
            import sft
            sft.run_sft(cfg)
        elif stage == "rl":
            import grpo
            grpo.run_rl(cfg)
        elif stage == "eval":
            import grpo
            grpo.run_eval(cfg)
        dist.barrier()      # every rank done before any tears its connections down (a rank of
        # a 2-process CPU test once aborted at exit, "terminate called without an active
        # exception", when the other was still saving); not on errors: a barrier could hang there
    finally:
        dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
