import json

import numpy as np
import pytest
import torch
import torch.distributed as dist

from skipjack.config import PreprocessConfig
from skipjack.data.indexed import (
    build_gpt_datasets,
    open_indexed,
    tokenize_documents,
    write_indexed,
)
from skipjack.data.preprocess import run_preprocess
from skipjack.data.tokenizer import Tokenizer, train_bpe
from skipjack.launch.env import init_distributed


def corpus(n, tag):
    return [
        f"# {tag} document {i}\n" + f"value_{tag} = {i} * {i}\n" * (5 + i % 7) for i in range(n)
    ]


def test_preprocess_round_trip_text_and_jsonl(tmp_path):
    docs = corpus(30, "a")
    txt = tmp_path / "one.txt"
    txt.write_text(docs[0])
    jsonl = tmp_path / "many.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d}) for d in docs[1:]) + "\n")
    cfg = PreprocessConfig(
        inputs=[str(txt), str(jsonl)],
        output_prefix=str(tmp_path / "out"),
        tokenizer_vocab_size=300,
        cache_dir=str(tmp_path / "cache"),
    )
    prefix, tok_path = run_preprocess(cfg)
    tok = Tokenizer.load(tok_path)
    ds = open_indexed(prefix)
    assert len(ds) == len(docs)
    for i, doc in enumerate(docs):
        ids = ds[i]
        assert ids[-1] == tok.eod
        assert tok.decode(ids[:-1]) == doc
    assert not list(tmp_path.glob("out.tmp*"))


def test_preprocess_names_the_bad_jsonl_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "wrong key"}\n')
    cfg = PreprocessConfig(
        inputs=[str(bad)],
        output_prefix=str(tmp_path / "out"),
        tokenizer_vocab_size=300,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'text'"):
        run_preprocess(cfg)
    assert not (tmp_path / "out.idx").exists()


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """Two datasets; megatron-core's blend asks for the rank, so a world of one is joined (and
    left again after the module's tests)."""
    joined = not dist.is_initialized()
    if joined:
        init_distributed(torch.device("cpu"))
    root = tmp_path_factory.mktemp("blend")
    tok = train_bpe(corpus(40, "a") + corpus(40, "b"), 300)
    prefixes = []
    for tag in ("a", "b"):
        prefixes.append(
            write_indexed(
                tokenize_documents(corpus(200, tag), tok), str(root / tag), tok.vocab_size
            )
        )
    yield prefixes, tok, root
    if joined:
        dist.destroy_process_group()


def _source(sample_tokens, tok, tags):
    text = tok.decode(sample_tokens)
    return [t for t in tags if f"value_{t}" in text]


def test_blend_ratios_follow_the_weights(two_datasets):
    prefixes, tok, root = two_datasets
    train, _ = build_gpt_datasets(
        prefixes, [0.75, 0.25], "90,10,0", 16, 3, (2000, 100), tok, str(root / "cache")
    )
    # megatron-core's BlendedDataset records which dataset each sample comes from
    share = np.bincount(train.dataset_index[:2000], minlength=2) / 2000
    np.testing.assert_allclose(share, [0.75, 0.25], atol=0.01)
    sample = train[int(np.flatnonzero(train.dataset_index == 1)[0])]
    assert _source(sample["tokens"], tok, "ab") == ["b"]


def test_train_and_validation_documents_are_disjoint(two_datasets):
    prefixes, tok, root = two_datasets
    train, valid = build_gpt_datasets(
        prefixes[:1], None, "80,20,0", 16, 3, (300, 50), tok, str(root / "cache")
    )
    train_docs, valid_docs = set(train.indices.tolist()), set(valid.indices.tolist())
    assert train_docs and valid_docs and not train_docs & valid_docs
    assert len(train_docs) + len(valid_docs) == 200
    sample = train[0]
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
