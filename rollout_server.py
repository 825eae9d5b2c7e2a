"""RL rollouts sampled by an inference server (vLLM or SGLang) instead of the trainer's own
sampler copy (issue 19.3; KLong §3.4 trains on its rollouts, the paper does not say where they are
generated).

`RolloutServer` has grpo.SharedPolicy's interface (`version`, `publish`, `policy`): run_rl takes
it when `--rollout-server KIND:URL` is given. Episodes act through agent.OpenAIPolicy with
`tokens=KIND`, so every assistant turn comes back as a split.Sample (the server's prompt ids, the
ids it sampled and their log-probs: PPO's π_old exactly, agent.OpenAIPolicy says which fields).
After each update the trainer `publish`es: the new weights are written as a save_pretrained folder
(`--rollout-weights`) and the server is asked to reload them:

- SGLang: `POST /update_weights_from_disk {"model_path": DIR}` (its native API; answers
  `{"success": bool, "message": str}`; the radix cache is flushed by default).
- vLLM: `POST /collective_rpc {"method": "reload_weights"}` then `POST /reset_prefix_cache`, both
  routes of the server's development mode (`VLLM_SERVER_DEV_MODE=1 vllm serve DIR`).
  `reload_weights` re-reads the weights from the folder the server was started on, so DIR must be
  that folder; the prefix cache holds keys and values of the old weights and is reset. (vLLM has
  no stable public reload route: LoRA adapters have `/v1/load_lora_adapter`, full weights an NCCL
  broadcast as in TRL's `trl vllm-serve`; the dev-mode RPC is the route that needs nothing but the
  stock server.)

Versions (docs/ARCHITECTURE.md resolution 7): a Sample's policy_version is the version the server
held while it sampled. A reload waits until the requests in flight are answered and holds new
ones back until the server answers the reload, so no reply mixes two versions.

Departures: the server's prompt is its own tokenisation of the messages (agent.OpenAIPolicy), not
the ids sampled earlier; weights cross by disk, not NCCL (seconds for the tiny model; for a 7B
model a bf16 folder of 15 GB each step).
"""
from __future__ import annotations

import os
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import agent
import dist
import endpoint

KINDS = ("vllm", "sglang")


@dataclass(frozen=True)
class ServerSpec:
    """`--rollout-server KIND:URL` or `KIND:MODEL@URL` (MODEL: the served model name; default
    the weights folder, the name `vllm serve DIR` and SGLang give it)."""
    kind: str
    url: str
    model: str | None = None


def parse_spec(text: str) -> ServerSpec:
    """ServerSpec of `vllm:URL`, `vllm:MODEL@URL`, `sglang:URL`, `sglang:MODEL@URL`; ValueError
    (one line, what was expected) otherwise."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in KINDS or not rest:
        raise ValueError(f"expected vllm:URL or sglang:URL (optionally KIND:MODEL@URL), got {text!r}")
    model, at, url = rest.rpartition("@") if "@" in rest and not rest.startswith("http") \
        else ("", "", rest)
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"expected an http(s) URL after {kind}:, got {url!r}")
    return ServerSpec(kind, url.rstrip("/"), model or None)


def server_root(url: str) -> str:
    """The server's root from its OpenAI base URL (reload routes are not under /v1)."""
    return endpoint.base_url(url).removesuffix("/v1")


