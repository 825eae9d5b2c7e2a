"""chat.py's compact format read back by a server: the tokenizer's response template
(chat.RESPONSE_TEMPLATE, what `transformers serve` parses replies with) inverts CHAT_TEMPLATE's
assistant turn, and every klong tokenizer carries it — built, saved and loaded again, or loaded
from a checkpoint saved before it existed (the shipped checkpoints/tiny-sft)."""
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import chat
import klong
import model
import synthetic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return chat.build_tiny_tokenizer(synthetic.tokenizer_text(), vocab_size=1024)


def call(name, **args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


REPLIES = [
    {"role": "assistant", "content": "Reading the paper first."},
    {"role": "assistant", "content": "", "tool_calls": [call("bash", cmd="ls -la /home/paper")]},
    {"role": "assistant", "content": "two at once",
     "tool_calls": [call("write_file", path="README.md", content="line one\nline two"),
                    call("end_task")]},
]


@pytest.mark.parametrize("reply", REPLIES)
def test_a_rendered_reply_parses_back_to_itself(tok, reply):
    history = [{"role": "user", "content": "replicate the paper"}]
    prompt = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    text = tok.apply_chat_template(history + [reply], tokenize=False)
    assert text.startswith(prompt)
    parsed = tok.parse_response(text[len(prompt):], prefix=prompt)
    assert parsed["role"] == "assistant"
    assert (parsed.get("content") or "") == reply["content"]
    assert parsed.get("tool_calls", []) == reply.get("tool_calls", [])


def test_the_template_survives_save_and_load(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again.response_template == chat.RESPONSE_TEMPLATE


def test_a_checkpoint_saved_without_it_gets_it_on_load():
    shipped = ROOT / "checkpoints" / "tiny-sft"
    raw = AutoTokenizer.from_pretrained(shipped, local_files_only=True)
    assert getattr(raw, "response_template", None) is None          # saved before chat.py had one
    loaded, _ = model.load_model(klong.Config(), str(shipped), for_training=False)
    assert loaded.response_template == chat.RESPONSE_TEMPLATE
