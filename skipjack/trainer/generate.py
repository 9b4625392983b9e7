"""`skipjack generate`: text sampled from a model (a Hugging Face directory or a skipjack step-*
directory), whole in this process, so that a user sees what training or fine-tuning did.

The tokenizer is the model directory's (with its chat template), or for a skipjack checkpoint
the one its run trained with (the run's config.yaml: the built-in corpus', the indexed data's,
or the instruction data's with its template).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from skipjack.checkpoint import hf
from skipjack.checkpoint.convert import init_model_config
from skipjack.checkpoint.sharded import read_model
from skipjack.config import ConfigError, DataConfig, ModelConfig
from skipjack.config.generate import GenerateConfig, validate_generate
from skipjack.data.sft import DEFAULT_TEMPLATE, ChatFormat, chat_format
from skipjack.data.tokenizer import EOD
from skipjack.models.generation import generate
from skipjack.models.llama import Llama
from skipjack.parallel.shard_spec import spec_of


def load_whole(cfg: ModelConfig, source: str, device: torch.device) -> Llama:
    """The whole model with the weights of `source`, in evaluation mode."""
    model = Llama(cfg).init_weights(0, device)
    if hf.is_hf_dir(source):
        checkpoint = hf.HFCheckpoint(source, cfg)
        weights = {name: checkpoint.read(name, spec_of(p)) for name, p in model.named_parameters()}
    else:
        weights = read_model(source)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in weights:
                raise ConfigError("model.init_from", f"{source} holds no {name}")
            w = weights[name]
            p[: w.shape[0]].copy_(w.to(p.dtype))  # a padded vocabulary's extra rows stay
    return model.eval()


def tokenizer_of(g: GenerateConfig) -> tuple[ChatFormat, bool]:
    """The model's tokenizer and chat template, and whether a chat template came with it."""
    source = Path(g.model.init_from).expanduser()
    if hf.is_hf_dir(source):
        chat = chat_format(g.data, str(source))
        return chat, chat.template != DEFAULT_TEMPLATE
    run_config = source.parent.parent / "config.yaml"  # <run>/checkpoints/step-*
    data = g.data
    if run_config.is_file():
        saved = OmegaConf.load(run_config)
        data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), saved.data))
        if data.kind == "sft":
            return chat_format(data, saved.model.get("init_from")), True
    if data.kind == "sft":
        return chat_format(data, None), True
    from skipjack.data.source import resolve_source

    tokenizer = resolve_source(data)[2]
    return ChatFormat(tokenizer.hf, DEFAULT_TEMPLATE, {"eos_token": EOD}), False


def run_generate(g: GenerateConfig) -> str:
    """Sample the completion of the prompt; prints it (with the speed) and returns it."""
    validate_generate(g)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if g.device == "auto" else g.device
    )
    model = load_whole(init_model_config(g.model), g.model.init_from, device)
    chat, has_template = tokenizer_of(g)
    prompt = g.prompt or Path(g.prompt_file).expanduser().read_text()
    if g.chat == "yes" or (g.chat == "auto" and has_template):
        ids = chat.encode(chat.render([{"role": "user", "content": prompt}], True))
    else:
        ids = chat.tokenizer.encode(prompt).ids  # with the tokenizer's own BOS, if it adds one
    if len(ids) >= model.cfg.max_seq_len:
        raise ConfigError(
            "prompt", f"{len(ids)} tokens: the model's context is {model.cfg.max_seq_len}"
        )
    stop = {chat.tokenizer.token_to_id(t) for t in (chat.specials.get("eos_token"),) if t}
    generator = torch.Generator().manual_seed(g.seed)
    started = time.perf_counter()
    out = generate(model, ids, g.max_new_tokens, g.temperature, g.top_p, stop - {None}, generator)
    seconds = time.perf_counter() - started
    text = chat.tokenizer.decode(out, skip_special_tokens=True)
    print(text)
    speed = len(out) / max(seconds, 1e-9)
    print(f"skipjack generate: {len(out)} tokens in {seconds:.2f} s ({speed:.1f} tokens/s)")
    return text
