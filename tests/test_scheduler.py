"""The batching policy (workers/scheduler.py) driven with plain numbers: no model, no torch."""

from __future__ import annotations

import pytest

from workers.scheduler import Budgets, Chunk, Scheduler, SequenceState


def seq(request_id, prompt_len, max_new=10, priority=0):
    return SequenceState(request_id=request_id, prompt_len=prompt_len, max_new_tokens=max_new, priority=priority)


def make(max_batch_size=8, max_batch_tokens=10_000, max_step_tokens=16, max_overtakes=32, *seqs):
    s = Scheduler(Budgets(max_batch_size, max_batch_tokens, max_step_tokens, max_overtakes))
    for q in seqs:
        s.add(q)
    return s


def chunks(plan):
    return [(c.request_id, c.start, c.length) for c in plan.chunks]


def test_a_long_prompt_is_prefilled_in_chunks_while_every_running_sequence_decodes():
    s = make(8, 10_000, 16, 32, seq(1, 3), seq(2, 3), seq(3, 3))
    first = s.schedule()
    assert first.decode == [] and first.admitted == [1, 2, 3] and chunks(first) == [(1, 0, 3), (2, 0, 3), (3, 0, 3)]
    assert all(c.whole_prompt for c in first.chunks) and sorted(s.running) == [1, 2, 3]
    s.add(seq(4, 40))
    plans = [s.schedule() for _ in range(4)]
    # 3 decodes leave 13 tokens a step for the prompt: 13 + 13 + 13 + 1.
    assert [sorted(p.decode) for p in plans] == [[1, 2, 3]] * 3 + [[1, 2, 3]]
    assert [chunks(p) for p in plans] == [[(4, 0, 13)], [(4, 13, 13)], [(4, 26, 13)], [(4, 39, 1)]]
    assert [p.tokens for p in plans] == [16, 16, 16, 4]
    assert [c.completes_prompt for p in plans for c in p.chunks] == [False, False, False, True]
    assert not any(c.whole_prompt for p in plans for c in p.chunks)
    assert sorted(s.running) == [1, 2, 3, 4] and s.prefilling == []
    assert sorted(s.schedule().decode) == [1, 2, 3, 4]


@pytest.mark.parametrize("prompt_len, pieces", [(15, [15]), (16, [16]), (17, [16, 1]), (35, [16, 16, 3])])
def test_chunks_straddle_the_budget_edges(prompt_len, pieces):
    s = make(4, 10_000, 16, 32, seq(1, prompt_len))
    got = []
    while s.prefilling or s.waiting:
        plan = s.schedule()
        got += [c.length for c in plan.chunks]
        assert sum(c.length for c in plan.chunks) <= 16
    assert got == pieces and list(s.running) == [1]


def test_partial_prompts_go_on_before_new_ones_are_admitted():
    s = make(8, 10_000, 16, 32, seq(1, 30), seq(2, 5))
    assert chunks(s.schedule()) == [(1, 0, 16)]  # 2 is not admitted: no token left this step
    assert s.waiting[0].request_id == 2 and [q.request_id for q in s.prefilling] == [1]
    assert chunks(s.schedule()) == [(1, 16, 14), (2, 0, 2)]
    # 1 is running now (its first token came from its last chunk), so it decodes in the next step.
    plan = s.schedule()
    assert plan.decode == [1] and chunks(plan) == [(2, 2, 3)]


def test_unchunked_prefills_every_prompt_that_fits_whole():
    s = make(8, 10_000, 0, 32, seq(1, 3000), seq(2, 7))
    plan = s.schedule()
    assert chunks(plan) == [(1, 0, 3000), (2, 0, 7)] and all(c.whole_prompt for c in plan.chunks)
    assert sorted(s.schedule().decode) == [1, 2]


def test_prefilling_sequences_hold_their_slot_and_tokens():
    s = make(2, 100, 16, 32, seq(1, 40, max_new=10), seq(2, 5, max_new=45), seq(3, 2, max_new=2))
    s.schedule()
    assert [q.request_id for q in s.prefilling] == [1] and s.admitted_tokens == 50
    s.schedule()  # 1 goes on (16 tokens); 2 has no tokens left this step
    plan = s.schedule()  # 1 ends with 8 tokens; 2 is admitted with the other 8: 50 + 50 = 100 tokens
    assert plan.admitted == [2] and s.admitted_count == 2 and s.admitted_tokens == 100
    for _ in range(3):
        assert s.schedule().admitted == []  # no slot for 3
    s.finish(2)  # 2 ends (or is aborted) half-prefilled: its slot and tokens are free
    assert s.schedule().admitted == [3] and s.admitted_tokens == 54


