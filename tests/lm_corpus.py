"""What the language-model tests write for themselves: a tiny corpus, a tokenizer trained on it,
and a tiny GPT-2 teacher saved with that tokenizer (save_pretrained). Nothing is downloaded."""

from __future__ import annotations

import random
from pathlib import Path

TINY_GPT2 = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}
SUBJECTS = ["the king", "a fool", "my lord", "the queen", "good sir", "the ghost"]
VERBS = ["speaks", "weeps", "laughs", "sleeps", "fights", "sings"]
PLACES = ["in the hall", "by the sea", "at the gate", "in the night", "on the hill"]


def write_corpus(path: Path, sentences: int = 1500, seed: int = 0) -> Path:
    """A seeded toy grammar: regular enough that a 2-layer model learns it in an epoch or two."""
    rng = random.Random(seed)
    lines = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)}."
             for _ in range(sentences)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_teacher(folder: Path, corpus: Path, vocab_size: int = 300, steps: int = 150,
                  layers: int = 2, seed: int = 0) -> Path:
    """A tiny GPT-2 trained for ``steps`` Adam steps on ``corpus`` (in this process), saved with
    its tokenizer into ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from raykd.data.tokenizer import EOS, hf_tokenizer, train_bpe

    tok_file = train_bpe([corpus.read_text()], vocab_size, folder / "bpe" / "tokenizer.json")
    tokenizer = hf_tokenizer(tok_file)
    ids = torch.tensor(tokenizer(corpus.read_text())["input_ids"])
    eos = tokenizer.convert_tokens_to_ids(EOS)
    torch.manual_seed(seed)
    config = AutoConfig.for_model("gpt2", **{**TINY_GPT2, "n_layer": layers},
                                  vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    block, batch = 32, 16
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - block - 1, (batch,), generator=gen)
        x = torch.stack([ids[s:s + block] for s in starts])
        y = torch.stack([ids[s + 1:s + block + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(
            model(input_ids=x).logits.reshape(-1, config.vocab_size), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
