"""Instruction data: chat templates rendered exactly as transformers renders them, loss masks
covering exactly the assistant's tokens, packing that changes nothing of the math, malformed
records named with their lines."""

import json

import pytest
import torch
import torch.nn.functional as F

from skipjack.batch import IGNORE_INDEX
from skipjack.config import ConfigError, PreprocessConfig
from skipjack.data.indexed import sample_batch
from skipjack.data.preprocess import run_preprocess
from skipjack.data.sft import DEFAULT_TEMPLATE, ChatFormat, SftDataset, read_examples
from skipjack.data.sft_store import fingerprint, load_examples, read_examples_file
from skipjack.data.tokenizer import EOD, train_bpe
from skipjack.models.llama import Llama
from skipjack.testing.reference import tiny_config

# a Llama-3-style template: a bos token, headers, a default system message, trimmed content
TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|start|>system<|end|>\n\n"
    "You are helpful.<|eot|>{% endif %}"
    "{% for message in messages %}<|start|>{{ message['role'] }}<|end|>\n\n"
    "{{ message['content'] | trim }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant<|end|>\n\n{% endif %}"
)
CHATS = [
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Times 4?"},
        {"role": "assistant", "content": " 20 "},
    ],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model directory as transformers saves it: tokenizer.json, tokenizer_config.json with
    special tokens, chat_template.jinja."""
    from transformers import PreTrainedTokenizerFast

    texts = [m["content"] for chat in CHATS for m in chat] * 20 + ["def f(x): return x"] * 50
    bpe = train_bpe(texts, 300)
    bpe.hf.add_special_tokens(["<s>", "<|start|>", "<|end|>", "<|eot|>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe.hf, bos_token="<s>", eos_token="<|eot|>", pad_token=EOD
    )
    fast.chat_template = TEMPLATE
    directory = tmp_path_factory.mktemp("model")
    fast.save_pretrained(directory)
    return directory, fast


def test_the_chat_template_renders_as_transformers_renders_it(model_dir):
    directory, fast = model_dir
    chat = ChatFormat.from_directory(directory)
    for messages in CHATS:
        for prompt in (False, True):
            ours = chat.render(messages, add_generation_prompt=prompt)
            theirs = fast.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt
            )
            assert ours == theirs
        assert chat.encode(chat.render(messages)) == fast.apply_chat_template(
            messages, tokenize=True, return_dict=False
        )


def test_the_loss_covers_exactly_the_assistants_tokens(model_dir):
    chat = ChatFormat.from_directory(model_dir[0])
    for messages in CHATS:
        ids, mask = chat.example(messages)
        assert ids == chat.encode(chat.render(messages))  # the pieces add up to the whole
        trained = chat.tokenizer.decode(
            [i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False
        )
        expected = "".join(
            m["content"].strip() + "<|eot|>" for m in messages if m["role"] == "assistant"
        )
        assert trained.replace(" ", "") == expected.replace(" ", "")


def write_records(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_malformed_records_are_reported_with_their_lines_or_stop_the_job(tmp_path, model_dir):
    chat = ChatFormat.from_directory(model_dir[0])
    good = json.dumps({"prompt": "a", "response": "b"})
    path = write_records(
        tmp_path / "bad.jsonl",
        [
            good,
            "{not json",
            json.dumps({"prompt": "only a prompt"}),
            json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
            json.dumps({"messages": [{"role": "assistant"}]}),
            json.dumps(["a list"]),
            "",
            good,
        ],
    )
    examples, report = read_examples([path], chat)
    assert len(examples) == 2 and report.examples == 2
    assert [line for _, line, _ in report.bad] == [2, 3, 4, 5, 6]
    why = {line: reason for _, line, reason in report.bad}
    assert "prompt" in why[3] and "assistant" in why[4] and "content" in why[5]
    assert f"{path}:2:" in report.describe()
    with pytest.raises(ConfigError, match=r"data.on_bad_record.*bad.jsonl:2:"):
        read_examples([path], chat, "fail")


def test_preprocessed_and_cached_sets_hold_what_reading_the_records_gives(
    tmp_path, model_dir, monkeypatch
):
    """`skipjack preprocess kind=sft` writes the examples and the report of reading the records
    with the model directory's template; data=sft caches a jsonl file's examples on first use
    and reads them back after; a set made with another tokenizer is refused by name."""
    records = [json.dumps({"messages": chat}) for chat in CHATS] + ["{not json"]
    path = write_records(tmp_path / "chat.jsonl", records * 3)
    chat = ChatFormat.from_directory(model_dir[0])
    want, want_report = read_examples([path], chat)
    cfg = PreprocessConfig(
        kind="sft", inputs=[path], output_prefix=str(tmp_path / "out" / "chat"),
        tokenizer=str(model_dir[0]), cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    out, _ = run_preprocess(cfg)
    assert out == str(tmp_path / "out" / "chat.sft.npz")
    got, report = read_examples_file(out, fingerprint(chat))
    assert got == want and report.bad == want_report.bad and report.examples == 6
    cache = str(tmp_path / "cache")
    first, _ = load_examples([path], chat, "skip", cache)
    assert first == want and len(list((tmp_path / "cache" / "sft").iterdir())) == 1

    def no_reading(*args, **kwargs):
        raise AssertionError("the records were read again")

    monkeypatch.setattr("skipjack.data.sft_store.read_examples", no_reading)
    again, again_report = load_examples([path, out], chat, "skip", cache)
    assert again == want + want and again_report.bad == want_report.bad * 2
    other = ChatFormat(chat.tokenizer, DEFAULT_TEMPLATE, chat.specials)
    with pytest.raises(ConfigError, match=r"data.paths: .*chat.sft.npz was tokenized with"):
        load_examples([out], other, "skip", cache)


def test_a_packed_micro_batch_trains_like_its_examples_one_by_one(tmp_path):
    """Same summed loss and gradients (1e-5) whether the examples share sequences (positions
    restarting, attention inside each) or each has its own padded sequence."""
    texts = ["question answer def return " * 10]
    bpe = train_bpe(texts, 260)
    chat = ChatFormat(bpe.hf, DEFAULT_TEMPLATE, {"eos_token": EOD})
    records = [
        json.dumps({"prompt": "question " * (1 + i % 4), "response": "answer " * (2 + i % 3)})
        for i in range(6)
    ]
    examples, report = read_examples([write_records(tmp_path / "r.jsonl", records)], chat)
    seq_len = 160
    packed = SftDataset(examples, seq_len, chat.pad, True, report)
    alone = SftDataset(examples, seq_len, chat.pad, False, report)
    assert len(packed) < len(alone) == 6 and packed.padding() < alone.padding()
    cfg = tiny_config(vocab_size=512, max_seq_len=seq_len)

    def loss_and_grads(dataset):
        torch.manual_seed(0)
        model = Llama(cfg).init_weights(0, torch.device("cpu"))
        batch = sample_batch(dataset, range(len(dataset)))
        logits = model(batch.tokens, batch.positions, batch.documents)
        loss = F.cross_entropy(
            logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        loss.backward()
        return float(loss.detach()), {n: p.grad for n, p in model.named_parameters()}

    (loss_p, grads_p), (loss_a, grads_a) = loss_and_grads(packed), loss_and_grads(alone)
    assert sample_batch(packed, [0]).targets > 0
    assert abs(loss_p - loss_a) <= 1e-5 * abs(loss_a)
    for name, g in grads_a.items():
        assert float((grads_p[name] - g).norm() / g.norm()) <= 1e-5, name