def test_admission_stops_at_the_first_request_that_does_not_fit():
    s = make(8, 400, 0, 32, seq(0, 190), seq(1, 140), seq(2, 40), seq(3, 1))
    assert s.schedule().admitted == [0, 1, 2]  # exactly 400 tokens
    assert s.schedule().admitted == [] and [q.request_id for q in s.waiting] == [3]
    s = make(8, 400, 0, 32, seq(0, 290), seq(1, 140), seq(2, 40))
    assert s.schedule().admitted == [0]  # 150 does not fit, and 50 must not overtake it


def test_finish_forgets_a_sequence_wherever_it_is():
    s = make(8, 10_000, 16, 32, seq(1, 3), seq(2, 40), seq(3, 5))
    s.schedule()  # 1 running, 2 prefilling; 3 waits
    assert [s.finish(i).request_id for i in (1, 2, 3)] == [1, 2, 3]
    assert s.finish(4) is None
    assert not s.running and not s.prefilling and not s.waiting and s.schedule().empty


def test_a_step_budget_not_above_the_batch_size_is_refused():
    with pytest.raises(ValueError, match="max_step_tokens"):
        Scheduler(Budgets(max_batch_size=16, max_batch_tokens=100, max_step_tokens=16))
    Scheduler(Budgets(max_batch_size=16, max_batch_tokens=100, max_step_tokens=0))


def test_chunk_flags():
    assert Chunk(1, 0, 5, 5).whole_prompt and Chunk(1, 0, 5, 5).completes_prompt
    assert not Chunk(1, 0, 4, 5).whole_prompt and not Chunk(1, 0, 4, 5).completes_prompt
    assert not Chunk(1, 1, 4, 5).whole_prompt and Chunk(1, 1, 4, 5).completes_prompt


# ---------------------------------------------------------------- priorities and starvation


def admitted_order(s, steps=50):
    """Request ids in the order of admission, finishing each running sequence one step after it starts."""
    order = []
    for _ in range(steps):
        for request_id in list(s.running):
            s.finish(request_id)
        order += s.schedule().admitted
    return order


def test_higher_priority_is_admitted_first_and_first_come_first_served_within_a_priority():
    s = make(1, 10_000, 0, 32, seq(0, 5))
    assert s.schedule().admitted == [0]  # the batch (one slot) is full
    for request_id, priority in [(1, 0), (2, 0), (3, 0), (4, 5), (5, -3), (6, 5)]:
        s.add(seq(request_id, 5, priority=priority))
    assert [q.request_id for q in s.queue_order()] == [4, 6, 1, 2, 3, 5]
    assert admitted_order(s) == [4, 6, 1, 2, 3, 5]


def test_a_high_priority_request_that_does_not_fit_is_not_overtaken():
    s = make(8, 100, 0, 32, seq(0, 60, max_new=10))
    s.schedule()
    s.add(seq(1, 40, max_new=10))  # 50 tokens: no room beside 0
    s.add(seq(2, 5, max_new=5, priority=9))  # fits, and goes first by priority
    s.add(seq(3, 35, max_new=10, priority=9))  # 45: does not fit yet
    assert s.schedule().admitted == [2]
    assert s.schedule().admitted == []  # 3 waits at the head; 1 must not pass it
    s.finish(0)
    assert s.schedule().admitted == [3]


@pytest.mark.parametrize("max_overtakes", [1, 3, 8])
def test_a_low_priority_request_is_overtaken_at_most_max_overtakes_times(max_overtakes):
    """A flood of high-priority arrivals, one slot: the low-priority request still starts after exactly
    `max_overtakes` of them."""
    s = make(1, 10_000, 0, max_overtakes, seq(0, 5))
    s.schedule()
    s.add(seq(1, 5, priority=-10))
    order, next_id = [], 100
    for _ in range(40):
        s.add(seq(next_id, 5, priority=10))  # a new high-priority request every step
        next_id += 1
        for request_id in list(s.running):
            s.finish(request_id)
        order += s.schedule().admitted
    assert 1 in order and order.index(1) == max_overtakes
    assert all(request_id >= 100 for request_id in order[: order.index(1)])


def test_starving_requests_go_first_oldest_first():
    s = make(1, 10_000, 0, 2, seq(0, 5))
    s.schedule()
    s.add(seq(1, 5, priority=-5))
    s.add(seq(2, 5, priority=-1))
    for request_id in (3, 4):
        s.add(seq(request_id, 5, priority=7))
    # 3 and 4 overtake both; then 1 and 2 have been overtaken twice and go first, oldest first, before 5.
    s.add(seq(5, 5, priority=7))
    assert admitted_order(s) == [3, 4, 1, 2, 5]
