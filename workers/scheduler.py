"""The batching policy: which sequences a step decodes, which prompt chunks it prefills, which requests it admits.

Plain numbers only (no torch, no model), in the way of vLLM's scheduler: the
engine asks `schedule()` for a `StepPlan`, runs it on tensors, then tells the
scheduler what ended (`finish`). The plan is booked when it is made: chunks
count as prefilled and a sequence whose prompt is complete counts as running,
because the engine either runs the plan or fails (and then `finish`es) the
sequences it could not run.

A sequence is waiting (queued, holds nothing), prefilling (admitted: holds a
batch slot and its reserved tokens, part of its prompt is in its own cache) or
running (in the decoding batch). Every step decodes every running sequence; the
rest of the per-step token budget goes to prompt chunks, first those of
sequences already being prefilled (in admission order), then those of newly
admitted ones. Admission takes the waiting sequence of highest priority (first
come, first served within a priority) and stops at the first that does not fit
the batch limits, so a large request is never overtaken by smaller ones of the
same rank. Starvation is bounded by counting overtakes: a waiting sequence that
later arrivals (of higher priority) have overtaken `max_overtakes` times goes
to the head of the queue, whatever its priority.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SequenceState:
    """What the policy knows of one sequence."""

    request_id: int
    prompt_len: int
    max_new_tokens: int
    # Larger runs first.
    priority: int = 0
    # Set by `Scheduler.add`: the order of arrival.
    arrival: int = 0
    # Prompt tokens already in the sequence's cache (after the chunks planned so far).
    prefilled: int = 0
    # How many later arrivals were admitted while this one waited.
    overtaken: int = 0

    @property
    def reserved_tokens(self) -> int:
        """Tokens this sequence may hold at most: what the batch-token limit counts."""
        return self.prompt_len + self.max_new_tokens


@dataclass(frozen=True)
class Budgets:
    max_batch_size: int
    # Sum of reserved tokens over admitted (prefilling or running) sequences.
    max_batch_tokens: int
    # Tokens one step computes: one per decoded sequence plus the prompt chunks; 0 = no limit (unchunked).
    max_step_tokens: int = 0
    # A waiting sequence overtaken this many times goes first.
    max_overtakes: int = 32


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens [start, start + length) of one sequence, computed in this step."""

    request_id: int
    start: int
    length: int
    prompt_len: int

    @property
    def whole_prompt(self) -> bool:
        return self.start == 0 and self.length == self.prompt_len

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.length == self.prompt_len


@dataclass
class StepPlan:
    # Decode every running sequence (those that were running before this step).
    decode: list[int] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    # Requests taken from the queue in this step (each has a chunk too).
    admitted: list[int] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.chunks

    @property
    def tokens(self) -> int:
        return len(self.decode) + sum(c.length for c in self.chunks)


class Scheduler:
    def __init__(self, budgets: Budgets):
        if 0 < budgets.max_step_tokens <= budgets.max_batch_size:
            # Otherwise a full batch of decodes could leave no token for prompts, and the queue would never move.
            raise ValueError(
                f"max_step_tokens ({budgets.max_step_tokens}) must exceed max_batch_size ({budgets.max_batch_size})"
            )
        self.budgets = budgets
        self.waiting: list[SequenceState] = []
        self.prefilling: list[SequenceState] = []  # admission order
        self.running: dict[int, SequenceState] = {}
        self._arrivals = 0

    # ------------------------------------------------------------ bookkeeping

    def add(self, seq: SequenceState) -> None:
        seq.arrival = self._arrivals
        self._arrivals += 1
        self.waiting.append(seq)

    def finish(self, request_id: int) -> SequenceState | None:
        """Forget a sequence wherever it is (finished, aborted or failed); its slot and tokens are free."""
        if request_id in self.running:
            return self.running.pop(request_id)
        for queue in (self.waiting, self.prefilling):
            for i, seq in enumerate(queue):
                if seq.request_id == request_id:
                    return queue.pop(i)
        return None

    def clear(self) -> None:
        self.waiting.clear()
        self.prefilling.clear()
        self.running.clear()

    @property
    def admitted_tokens(self) -> int:
        return sum(s.reserved_tokens for s in (*self.running.values(), *self.prefilling))

    @property
    def admitted_count(self) -> int:
        return len(self.running) + len(self.prefilling)

    def queue_order(self) -> list[SequenceState]:
        """The waiting sequences in the order admission takes them."""
        limit = self.budgets.max_overtakes
        # Starving sequences first (oldest first), then by priority, then first come, first served.
        return sorted(
            self.waiting, key=lambda s: (0, s.arrival, 0) if s.overtaken >= limit else (1, -s.priority, s.arrival)
        )

    # ------------------------------------------------------------ the policy

    def schedule(self) -> StepPlan:
        plan = StepPlan(decode=list(self.running))
        budget = self.budgets.max_step_tokens
        left = budget - len(plan.decode) if budget else None  # None: no limit

        def take(seq: SequenceState) -> bool:
            nonlocal left
            need = seq.prompt_len - seq.prefilled
            length = need if left is None else min(need, left)
            if length <= 0:
                return False
            plan.chunks.append(Chunk(seq.request_id, seq.prefilled, length, seq.prompt_len))
            seq.prefilled += length
            if left is not None:
                left -= length
            return True

        for seq in list(self.prefilling):
            if not take(seq):
                break
        tokens, count = self.admitted_tokens, self.admitted_count
        for seq in self.queue_order():
            if left is not None and left <= 0:
                break
            if count >= self.budgets.max_batch_size or tokens + seq.reserved_tokens > self.budgets.max_batch_tokens:
                break  # the head waits for room; nothing behind it overtakes it
            self.waiting.remove(seq)
            for other in self.waiting:
                if other.arrival < seq.arrival:
                    other.overtaken += 1
            self.prefilling.append(seq)
            plan.admitted.append(seq.request_id)
            tokens, count = tokens + seq.reserved_tokens, count + 1
            take(seq)
        # Sequences whose prompt is now complete get their first token in this step, and run from the next one.
        for seq in [s for s in self.prefilling if s.prefilled == s.prompt_len]:
            self.prefilling.remove(seq)
            self.running[seq.request_id] = seq
        return plan
