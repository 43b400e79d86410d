"""The continuous-batching engine: runs the scheduler's plan for each step on the model's tensors.

workers/scheduler.py decides what a step computes (it never sees a tensor);
this module owns the sequences' tensors and text: the running batch (a
left-padded `KVBatch`), the partial cache of each sequence whose prompt is
being prefilled in chunks, sampling, detokenizing, and the events a step
returns, one per sequence it touched. A step decodes every running sequence,
then prefills its prompt chunks: a chunk continues its sequence's own cache
(a batch of one), prompts that fit the step whole are prefilled together in
padded batches of similar lengths (workers/prefill_groups.py), and a sequence
whose prompt is complete gets its first token and joins the running batch. The
engine is driven by a single thread (the worker loop), so add/abort happen only
between steps.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from workers.batch import KVBatch
from workers.detokenizer import IncrementalDetokenizer
from workers.messages import ErrorKind, FinishReason, GenerateCall, SequenceEvent
from workers.prefill_groups import ForwardCost, split_by_length
from workers.prefix_cache import PrefixCache, PrefixEntry
from workers.sampling import RowSampling, make_generator, sample_next_tokens
from workers.scheduler import Budgets, Chunk, Scheduler, SequenceState

_LOGGER = logging.getLogger(__name__)


@dataclass
class Sequence:
    call: GenerateCall
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    start_time: float = 0.0
    generated: list[int] = field(default_factory=list)
    started_reported: bool = False
    # The cache of the prompt's chunks prefilled so far, until the sequence joins the running batch.
    partial_cache: DynamicCache | None = None
    # A stored prefix of the prompt that its prefill starts from (until its first chunk runs).
    prefix: PrefixEntry | None = None

    @property
    def request_id(self) -> int:
        return self.call.request_id

    @property
    def label(self) -> str:
        """How log lines name the request: the caller's x-request-id, else the frontend's number."""
        return self.call.request_label or str(self.request_id)

    @property
    def reserved_tokens(self) -> int:
        """Tokens this sequence may hold at most: what the batch-token limit counts."""
        return len(self.call.prompt_token_ids) + self.call.stopping.max_new_tokens

    def row_sampling(self) -> RowSampling:
        stopping = self.call.stopping
        return RowSampling(
            params=self.call.sampling,
            generator=self.generator,
            seen_token_ids=(self.call.prompt_token_ids + tuple(self.generated))
            if self.call.sampling.repetition_penalty != 1.0
            else (),
            suppress_eos=stopping.ignore_eos or len(self.generated) < stopping.min_new_tokens,
        )


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        device: torch.device,
        eos_token_ids: Iterable[int],
        max_batch_size: int,
        max_batch_tokens: int,
        max_step_tokens: int = 0,
        max_overtakes: int = 32,
        prefix_cache_bytes: int = 0,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.eos_token_ids = frozenset(eos_token_ids)
        self._eos_list = sorted(self.eos_token_ids)
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_step_tokens = max_step_tokens
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self._eos_list[0] if self._eos_list else 0)
        self.scheduler = Scheduler(Budgets(max_batch_size, max_batch_tokens, max_step_tokens, max_overtakes))
        # Every sequence the scheduler knows, by request id.
        self._sequences: dict[int, Sequence] = {}
        # The rows of `batch`, in order.
        self.running: list[Sequence] = []
        self.batch: KVBatch | None = None
        self._joining: list[Sequence] = []
        # Set once newcomers have taken their first token: a prefill that fails after that is not tried again.
        self._advanced = False
        # Sequences the last step decoded (the batch size a metric reports).
        self.last_decoded = 0
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        # What one more prefill forward costs in padded tokens, learnt from this worker's prefills on a CPU (a GPU
        # runs forwards asynchronously: timing them would need a synchronisation per forward).
        self.prefill_cost = ForwardCost.for_device(device.type)
        self._time_prefills = device.type == "cpu"

    # ------------------------------------------------------------ between steps

    def add(self, call: GenerateCall) -> SequenceEvent | None:
        """Queue a request; returns an error event at once if it can never fit the batch."""
        seq = Sequence(
            call=call,
            detokenizer=IncrementalDetokenizer(self.tokenizer, call.prompt_token_ids, call.stopping.stop_sequences),
            generator=make_generator(call.sampling, self.device),
        )
        if seq.reserved_tokens > self.max_batch_tokens:
            return self._error_event(
                seq,
                ErrorKind.INVALID_ARGUMENT,
                f"prompt tokens + max_new_tokens = {seq.reserved_tokens} exceeds the worker's batch limit "
                f"of {self.max_batch_tokens} tokens",
            )
        self._sequences[call.request_id] = seq
        state = SequenceState(
            request_id=call.request_id,
            prompt_len=len(call.prompt_token_ids),
            max_new_tokens=call.stopping.max_new_tokens,
            priority=call.priority,
        )
        if self.prefix_cache is not None:
            seq.prefix = self.prefix_cache.lookup(call.prompt_token_ids)
            if seq.prefix is not None:
                # Its prefill goes on from the stored prefix, like a chunk after earlier chunks.
                state.prefilled = len(seq.prefix.tokens)
        self.scheduler.add(state)
        return None

    @property
    def waiting(self) -> list[Sequence]:
        """Queued sequences, in the order they will be admitted."""
        return [self._sequences[s.request_id] for s in self.scheduler.queue_order()]

    @property
    def prefilling(self) -> list[Sequence]:
        """Admitted sequences whose prompt is not yet complete."""
        return [self._sequences[s.request_id] for s in self.scheduler.prefilling]

    def abort(self, request_ids: set[int]) -> list[SequenceEvent]:
        """Drop these requests wherever they are; their slots (and partial caches) are free when this returns."""
        events = [
            self._final_event(seq, FinishReason.ABORTED)
            for seq in (*self.waiting, *self.prefilling)
            if seq.request_id in request_ids
        ]
        leaving = {i for i, seq in enumerate(self.running) if seq.request_id in request_ids}
        if leaving:
            events.extend(self._final_event(self.running[i], FinishReason.ABORTED) for i in sorted(leaving))
            staying = [i for i in range(len(self.running)) if i not in leaving]
            try:
                self._keep_rows(staying)
            except torch.OutOfMemoryError:
                # Filtering copies the cache; a half-filtered batch cannot go on.
                events.extend(self._oom_events([self.running[i] for i in staying]))
                self.running, self.batch = [], None
        self._forget_finished(events)
        return events

    def abort_all(self, kind: ErrorKind, message: str) -> list[SequenceEvent]:
        events = [self._error_event(seq, kind, message) for seq in (*self.running, *self.prefilling, *self.waiting)]
        self.scheduler.clear()
        self._sequences.clear()
        self.running = []
        self.batch = None
        return events

    @property
    def has_work(self) -> bool:
        return bool(self._sequences)

    @property
    def batch_tokens(self) -> int:
        """Tokens reserved by the admitted sequences (running, or prefilling their prompt)."""
        return self.scheduler.admitted_tokens

    # ------------------------------------------------------------ steps

    @torch.inference_mode()
    def step(self) -> tuple[str, list[SequenceEvent]]:
        """Run one step of the scheduler's plan; returns its kind ("decode", "prefill", "mixed" or "") and events."""
        plan = self.scheduler.schedule()
        self.last_decoded = len(plan.decode)
        if plan.empty:
            return "", []
        now = time.time()
        for request_id in plan.admitted:
            self._sequences[request_id].start_time = now
        events: list[SequenceEvent] = []
        if plan.decode:
            # The decode goes first: the running streams get their token before any prompt work.
            events += self._guard_oom(self.running, self._decode, decode=True)
        whole = [self._sequences[c.request_id] for c in plan.chunks if c.whole_prompt]
        for chunk in plan.chunks:
            if not chunk.whole_prompt:
                seq = self._sequences[chunk.request_id]
                events += self._guard_oom([seq], functools.partial(self._prefill_chunk, seq, chunk), decode=False)
        if whole:
            events += self._guard_oom(whole, lambda: self._prefill(whole), decode=False)
        self._forget_finished(events)
        kind = "mixed" if plan.decode and plan.chunks else ("decode" if plan.decode else "prefill")
        return kind, events

    def _prefill(self, admitted: list[Sequence]) -> list[SequenceEvent]:
        """Whole prompts, in padded batches of similar lengths: they get their first token and join the running
        batch."""
        lengths = [len(s.call.prompt_token_ids) for s in admitted]
        parts = []
        # Every forward runs before any token is taken, and until the newcomers are concatenated the running batch
        # is untouched: running out of memory here fails only the newcomers, as they were.
        for group in split_by_length(lengths, self.prefill_cost.tokens()):
            seqs = [admitted[i] for i in group]
            started = time.perf_counter()
            new_batch, logits = KVBatch.prefill(
                self.model, [s.call.prompt_token_ids for s in seqs], self.device, self.pad_token_id
            )
            self._observe_prefill(new_batch.size * new_batch.cache_length, started)
            parts.append((seqs, new_batch, logits))
        return self._join(parts)

    def _observe_prefill(self, padded_tokens: int, started: float) -> None:
        if self._time_prefills:
            self.prefill_cost.observe(padded_tokens, time.perf_counter() - started)

    def _prefill_chunk(self, seq: Sequence, chunk: Chunk) -> list[SequenceEvent]:
        """One chunk of a prompt, on the sequence's own cache; the last chunk's logits give its first token."""
        tokens = seq.call.prompt_token_ids[chunk.start : chunk.start + chunk.length]
        if seq.partial_cache is None and seq.prefix is not None:
            seq.partial_cache = KVBatch.cache_from(seq.prefix.layers)
            seq.prefix = None
        started = time.perf_counter()
        fresh = seq.partial_cache is None
        seq.partial_cache, logits = KVBatch.prefill_chunk(
            self.model, seq.partial_cache, tokens, chunk.start, self.device
        )
        if fresh:  # a forward like a whole prompt's (a chunk after others also attends to what they cached)
            self._observe_prefill(len(tokens), started)
        if not chunk.completes_prompt:
            return []
        new_batch = KVBatch.single(seq.partial_cache, chunk.prompt_len, self.device)
        seq.partial_cache = None
        return self._join([([seq], new_batch, logits)])

    def _join(self, parts: list[tuple[list[Sequence], KVBatch, torch.Tensor]]) -> list[SequenceEvent]:
        """Newly prefilled sequences (batches of them, with the logits after their prompts) get their first token;
        those that go on join the running batch, all of them in one concatenation."""
        events: list[SequenceEvent] = []
        batches, survivors = [], []
        self._advanced = True
        for newcomers, new_batch, logits in parts:
            if self.prefix_cache is not None:
                self._remember_prefixes(newcomers, new_batch)
            accepted, keep = self._accept_tokens(newcomers, logits)
            events += accepted
            if keep:
                new_batch = new_batch.filter(keep)
                staying = [newcomers[i] for i in keep]
                new_batch.set_next_tokens([seq.generated[-1] for seq in staying])
                batches.append(new_batch)
                survivors += staying
        if survivors:
            self._joining = survivors
            self.batch = KVBatch.concatenate([self.batch, *batches] if self.batch is not None else batches)
            self.running.extend(survivors)
            self._joining = []
        self._advanced = False
        return events

    def _remember_prefixes(self, seqs: list[Sequence], batch: KVBatch) -> None:
        """Store the prompts' prefixes from their freshly prefilled (left-padded) batch."""
        assert self.prefix_cache is not None
        for row, seq in enumerate(seqs):
            layers = batch.row_layers(row)
            if layers is None:
                return
            prompt = seq.call.prompt_token_ids
            try:
                self.prefix_cache.store(prompt, layers, start=batch.cache_length - len(prompt))
            except torch.OutOfMemoryError:
                # The prefix cache only saves work: without room for a copy, the request goes on without it.
                self._release_cached_memory()
                return

    def take_prefix_counts(self) -> tuple[int, int, int]:
        """(hits, hit tokens) since the last call, and the prefix cache's size in bytes."""
        if self.prefix_cache is None:
            return 0, 0, 0
        return (*self.prefix_cache.take_counts(), self.prefix_cache.bytes)

    def _decode(self) -> list[SequenceEvent]:
        assert self.batch is not None
        logits = self.batch.decode(self.model)
        events, keep = self._accept_tokens(self.running, logits)
        if len(keep) < len(self.running):
            self._keep_rows(keep)
        if self.running:
            self.batch.set_next_tokens([seq.generated[-1] for seq in self.running])
        return events

    def _keep_rows(self, keep: list[int]) -> None:
        if not keep:
            self.running, self.batch = [], None
            return
        if self.batch is not None:
            self.batch = self.batch.filter(keep)
        self.running = [self.running[i] for i in keep]

    def _forget_finished(self, events: list[SequenceEvent]) -> None:
        """Sequences with a final event leave the scheduler (freeing their slot) and the engine."""
        for event in events:
            if event.finished:
                self.scheduler.finish(event.request_id)
                self._sequences.pop(event.request_id, None)

    def _guard_oom(
        self, seqs: list[Sequence], run: Callable[[], list[SequenceEvent]], decode: bool
    ) -> list[SequenceEvent]:
        """Out of device memory fails requests, not the worker.

        A prefill (or a chunk) that fails before its newcomers join fails only them, and whole prompts whose
        forwards failed are then tried one by one, so that only those that cannot fit fail. A failed decode (forward or
        the filtering after it) or join may leave the cache half-updated, so every running sequence fails too."""
        running_before = list(self.running)
        try:
            return run()
        except torch.OutOfMemoryError as exc:
            batch_touched = decode or bool(self._joining)
            if not batch_touched and not self._advanced and len(seqs) > 1:
                _LOGGER.warning(
                    "out of memory prefilling %d sequences together (x-request-id %s); trying each alone",
                    len(seqs),
                    ", ".join(seq.label for seq in seqs),
                )
                self._release_cached_memory()
                return [
                    e for seq in seqs for e in self._guard_oom([seq], functools.partial(self._prefill, [seq]), False)
                ]
            failed = {seq.request_id: seq for seq in (*seqs, *(running_before if batch_touched else ()))}
            _LOGGER.warning(
                "out of memory in a step, failing %d sequences (x-request-id %s): %s",
                len(failed),
                ", ".join(seq.label for seq in failed.values()),
                exc,
            )
            if batch_touched:
                self.running, self.batch = [], None
            self._joining, self._advanced = [], False
            return self._oom_events(list(failed.values()))

    @staticmethod
    def _release_cached_memory() -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _oom_events(self, seqs: list[Sequence]) -> list[SequenceEvent]:
        self._release_cached_memory()
        return [self._error_event(seq, ErrorKind.RESOURCE_EXHAUSTED, "out of memory on the device") for seq in seqs]

    # ------------------------------------------------------------ per-token bookkeeping

    def _accept_tokens(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[SequenceEvent], list[int]]:
        tokens = sample_next_tokens(logits, [seq.row_sampling() for seq in seqs], self._eos_list)
        events, keep = [], []
        for row, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            event = self._advance(seq, token)
            events.append(event)
            if not event.finished:
                keep.append(row)
        return events, keep

    def _advance(self, seq: Sequence, token: int) -> SequenceEvent:
        seq.generated.append(token)
        stopping = seq.call.stopping
        finish = FinishReason.UNSPECIFIED
        if token in self.eos_token_ids and not stopping.ignore_eos:
            text, finish = seq.detokenizer.flush(), FinishReason.END_OF_SEQUENCE
        else:
            text, stopped = seq.detokenizer.add_token(token)
            if stopped:
                finish = FinishReason.STOP_SEQUENCE
            elif len(seq.generated) >= stopping.max_new_tokens:
                text += seq.detokenizer.flush()
                finish = FinishReason.LENGTH
        event = SequenceEvent(
            request_id=seq.request_id,
            token_ids=[token],
            text=text,
            finish_reason=finish,
            prompt_tokens=len(seq.call.prompt_token_ids),
            completion_tokens=len(seq.generated),
        )
        if not seq.started_reported:
            event.start_time = seq.start_time
            seq.started_reported = True
        return event

    def _final_event(self, seq: Sequence, reason: FinishReason) -> SequenceEvent:
        return SequenceEvent(
            request_id=seq.request_id,
            finish_reason=reason,
            prompt_tokens=len(seq.call.prompt_token_ids),
            completion_tokens=len(seq.generated),
        )

    def _error_event(self, seq: Sequence, kind: ErrorKind, message: str) -> SequenceEvent:
        event = self._final_event(seq, FinishReason.ERROR)
        event.error_kind, event.error = kind, message
        return event
