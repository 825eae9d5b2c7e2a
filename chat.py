"""The chat format the model sees: an offline tokenizer, a compact chat template with tool calls,
message-by-message encoding, and tool-call parsing.

Not a paper section: plumbing every stage shares. Design choices (docs/MINIATURE.md, "From the probe
to the project"):

- The tiny tokenizer is a byte-level BPE trained offline, in memory, from `data/tokenizer_corpus.txt`
  plus text the caller adds (factory.py's synthetic tasks), so commands, tags and indices become
  single tokens. Nothing is downloaded.
- One special token per role boundary and a tool call rendered as its name and arguments, not JSON
  punctuation: a turn costs few tokens, which keeps the SFT loss dense.

      <|system|>…<|end|>  <|user|>…<|end|>  <|tool|>…<|end|>
      <|assistant|>content<|call|>name<|arg|>key<|val|>value…<|end|>

  Supervised (assistant) tokens: everything after `<|assistant|>` up to and including `<|end|>`,
  which is exactly what `{% generation %}` marks in the Jinja template.
- Encoding is **message-additive**: the ids of a conversation are the concatenation of the ids of
  its messages (special tokens split the text, and literal special-token strings inside message text
  are encoded as plain text). split.py relies on this: token counts add up, a sub-trajectory is a
  concatenation of cached per-message ids, and the context a policy samples from is rebuilt from
  the same pieces. A Hugging Face tokenizer with its own template (e.g. Qwen's ChatML) is encoded
  message by message through the template and accepted when `check_message_additive` passes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from transformers import PreTrainedTokenizerFast

ROLES = ("system", "user", "assistant", "tool")
PAD, END, CALL, ARG, VAL = "<|pad|>", "<|end|>", "<|call|>", "<|arg|>", "<|val|>"
SPECIAL_TOKENS = [PAD] + [f"<|{r}|>" for r in ROLES] + [END, CALL, ARG, VAL]
CORPUS = Path(__file__).resolve().parent / "data" / "tokenizer_corpus.txt"

# The same rendering as `_body_pieces` below, for tools that only speak Jinja (servers, HF).
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ m['content'] or '' }}"
    "{%- for tc in (m['tool_calls'] or []) -%}<|call|>{{ tc['function']['name'] }}"
    "{%- for k, v in tc['function']['arguments'].items() -%}<|arg|>{{ k }}<|val|>{{ v }}{%- endfor -%}"
    "{%- endfor -%}<|end|>{% endgeneration %}"
    "{%- else -%}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

# The inverse of CHAT_TEMPLATE's assistant turn, for servers that read a reply back into OpenAI
# `tool_calls` with the tokenizer's `response_template` (`transformers serve`;
# PreTrainedTokenizerBase.parse_response): every tokenizer of this format carries it, so a klong
# checkpoint served that way answers with tool calls, not with its markers as text. Argument values
# come back as strings (the compact format does not type them), as parse_assistant reads them.
RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|assistant|>",
    "fields": {
        "tool_calls": {
            "open_pattern": r"<\|call\|>(?P<name>[^<]*)",
            "close_pattern": r"(?=<\|call\|>|<\|end\|>)",
            "repeats": True,
            "content": "xml-inline",
            "content_args": {"tag_pattern":
                             r"<\|arg\|>(?P<key>.*?)<\|val\|>(?P<value>.*?)(?=<\|arg\|>|\Z)"},
            "transform": {"type": "function", "function": {"name": "{name}",
                                                           "arguments": "{content}"}},
        },
        "content": {"close": "<|end|>", "content": "text"},
    },
}


class ToolCallParseError(ValueError):
    """A sampled assistant reply whose tool-call structure cannot be read."""


def build_tiny_tokenizer(extra_text: str = "", vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE offline on the shipped corpus (+ `extra_text`); deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lines = CORPUS.read_text().splitlines() + extra_text.splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([ln for ln in lines if ln.strip()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=END,
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    fast.response_template = RESPONSE_TEMPLATE
    return fast


def is_compact(tokenizer) -> bool:
    """True for a tokenizer that carries this module's compact format. (Asked for every sampled
    action: a token lookup, not get_vocab(), which copies the whole vocabulary.)"""
    return getattr(tokenizer, "chat_template", None) == CHAT_TEMPLATE and \
        tokenizer.convert_tokens_to_ids(CALL) not in (None, tokenizer.unk_token_id)


def tool_arguments(call: dict) -> dict:
    """A tool call's arguments as a dict (OpenAI sends a JSON string, HF chat format a dict)."""
    args = call["function"].get("arguments") or {}
    return json.loads(args) if isinstance(args, str) else dict(args)


