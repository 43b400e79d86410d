"""A model as the frontend knows it: its resolved folder, tokenizer, chat template and context length.

The frontend tokenizes (and applies the chat template) itself, so that prompt
length and limits are checked before a request reaches a worker, and workers
receive token ids only. Tokenizing never runs on the event loop: each model has
one tokenizer thread (which also keeps the Rust tokenizer out of concurrent
use), and input is refused by its size in bytes before it gets there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.config import ModelConfig
from service.convert import ParsedRequest
from service.errors import InvalidArgument
from service.sources.errors import ModelSourceError
from workers.messages import StoppingParams

_LOGGER = logging.getLogger(__name__)
# Input longer than this many bytes per context token cannot fit (tokens of real text average 3-5 bytes;
# long runs of spaces make the longest), so it is refused before it is tokenized.
BYTES_PER_CONTEXT_TOKEN = 32


@dataclass
class ServedModel:
    config: ModelConfig
    path: Path
    tokenizer: Any  # a transformers tokenizer
    context_length: int
    _executor: concurrent.futures.ThreadPoolExecutor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"tokenize-{self.config.name}")

    @classmethod
    def load(cls, config: ModelConfig, path: Path) -> ServedModel:
        """Read the model at `path` (`model_source.resolve` of the config's source); ModelSourceError if it cannot
        be served."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        where = f"model {config.name!r} ({config.source})"
        try:
            hf_config = AutoConfig.from_pretrained(path)
        except (ValueError, KeyError, OSError) as exc:
            custom = "auto_map" in _read_json(path / "config.json")
            hint = (
                "it needs the repo's own Python code (auto_map), which modelpool does not run"
                if custom
                else "a newer transformers may know this architecture"
            )
            raise ModelSourceError(f"{where}: transformers cannot read its config ({exc}); {hint}") from exc
        if type(hf_config) not in AutoModelForCausalLM._model_mapping:
            raise ModelSourceError(
                f"{where}: {type(hf_config).__name__} ({getattr(hf_config, 'model_type', '?')}) is not a causal "
                "language model transformers can generate with (AutoModelForCausalLM knows no class for it)"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (ValueError, OSError, ImportError) as exc:  # ImportError: sentencepiece, tiktoken, protobuf missing
            raise ModelSourceError(f"{where}: its tokenizer does not load ({exc})") from exc
        context = getattr(hf_config.get_text_config(), "max_position_embeddings", None)
        context = int(context or getattr(tokenizer, "model_max_length", 0) or 2048)
        _LOGGER.info("model %r from %s: context %d tokens", config.name, path, context)
        return cls(config=config, path=path, tokenizer=tokenizer, context_length=context)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def max_input_bytes(self) -> int:
        return self.config.max_input_bytes or BYTES_PER_CONTEXT_TOKEN * self.context_length

    def check_input_size(self, request: ParsedRequest) -> None:
        """Refuse input that cannot fit the context, by its size alone: costs nothing, unlike tokenizing it."""
        if request.prompt is not None:
            field_name, size = "prompt", len(request.prompt.encode("utf-8", "surrogatepass"))
        else:
            field_name = "chat.messages"
            size = sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in request.messages or ())
        if size > self.max_input_bytes:
            raise InvalidArgument(
                field_name,
                f"{size} bytes is more than model {self.name!r} takes ({self.max_input_bytes} bytes; "
                f"its context is {self.context_length} tokens)",
            )

    async def encode(self, request: ParsedRequest) -> list[int]:
        """The prompt's token ids (the chat template applied), computed on this model's tokenizer thread."""
        loop = asyncio.get_running_loop()
        if request.prompt is not None:
            return await loop.run_in_executor(self._executor, self.encode_prompt, request.prompt)
        return await loop.run_in_executor(self._executor, self.encode_chat, request.messages or [])

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.has_chat_template:
            raise InvalidArgument("chat", f"model {self.name!r} has no chat template; send a raw prompt instead")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # templates raise on conversations they refuse
            raise InvalidArgument("chat.messages", f"the chat template refused them: {exc}") from exc
        # The template already wrote the special tokens (BOS, turn markers).
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_limits(self, prompt_tokens: int, stopping: StoppingParams, explicit_max: bool) -> StoppingParams:
        """Apply the default max_new_tokens and check the request against the context and batch limits."""
        if prompt_tokens == 0:
            raise InvalidArgument("prompt", "tokenizes to no tokens")
        if self.config.max_prompt_tokens and prompt_tokens > self.config.max_prompt_tokens:
            raise InvalidArgument(
                "prompt",
                f"{prompt_tokens} tokens is more than max_prompt_tokens ({self.config.max_prompt_tokens}) "
                f"of model {self.name!r}",
            )
        room = self.context_length - prompt_tokens
        if room < 1:
            raise InvalidArgument(
                "prompt", f"{prompt_tokens} tokens leave no room in the context of {self.context_length} tokens"
            )
        batch_room = self.config.max_batch_tokens - prompt_tokens
        if batch_room < 1:
            raise InvalidArgument(
                "prompt",
                f"{prompt_tokens} tokens leave no room under max_batch_tokens ({self.config.max_batch_tokens})",
            )
        cap = self.config.max_new_tokens
        if explicit_max and cap and stopping.max_new_tokens > cap:
            raise InvalidArgument(
                "stopping.max_new_tokens",
                f"{stopping.max_new_tokens} is more than max_new_tokens ({cap}) of model {self.name!r}",
            )
        default = min(self.config.default_max_new_tokens, cap) if cap else self.config.default_max_new_tokens
        max_new = stopping.max_new_tokens if explicit_max else min(default, room, batch_room)
        if max_new > room:
            raise InvalidArgument(
                "stopping.max_new_tokens",
                f"{max_new} + {prompt_tokens} prompt tokens exceed the context of {self.context_length} tokens",
            )
        if prompt_tokens + max_new > self.config.max_batch_tokens:
            raise InvalidArgument(
                "stopping.max_new_tokens",
                f"{max_new} + {prompt_tokens} prompt tokens exceed max_batch_tokens ({self.config.max_batch_tokens})",
            )
        if stopping.min_new_tokens > max_new:
            raise InvalidArgument(
                "stopping.min_new_tokens", f"{stopping.min_new_tokens} is more than max_new_tokens ({max_new})"
            )
        return StoppingParams(
            max_new_tokens=max_new,
            min_new_tokens=stopping.min_new_tokens,
            stop_sequences=stopping.stop_sequences,
            ignore_eos=stopping.ignore_eos,
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
