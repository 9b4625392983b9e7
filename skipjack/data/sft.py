"""Instruction data for supervised fine-tuning: chat templates, loss masks, packing.

Records are jsonl lines, either `{"prompt": ..., "response": ...}` or chat
`{"messages": [{"role": ..., "content": ...}, ...]}`. Each is rendered with the model's chat
template (`chat_template.jinja` or the `chat_template` of `tokenizer_config.json` in the model
directory, as `transformers` saves them; rendered with jinja2 in a sandbox the way `transformers`
does) or else `DEFAULT_TEMPLATE`, and tokenized with the model's `tokenizer.json`. The loss covers
the assistant's (response's) tokens only: each assistant message is the text its turn adds to the
conversation rendered up to it with the generation prompt.

Packing puts several examples into one sequence of `seq_len` + 1 tokens, in order, while they
fit; positions restart at every example and each token attends only inside its own example
(`MicroBatch.documents`: block-diagonal causal attention). Unpacked, every example is padded to
a sequence of its own. An example longer than a sequence is cut to fit (counted in the report).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from skipjack.batch import IGNORE_INDEX
from skipjack.config import ConfigError

DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def compile_template(source: str):
    """A chat template compiled as `transformers` compiles it: a sandboxed jinja2 environment
    with trim_blocks and lstrip_blocks, loop controls, `raise_exception`, `strftime_now` and a
    `tojson` that does not escape HTML."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


