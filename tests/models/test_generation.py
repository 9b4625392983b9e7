"""Generation: the KV cache gives the logits of the full forward; greedy output equals
transformers' `generate` on the same model; `skipjack generate` through the CLI."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from skipjack.checkpoint.convert import init_model_config
from skipjack.config import ModelConfig
from skipjack.data.tokenizer import EOD, train_bpe
from skipjack.models.generation import generate
from skipjack.models.llama import KVCache, Llama
from skipjack.testing.cli import run_skipjack
from skipjack.testing.reference import tiny_config
from skipjack.trainer.generate import load_whole


def test_the_cache_gives_the_logits_of_the_full_forward():
    cfg = tiny_config(n_layers=2)
    model = Llama(cfg).init_weights(0).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model, 2, 20)
        parts = [model(tokens[:, :8], cache=cache)]  # a prompt
        parts.append(model(tokens[:, 8:13], cache=cache))  # a chunk after it (masked)
        parts += [model(tokens[:, t : t + 1], cache=cache) for t in range(13, 20)]  # one by one
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 20
    with pytest.raises(ValueError, match="holds 20 positions"):
        model(tokens[:, :1], cache=cache)


@pytest.fixture(scope="module")
def hf_chat_model(tmp_path_factory):
    """A random transformers Llama with a tokenizer and a chat template, saved as transformers
    saves them."""
    bpe = train_bpe(["the quick brown fox jumps over the lazy dog " * 20], 300)
    bpe.hf.add_special_tokens(["<s>", "<|eot|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe.hf, bos_token="<s>", eos_token="<|eot|>", pad_token=EOD
    )
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|eot|>"
        "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
        rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    config.rope_parameters.setdefault("rope_theta", 10000.0)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("hf")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_greedy_output_equals_transformers_generate(hf_chat_model):
    reference = LlamaForCausalLM.from_pretrained(hf_chat_model, dtype=torch.float32).eval()
    prompt = [5, 17, 42, 8, 99, 3]
    with torch.no_grad():
        theirs = reference.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=24, min_new_tokens=24
        )[0, len(prompt) :].tolist()
    cfg = init_model_config(ModelConfig(name="hf", init_from=str(hf_chat_model)))
    model = load_whole(cfg, str(hf_chat_model), torch.device("cpu"))
    assert generate(model, prompt, 24) == theirs
    sampled = [generate(model, prompt, 8, 1.0, 0.9, None, torch.Generator().manual_seed(s))
               for s in (1, 1, 2)]  # fmt: skip
    assert sampled[0] == sampled[1]  # seeded


def test_generate_through_the_cli_with_the_chat_template(hf_chat_model, tmp_path):
    result = run_skipjack(
        "generate", f"model.init_from={hf_chat_model}", "prompt=the quick brown fox",
        "max_new_tokens=8", cwd=tmp_path,
    )  # fmt: skip
    assert "skipjack generate:" in result.stdout and "tokens/s" in result.stdout
    bad = run_skipjack("generate", "prompt=hi", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "model.init_from" in bad.stderr
