"""A tiny randomly initialised Llama with the built-in model's real tokenizer, saved with `save_pretrained`.

Fast tests and the serving-overhead benchmark load it through the same
`from_pretrained` path as any real model. `python -m tests.tiny_model DIR`
builds it (and `DIR-nochat`, the same model whose tokenizer has no chat template).
"""

from __future__ import annotations

import sys
from pathlib import Path

from workers import builtin_model

CONTEXT_LENGTH = 512


def build(target: Path, chat_template: bool = True, seed: int = 0) -> Path:
    """Write the tiny model to `target` (skipped when it is already there) and return it."""
    target = Path(target)
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(builtin_model.ensure_cached())
    if not chat_template:
        tokenizer.chat_template = None
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT_LENGTH,
        # Larger than the usual 0.02 so that logits have clear winners: greedy text is stable across batch shapes.
        initializer_range=0.1,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def main(argv: list[str]) -> int:
    target = Path(argv[0] if argv else ".cache/tiny-model")
    print(build(target))
    print(build(target.with_name(target.name + "-nochat"), chat_template=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