@dataclass
class ChatFormat:
    """A tokenizer (Hugging Face `tokenizers`) and the chat template it goes with."""

    tokenizer: object
    template: str
    specials: dict = field(default_factory=dict)  # bos_token, eos_token, ... for the template

    def __post_init__(self):
        self._compiled = compile_template(self.template)

    @classmethod
    def from_directory(cls, directory: str | Path) -> ChatFormat:
        """The tokenizer and chat template of a model directory as `transformers` saves it."""
        from tokenizers import Tokenizer

        directory = Path(directory).expanduser()
        if not (directory / "tokenizer.json").is_file():
            raise ConfigError("data.tokenizer", f"{directory} has no tokenizer.json")
        config = {}
        if (directory / "tokenizer_config.json").is_file():
            config = json.loads((directory / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text()
        specials = {
            name: _token_text(config[name])
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if config.get(name) is not None
        }
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        return cls(tokenizer, template or DEFAULT_TEMPLATE, specials)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def pad(self) -> int:
        """The id that fills a sequence's unused positions (no loss, attended by nothing)."""
        for name in ("pad_token", "eos_token"):
            if name in self.specials:
                found = self.tokenizer.token_to_id(self.specials[name])
                if found is not None:
                    return found
        return 0

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.specials
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def example(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """Token ids of the rendered conversation and, per token, whether it is the assistant's
        (carries a loss)."""
        ids, mask, done = [], [], ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            turn = self.render(messages[: i + 1])
            if not (prompt.startswith(done) and turn.startswith(prompt)):
                raise ValueError(
                    "the chat template does not render a conversation as the prefix of its "
                    "continuation; its assistant tokens cannot be told apart"
                )
            for text, trained in ((prompt[len(done) :], False), (turn[len(prompt) :], True)):
                piece = self.encode(text)
                ids += piece
                mask += [trained] * len(piece)
            done = turn
        rest = self.encode(self.render(messages)[len(done) :])
        return ids + rest, mask + [False] * len(rest)


def _token_text(value) -> str:
    return value["content"] if isinstance(value, dict) else str(value)


@dataclass
class Report:
    """What reading the records found: examples kept, records skipped (with their line
    numbers and why), examples cut to fit a sequence."""

    examples: int = 0
    bad: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line, why)
    truncated: int = 0

    def describe(self) -> str:
        lines = [f"{self.examples} examples, {self.truncated} cut to fit a sequence"]
        if self.bad:
            shown = "; ".join(f"{f}:{n}: {why}" for f, n, why in self.bad[:10])
            more = f" (and {len(self.bad) - 10} more)" if len(self.bad) > 10 else ""
            lines.append(f"{len(self.bad)} malformed records skipped: {shown}{more}")
        return "; ".join(lines)


def conversation(record) -> list[dict]:
    """The messages of a record; raises ValueError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError("a record is a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("`messages` must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError("every message needs a string `role`")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"the {m.get('role')} message has no string `content`")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("no assistant message: nothing to train on")
        return messages
    prompt, response = record.get("prompt"), record.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError('needs "messages", or string "prompt" and "response"')
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def read_examples(
    paths: Sequence[str],
    chat: ChatFormat,
    on_bad_record: str = "skip",
    advance: Callable[[int], None] | None = None,
) -> tuple[list[tuple[list[int], list[bool]]], Report]:
    """Every record of the jsonl files `paths` as (ids, loss mask). A malformed record is
    counted with its file and line and skipped, or raises ConfigError naming it when
    `on_bad_record` is `fail`. `advance(n)` is told the bytes of every line read."""
    examples, report = [], Report()
    for path in paths:
        with open(Path(path).expanduser(), encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if advance is not None:
                    advance(len(line.encode("utf-8", "replace")))
                if not line.strip():
                    continue
                try:
                    example = chat.example(conversation(json.loads(line)))
                except (ValueError, KeyError) as error:  # JSONDecodeError is a ValueError
                    if on_bad_record == "fail":
                        raise ConfigError(
                            "data.on_bad_record", f"{path}:{number}: {error} (or set it to skip)"
                        ) from error
                    report.bad.append((str(path), number, str(error).splitlines()[0]))
                    continue
                examples.append(example)
    report.examples = len(examples)
    return examples, report


class SftDataset:
    """Sequences of `seq_len` + 1 tokens made of examples, packed or one each; item i is a
    sample dict as the loader takes it (tokens, labels, loss_mask, positions, documents)."""

    def __init__(self, examples, seq_len: int, pad: int, pack: bool, report: Report):
        """`examples`: (ids, loss mask) pairs, in order; cuts are counted in `report`."""
        self.seq_len, self.pad = seq_len, pad
        self.rows: list[list[tuple[list[int], list[bool]]]] = []
        row, used = [], 0
        for ids, mask in examples:
            if len(ids) > seq_len + 1:
                ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
                report.truncated += 1
            if row and (not pack or used + len(ids) > seq_len + 1):
                self.rows.append(row)
                row, used = [], 0
            row.append((ids, mask))
            used += len(ids)
        if row:
            self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def padding(self) -> float:
        """The share of sequence positions that hold no example."""
        used = sum(len(ids) for row in self.rows for ids, _ in row)
        return 1.0 - used / (len(self.rows) * (self.seq_len + 1))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = self.seq_len + 1
        tokens = torch.full((n,), self.pad, dtype=torch.int64)
        trained = torch.zeros(n, dtype=torch.bool)
        documents = torch.full((n,), len(self.rows[i]), dtype=torch.int64)  # padding: its own
        positions = torch.zeros(n, dtype=torch.int64)
        start = 0
        for doc, (ids, mask) in enumerate(self.rows[i]):
            end = start + len(ids)
            tokens[start:end] = torch.tensor(ids)
            trained[start:end] = torch.tensor(mask)
            documents[start:end] = doc
            positions[start:end] = torch.arange(len(ids))
            start = end
        positions[start:] = torch.arange(n - start)
        # the target of token t is token t + 1 of the same example, trained where it is the
        # assistant's
        loss = trained[1:] & (documents[1:] == documents[:-1])
        return {
            "tokens": tokens[:-1],
            "labels": tokens[1:].masked_fill(~loss, IGNORE_INDEX),
            "loss_mask": loss.to(torch.int64),
            "positions": positions[:-1],
            "documents": documents[:-1],
        }


def chat_format(cfg, model_dir: str | None) -> ChatFormat:
    """The tokenizer and chat template of `data.tokenizer` or else `model_dir` where either is
    a model directory with a tokenizer.json; else the built-in corpus' tokenizer (or the
    tokenizer.json in `data.tokenizer`) with DEFAULT_TEMPLATE."""
    from skipjack.data.builtin import corpus_texts
    from skipjack.data.tokenizer import EOD, Tokenizer, cached_bpe

    for directory in (cfg.tokenizer, model_dir):
        if directory and (Path(directory).expanduser() / "tokenizer.json").is_file():
            return ChatFormat.from_directory(directory)
    if cfg.tokenizer:
        tokenizer = Tokenizer.load(cfg.tokenizer)
    else:
        cache = Path(cfg.cache_dir).expanduser() / "tokenizers"
        tokenizer = cached_bpe(corpus_texts(), cfg.tokenizer_vocab_size, cache)
    return ChatFormat(tokenizer.hf, DEFAULT_TEMPLATE, {"eos_token": EOD})