def _body_pieces(message: dict) -> list[str]:
    """A message's body as alternating [text, special, text, special, …] pieces (no header)."""
    if message["role"] != "assistant":
        return [str(message.get("content") or ""), END]
    pieces = [str(message.get("content") or "")]
    for call in message.get("tool_calls") or []:
        pieces += [CALL, call["function"]["name"]]
        for key, value in tool_arguments(call).items():
            pieces += [ARG, str(key), VAL, str(value)]
    return pieces + [END]


class _Encoder:
    """Per-tokenizer cache of the special ids and a text encoder that never emits specials."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.compact = is_compact(tokenizer)
        if self.compact:
            self.special = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
            self.text_tok = tokenizer.backend_tokenizer.__class__.from_str(
                tokenizer.backend_tokenizer.to_str())
            self.text_tok.encode_special_tokens = True   # literal "<|end|>" in text stays text

    def text(self, s: str) -> list[int]:
        return self.text_tok.encode(s, add_special_tokens=False).ids if s else []

    def message(self, message: dict) -> tuple[list[int], list[int]]:
        if message.get("role") not in ROLES:
            raise ValueError(f"message role must be one of {ROLES}, got {message.get('role')!r}")
        if not self.compact:
            return self._templated(message)
        ids = [self.special[f"<|{message['role']}|>"]]
        for piece in _body_pieces(message):
            ids += [self.special[piece]] if piece in self.special else self.text(piece)
        supervised = int(message["role"] == "assistant")
        return ids, [0] + [supervised] * (len(ids) - 1)


    def _templated(self, message: dict) -> tuple[list[int], list[int]]:
        """A Hugging Face template, one message at a time: the ids [ANCHOR, m] adds to [ANCHOR]
        (a fixed system message, so templates that insert a default system prompt before a
        first non-system message do not); a system message alone. Assistant tokens after the
        generation prefix are supervised (templates rarely mark them with {% generation %})."""
        render = lambda msgs: list(self.tokenizer.apply_chat_template(  # noqa: E731
            msgs, tokenize=True, return_dict=False))
        if message["role"] == "system":
            ids = render([message])
        else:
            base = render([ANCHOR])
            ids = render([ANCHOR, message])
            if ids[:len(base)] != base:
                raise ValueError("this chat template renders the system message differently when "
                                 "another message follows: it cannot be encoded message by message")
            ids = ids[len(base):]
        head = len(generation_prefix(self.tokenizer)) if message["role"] == "assistant" else len(ids)
        return ids, [0] * head + [1] * (len(ids) - head)


ANCHOR = {"role": "system", "content": "You are an agent."}
_ENCODERS: dict[int, _Encoder] = {}


def _encoder(tokenizer) -> _Encoder:
    enc = _ENCODERS.get(id(tokenizer))
    if enc is None or enc.tokenizer is not tokenizer:
        enc = _ENCODERS[id(tokenizer)] = _Encoder(tokenizer)
    return enc


def encode_message(tokenizer, message: dict) -> tuple[list[int], list[int]]:
    """ids and mask (1 = supervised assistant token) of one message; concatenation = conversation."""
    return _encoder(tokenizer).message(message)


def encode_messages(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    ids, mask = [], []
    for m in messages:
        i, k = encode_message(tokenizer, m)
        ids += i
        mask += k
    return ids, mask


def generation_prefix(tokenizer) -> list[int]:
    """ids appended to a context before sampling an assistant reply (its role header)."""
    if is_compact(tokenizer):
        return [tokenizer.convert_tokens_to_ids("<|assistant|>")]
    probe = [{"role": "user", "content": "x"}]
    with_prompt = tokenizer.apply_chat_template(probe, tokenize=True, add_generation_prompt=True,
                                                return_dict=False)
    without = tokenizer.apply_chat_template(probe, tokenize=True, return_dict=False)
    return list(with_prompt[len(without):])


def stop_token_id(tokenizer) -> int:
    """Sampling an assistant reply stops at this token (included in the supervised tokens)."""
    return tokenizer.convert_tokens_to_ids(END) if is_compact(tokenizer) else tokenizer.eos_token_id


class MessageCache:
    """Each message encoded once: `encode(m)` → (ids, mask) and `count(m)` → len(ids) share one
    cache keyed by the message's content. split.py counts with `count` and tokenises with
    `encode`; p and overlap turns repeat across sub-trajectories and contexts, so one cache per
    dataset or per policy encodes every distinct message once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._ids: dict[str, tuple[list[int], list[int]]] = {}

    def encode(self, message: dict) -> tuple[list[int], list[int]]:
        key = json.dumps(message, sort_keys=True, default=str)
        hit = self._ids.get(key)
        if hit is None:
            hit = self._ids[key] = encode_message(self.tokenizer, message)
        return hit

    def count(self, message: dict) -> int:
        return len(self.encode(message)[0])


