"""A tiny GGUF file: the tiny test model's weights (float32) with the built-in GGUF's tokenizer metadata.

Written the way llama.cpp's converter writes a Llama (GGUF tensor names, q/k rows permuted for its rotary
layout), so that transformers' `gguf_file=` loader, which undoes that permutation, must give back exactly the
tiny model's weights: a test can compare them tensor by tensor. Small enough to convert in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workers import builtin_model

# The tokenizer part of the built-in file, copied as it is.
_TOKENIZER_FIELDS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.chat_template",
)
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's two rotary halves interleaved."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """The model's state dict under GGUF names, in the layout llama.cpp writes."""
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    state = load_file(model_dir / "model.safetensors")
    tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
    }
    if "lm_head.weight" in state:
        tensors["output.weight"] = state["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        for hf_name, gguf_name in _LAYER_NAMES.items():
            weights = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weights = _permute(weights, config.num_attention_heads)
            elif gguf_name == "attn_k":
                weights = _permute(weights, config.num_key_value_heads)
            tensors[f"blk.{i}.{gguf_name}.weight"] = weights
    return tensors


def write(model_dir: Path, target: Path, name: str = "tiny") -> Path:
    """Write `model_dir` (the tiny Llama, saved with save_pretrained) as a float32 GGUF file at `target`."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    writer = GGUFWriter(str(target), "llama")
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_file_type(0)  # all float32

    reader = GGUFReader(builtin_model.gguf_file())
    for key in _TOKENIZER_FIELDS:
        field = reader.fields[key]
        value = field.contents()
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, field.types[0])

    for tensor_name, weights in gguf_tensors(model_dir).items():
        writer.add_tensor(tensor_name, np.ascontiguousarray(weights, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