def write_weights(folder: Path, state_dict: dict, config, tokenizer, dtype) -> None:
    """`folder` as a save_pretrained model (safetensors, config, tokenizer) of `state_dict` in
    `dtype`. Written beside it first and then moved in file by file (os.replace), so a server
    that reloads never reads a half-written file."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.writing")
    shutil.rmtree(tmp, ignore_errors=True)
    dist.write_pretrained(tmp, state_dict, config, tokenizer, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    for f in sorted(tmp.iterdir()):
        os.replace(f, folder / f.name)
    shutil.rmtree(tmp, ignore_errors=True)


class RolloutServer:
    """The sampling side of RL on a server: grpo.SharedPolicy's interface (version, publish,
    policy). `reloads` counts the reloads the server confirmed."""

    def __init__(self, spec: ServerSpec, tokenizer, model_config, weights: Path, cfg,
                 timeout_s: float = 600.0):
        import httpx
        self.spec, self.tokenizer, self.config, self.cfg = spec, tokenizer, model_config, cfg
        self.weights = Path(weights).resolve()
        self.model = spec.model or str(self.weights)
        self.root = server_root(spec.url)
        self.http = httpx.Client(timeout=timeout_s)
        self._version, self.reloads = 0, 0
        self._cond = threading.Condition()
        self._in_flight, self._reloading = 0, False

    @classmethod
    def from_config(cls, cfg, model_config, tokenizer) -> RolloutServer:
        weights = Path(cfg.rollout_weights or Path(cfg.run_dir) / "rl" / "served")
        return cls(parse_spec(cfg.rollout_server), tokenizer, model_config, weights, cfg)

    @property
    def version(self) -> int:
        return self._version

    @contextmanager
    def sampling(self):
        """One request of an episode: waits while a reload runs; yields the served version."""
        with self._cond:
            self._cond.wait_for(lambda: not self._reloading)
            self._in_flight += 1
            version = self._version
        try:
            yield version
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def publish(self, state_dict: dict, version: int) -> None:
        """Write the weights, wait for the requests in flight, ask the server to reload them;
        new requests wait until it answers. A refused reload raises RuntimeError (the run
        stops: sampling on from old weights would mislabel every later Sample's version)."""
        import torch
        write_weights(self.weights, state_dict, self.config, self.tokenizer,
                      getattr(torch, self.cfg.dtype))
        with self._cond:
            self._cond.wait_for(lambda: not self._reloading)
            self._reloading = True
            self._cond.wait_for(lambda: self._in_flight == 0)
        try:
            self._reload()
            self._version = version
            self.reloads += 1
        finally:
            with self._cond:
                self._reloading = False
                self._cond.notify_all()

    def _post(self, route: str, body: dict) -> dict:
        r = self.http.post(self.root + route, json=body)
        if r.status_code >= 400:
            raise RuntimeError(f"{self.spec.kind} server {self.root}{route}: HTTP {r.status_code}: "
                               f"{' '.join(r.text.split())[:300]}"
                               + (" (start vLLM with VLLM_SERVER_DEV_MODE=1 for this route)"
                                  if self.spec.kind == "vllm" and r.status_code == 404 else ""))
        try:
            return r.json() if r.content else {}
        except ValueError:
            return {}

    def _reload(self) -> None:
        if self.spec.kind == "sglang":
            out = self._post("/update_weights_from_disk", {"model_path": str(self.weights)})
            if not out.get("success", False):
                raise RuntimeError(f"sglang server {self.root}: weights in {self.weights} not "
                                   f"loaded: {out.get('message', out)}")
        else:
            self._post("/collective_rpc", {"method": "reload_weights"})
            self._post("/reset_prefix_cache", {})

    def policy(self, greedy: bool = False, seed: int | None = None) -> "_ServerPolicy":
        """An episode's policy on the server (greedy: temperature 0; `seed` is sent with every
        request, so a seeded episode is reproducible where the server's sampling is)."""
        return _ServerPolicy(self, agent.OpenAIPolicy(
            self.spec.url, self.model, temperature=0.0 if greedy else self.cfg.temperature,
            max_tokens=self.cfg.max_new_tokens, tokens=self.spec.kind, tokenizer=self.tokenizer,
            seed=seed))

    def close(self) -> None:
        self.http.close()


class _ServerPolicy:
    """An OpenAIPolicy whose every request is one `sampling()` of its RolloutServer."""

    def __init__(self, server: RolloutServer, inner: agent.OpenAIPolicy):
        self.server, self.inner = server, inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def act(self, messages, tools):
        with self.server.sampling() as version:
            self.inner.version = version
            return self.inner.act(messages, tools)