def count_tokens(tokenizer, cache: MessageCache | None = None) -> Callable[[dict], int]:
    """A token counter for split.py: `cache.count` (a new MessageCache when none is given; pass
    the one whose `encode` tokenises the same messages)."""
    return (cache or MessageCache(tokenizer)).count


def check_message_additive(tokenizer) -> None:
    """Raise if encoding a conversation differs from concatenating its messages' encodings."""
    convo = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "a", "tool_calls": [
                 {"id": "c0", "type": "function",
                  "function": {"name": "bash", "arguments": {"cmd": "ls"}}}]},
             {"role": "tool", "tool_call_id": "c0", "name": "bash", "content": "o"}]
    joint = tokenizer.apply_chat_template(convo, tokenize=True, return_dict=False)
    ids, _ = encode_messages(tokenizer, convo)
    if list(joint) != ids:
        raise ValueError(
            "this tokenizer's chat template is not message-additive (a conversation's ids differ "
            "from the concatenation of its messages'); split.py needs additivity. Use the tiny "
            "tokenizer or give the tokenizer a per-message template.")


def _call(name: str, args: dict, n: int) -> dict:
    return {"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": args}}


def parse_assistant(text: str) -> dict:
    """Parse a rendered assistant body (`content<|call|>name<|arg|>k<|val|>v…[<|end|>]`)."""
    body = text.removeprefix("<|assistant|>").split(END, 1)[0]
    content, *calls = body.split(CALL)
    tool_calls = []
    for n, call in enumerate(calls):
        name, *pairs = call.split(ARG)
        name = name.strip()
        if not name:
            raise ToolCallParseError(f"tool call {n} has no name: {call[:80]!r}")
        args = {}
        for pair in pairs:
            if VAL not in pair:
                raise ToolCallParseError(f"argument {pair[:40]!r} of {name} has no {VAL}")
            key, value = pair.split(VAL, 1)
            args[key.strip()] = value
        tool_calls.append(_call(name, args, n))
    message = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


HERMES_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def parse_hermes(text: str) -> dict:
    """Parse the `<tool_call>{"name": …, "arguments": {…}}</tool_call>` format of Qwen/Hermes
    templates; a call that is not such a JSON object raises ToolCallParseError."""
    calls = []
    for n, m in enumerate(HERMES_CALL.finditer(text)):
        try:
            d = json.loads(m.group(1))
            calls.append(_call(str(d["name"]), dict(d.get("arguments") or {}), n))
        except (ValueError, KeyError, TypeError) as e:
            raise ToolCallParseError(f"tool call {n}: {e}: {m.group(1)[:80]!r}") from None
    message = {"role": "assistant", "content": HERMES_CALL.sub("", text).strip()}
    if calls:
        message["tool_calls"] = calls
    return message


def decode_assistant(tokenizer, action_ids: list[int]) -> dict:
    """Turn sampled ids into an assistant message; a malformed call raises ToolCallParseError."""
    if not is_compact(tokenizer):
        return parse_hermes(tokenizer.decode(action_ids, skip_special_tokens=True))
    return parse_assistant(tokenizer.decode(action_ids, skip_special_tokens=False))
