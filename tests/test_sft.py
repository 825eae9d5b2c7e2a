"""The chat format, tokenisation, shared-prefix packing and the SFT stage (klong.py)."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import chat
import cli
import klong
from model import packed_logprob_sum, packed_logprobs
import sft
import split
from tests.strategies import make_trajectory

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return chat.build_tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tok):
    cfg = klong.Config(hidden_size=32, intermediate_size=64, layers=2, heads=4, kv_heads=2,
                       context_len=512)
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=1024,
        tie_word_embeddings=False))


# ----------------------------------------------------------------------------- chat format

def test_jinja_template_and_message_encoding_agree(tok):
    msgs = make_trajectory(0, 6, 10, 0.0, 0)["messages"]
    joint = tok.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                    return_assistant_tokens_mask=True)
    ids, mask = chat.encode_messages(tok, msgs)
    assert list(joint["input_ids"]) == ids
    assert list(joint["assistant_masks"]) == mask


def test_literal_special_token_text_stays_text(tok):
    m = {"role": "tool", "content": "output says <|end|><|assistant|> ok"}
    ids, _ = chat.encode_message(tok, m)
    end = tok.convert_tokens_to_ids("<|end|>")
    assert ids.count(end) == 1 and ids[-1] == end


@given(st.text(alphabet="abc xyz=-_/.0123456789", max_size=30),
       st.dictionaries(st.sampled_from(["cmd", "file", "query", "code"]),
                       st.text(alphabet="abc xyz=-_/.0123\n", max_size=20), max_size=3))
def test_tool_calls_render_and_parse_back(content, args):
    tok = chat.build_tiny_tokenizer()
    msg = {"role": "assistant", "content": content,
           "tool_calls": [{"id": "call_0", "type": "function",
                           "function": {"name": "bash", "arguments": args}}]}
    ids, mask = chat.encode_message(tok, msg)
    assert mask[0] == 0 and all(mask[1:])
    back = chat.decode_assistant(tok, ids[1:])
    assert back["content"] == content
    assert back["tool_calls"][0]["function"] == {"name": "bash", "arguments": args}


def test_malformed_tool_call_is_a_parse_error():
    with pytest.raises(chat.ToolCallParseError):
        chat.parse_assistant("hi<|call|>bash<|arg|>cmd ls<|end|>")


# ----------------------------------------------------------------------------- tokenisation

def test_labels_select_exactly_the_supervised_assistant_tokens(tok):
    traj = split.trajectory_from_dict(make_trajectory(1, 60, 30, 0.05, 300))
    cfg = split.SplitConfig(context_len=384, overlap=40)
    cache = chat.MessageCache(tok)
    encode = cache.encode
    for sub in split.split_trajectory(traj, cache.count, cfg):
        t = split.tokenize(sub, encode)
        assert len(t.input_ids) <= cfg.context_len
        expect = []
        for msg, sup in zip(sub.messages, sub.supervised):
            ids, mask = chat.encode_message(tok, msg)
            expect += [i if sup and m else split.IGNORE for i, m in zip(ids, mask)]
        assert t.labels == expect
        n_sup_msgs = sum(1 for m, s in zip(sub.messages, sub.supervised)
                         if s and m["role"] == "assistant")
        end = tok.convert_tokens_to_ids("<|end|>")
        assert sum(1 for y in t.labels if y == end) == n_sup_msgs


def _separate_loss(model, subs):
    """Σ over sub-trajectories of Σ_t −log p(target_t), each run as its own sequence."""
    total = 0.0
    for s in subs:
        ids = torch.tensor([s.input_ids])
        logits = model(input_ids=ids).logits[0, :-1]
        tgt = torch.tensor(s.labels[1:])
        keep = tgt != split.IGNORE
        total = total + torch.nn.functional.cross_entropy(logits[keep], tgt[keep], reduction="sum")
    return total


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("row_len", [4096, 700])
def test_packed_loss_and_gradients_equal_the_separate_subtrajectories(tok, tiny_model, row_len,
                                                                      fused):
    """docs/ARCHITECTURE.md: packing [p | C₁W₁ | C₂W₂ | …] must not change the loss or gradients,
    neither per-token log-probs summed nor SFT's fused weighted sum (model.packed_logprob_sum).
    fp32; tolerance 1e-4 relative on the loss and 1e-4 absolute on gradients."""
    trajs = [split.trajectory_from_dict(make_trajectory(s, 40, 40, 0.0, 0, tid=f"t{s}"))
             for s in (2, 3)]
    cfg = split.SplitConfig(context_len=384, overlap=40)   # p is 199 tokens
    cache = chat.MessageCache(tok)
    encode, count = cache.encode, cache.count
    subs = [split.tokenize(x, encode) for t in trajs for x in split.split_trajectory(t, count, cfg)]
    assert len(subs) >= 4
    tiny_model.zero_grad()
    ref = _separate_loss(tiny_model, subs)
    ref.backward()
    ref_grads = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    packed = split.pack(subs, row_len, pad_id=tok.pad_token_id)
    assert packed.input_ids.numel() < sum(len(s.input_ids) for s in subs) or row_len < 1000
    loss = -(packed_logprob_sum(tiny_model, packed) if fused else
             packed_logprobs(tiny_model, packed).sum())
    loss.backward()
    assert torch.allclose(loss, ref, rtol=1e-4), (loss.item(), ref.item())
    for p, g in zip(tiny_model.parameters(), ref_grads):
        assert torch.allclose(p.grad, g, atol=1e-4, rtol=1e-3)


def test_shared_prefix_packing_stores_p_once_per_row(tok):
    traj = split.trajectory_from_dict(make_trajectory(5, 80, 60, 0.0, 0))
    cfg = split.SplitConfig(context_len=480, overlap=40)
    subs = [split.tokenize(x, chat.MessageCache(tok).encode)
            for x in split.split_trajectory(traj, chat.count_tokens(tok), cfg)]
    packed = split.pack(subs, 100_000)
    P = subs[0].prefix_tokens
    assert packed.input_ids.shape == (1, P + sum(len(s.input_ids) - P for s in subs))
    assert int((packed.seg == 0).sum()) == P
    # every segment's positions continue from |p|
    for k in range(1, len(subs) + 1):
        pos = packed.position_ids[packed.seg == k]
        assert pos[0] == P and torch.equal(pos, torch.arange(P, P + len(pos)))
    allowed = packed.allowed()[0]
    s1, s2 = (packed.seg[0] == 1).nonzero()[0], (packed.seg[0] == 2).nonzero()[0]
    assert not allowed[s2, s1] and allowed[s2, 0] and allowed[s1, 0]


# ----------------------------------------------------------------------------- config and CLI

def test_help_explains_every_config_field():
    out = subprocess.run([sys.executable, "klong.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120).stdout
    docs = cli.field_docs(klong.Config)
    for f in [x.name for x in dataclasses.fields(klong.Config)]:
        assert "--" + f.replace("_", "-") in out
        assert docs.get(f), f"field {f} has no docstring"


def test_presets_and_overrides():
    stage, cfg = klong.parse_args(["--stage", "sft", "--context-len", "256", "--rl-timeouts",
                                   "10,20", "--pack", "false"])
    assert (stage, cfg.context_len, cfg.rl_timeouts, cfg.pack) == ("sft", 256, (10, 20), False)
    _, big = klong.parse_args(["--stage", "rl", "--preset", "8gpu"])
    assert big.context_len == 65536 and big.dtype == "bfloat16" and big.preset == "8gpu"
    with pytest.raises(cli.UserError, match="huge"):        # one line, exit 2 (klong.main)
        klong.parse_args(["--stage", "rl", "--preset", "huge"])


# ----------------------------------------------------------------------------- comprehensive SFT

def test_sources_mix_by_weight_and_short_examples_pass_unchanged(tmp_path, tok):
    import datasets
    chats = [{"messages": [{"role": "user", "content": f"q{i}"},
                           {"role": "assistant", "content": f"a{i}"}]} for i in range(20)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    datasets.Dataset.from_list(chats[:10]).to_parquet(str(tmp_path / "b.parquet"))
    datasets.Dataset.from_list(chats[:5]).save_to_disk(str(tmp_path / "c"))
    mixed = sft.mix_sources(f"{tmp_path}/a.jsonl:2,{tmp_path}/b.parquet:1,{tmp_path}/c:1", 0)
    assert len(mixed) == 35
    from_a = sum(1 for t in mixed if "a.jsonl" in t.id)
    assert from_a in (17, 18)  # 35 × 2/4 = 17.5
    subs = split.split_trajectory(mixed[0], chat.count_tokens(tok), split.SplitConfig())
    assert len(subs) == 1 and subs[0].messages == mixed[0].messages
    assert subs[0].supervised == [False, True]


def test_bad_source_names_the_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "x"}]}\n'
                                        '{"messages": [{"role": "wizard"}]}\n')
    with pytest.raises(split.RecordError, match=r"bad.jsonl:2.*role"):
        sft.mix_sources(str(tmp_path / "bad.jsonl"), 0)


# ----------------------------------------------------------------------------- the SFT stage

def _sft_cmd(run_dir, data, steps):
    return [sys.executable, "klong.py", "--stage", "sft", "--run-dir", str(run_dir),
            "--data", str(data), "--sft-steps", str(steps), "--save-every", "4",
            "--hidden-size", "32", "--intermediate-size", "64", "--context-len", "256",
            "--overlap", "32", "--pack-len", "768", "--batch-rows", "2", "--warmup", "3",
            "--max-new-tokens", "32"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def test_sft_killed_and_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    data = tmp_path / "trajs.jsonl"
    data.write_text("".join(json.dumps(make_trajectory(s, 30, 15, 0.0, 0, tid=f"t{s}")) + "\n"
                            for s in range(6)))
    steps = 40
    full = subprocess.run(_sft_cmd(tmp_path / "a", data, steps), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    log = [json.loads(x) for x in (tmp_path / "a/sft/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    assert log[-1]["loss"] < log[0]["loss"]
    # kill a second run (SIGKILL) once it has written a checkpoint, then re-run the same command
    proc = subprocess.Popen(_sft_cmd(tmp_path / "b", data, steps), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((tmp_path / "b/sft").glob("checkpoint-*/COMPLETE")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b/sft/final").exists(), "the run finished before it could be killed"
    again = subprocess.run(_sft_cmd(tmp_path / "b", data, steps), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout
    from transformers import AutoModelForCausalLM
    ck = max((tmp_path / "b/sft").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert AutoModelForCausalLM.from_pretrained(ck / "model").num_parameters() > 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a/sft/final")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b/sft/final")
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), f"{n} differs after resume"


def test_kernel_attention_path_gives_the_same_logprobs_as_the_mask_path(tok, tiny_model):
    """model.packed_logprobs through kernels/masked_attention (its reference on CPU) equals the
    sdpa + additive 4D mask path on a packed shared-prefix batch."""
    from kernels.masked_attention import register_hf
    traj = split.trajectory_from_dict(make_trajectory(6, 30, 30, 0.0, 0))
    subs = [split.tokenize(x, chat.MessageCache(tok).encode) for x in split.split_trajectory(
        traj, chat.count_tokens(tok), split.SplitConfig(context_len=384, overlap=40))]
    packed = split.pack(subs, 2048, pad_id=tok.pad_token_id)
    with torch.no_grad():
        a = packed_logprobs(tiny_model, packed)
        tiny_model.set_attn_implementation(register_hf())
        try:
            b = packed_logprobs(tiny_model, packed)
        finally:
            tiny_model.set_attn_implementation("sdpa")
    assert torch.allclose(a, b, atol=1e-5)


CHATML = (  # Qwen2.5-style: a default system prompt when the first message is not a system one
    "{%- if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen.<|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n"
    "</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
    "{%- for tc in (m['tool_calls'] or []) %}\n<tool_call>\n{\"name\": \"{{ tc['function']['name'] }}\", "
    "\"arguments\": {{ tc['function']['arguments'] | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_hugging_face_chatml_template_is_encoded_message_by_message():
    """A non-compact template (Qwen-like ChatML with a default system prompt and no
    {% generation %} marks) still gives message-additive ids and assistant-only masks."""
    from tokenizers import AddedToken
    tok = chat.build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    msgs = make_trajectory(7, 3, 5, 0.0, 0)["messages"]
    chat.check_message_additive(tok)
    ids, mask = chat.encode_messages(tok, msgs)
    assert ids == list(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))
    header = chat.generation_prefix(tok)
    assert tok.decode(header) == "<|im_start|>assistant\n"
    for m in msgs:
        i, k = chat.encode_message(tok, m)
        if m["role"] == "assistant":
            assert i[:len(header)] == header and k == [0] * len(header) + [1] * (len(i) - len(header))
            assert tok.decode([t for t, s in zip(i, k) if s]).startswith(m["content"])
        else:
            assert not any(k)
    assert chat.stop_token_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    call = next(m for m in msgs if m.get("tool_calls"))
    i, k = chat.encode_message(tok, call)
    back = chat.decode_assistant(tok, i[len(header):])
    assert back["tool_calls"][0]["function"] == call["tool_calls"][0]["function"]
