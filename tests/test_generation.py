"""Generate and StreamGenerate through gRPC against the real server: text, streaming, stops, seeds, workers."""

from __future__ import annotations

import concurrent.futures

import pytest

from modelpool import ModelpoolError
from modelpool.v1 import generation_pb2 as pb

CHAT = [("system", "You are terse."), ("user", "Tell me about the sea.")]


def stream_pieces(client, **kwargs) -> list[pb.StreamGenerateResponse]:
    return list(client.stream(**kwargs))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def test_unary_raw_prompt(client, tokenizer):
    reply = client.generate("The quick brown fox", max_new_tokens=12, ignore_eos=True)
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH
    assert reply.usage.completion_tokens == 12
    assert len(reply.token_ids) == 12
    assert reply.usage.prompt_tokens == len(tokenizer("The quick brown fox")["input_ids"])
    # The text is exactly what the token ids decode to, after the prompt.
    prompt_ids = tokenizer("The quick brown fox")["input_ids"]
    full = tokenizer.decode(prompt_ids + list(reply.token_ids), skip_special_tokens=True)
    assert full == tokenizer.decode(prompt_ids, skip_special_tokens=True) + reply.text
    assert reply.model == "tiny"
    assert reply.timings.total_seconds >= reply.timings.time_to_first_token_seconds > 0


@pytest.mark.parametrize("use_chat", [False, True], ids=["prompt", "chat"])
def test_stream_deltas_concatenate_to_unary_text(client, use_chat):
    request = {"messages": CHAT} if use_chat else {"prompt": "Once upon a time"}
    options = {"max_new_tokens": 24, "ignore_eos": True}
    unary = (client.chat(CHAT, **options) if use_chat else client.generate("Once upon a time", **options))
    pieces = stream_pieces(client, **request, **options)
    assert "".join(p.text_delta for p in pieces) == unary.text
    assert [t for p in pieces for t in p.token_ids] == list(unary.token_ids)
    last = pieces[-1]
    assert last.finish_reason == unary.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage == unary.usage
    assert all(p.finish_reason == pb.FINISH_REASON_UNSPECIFIED for p in pieces[:-1])


def test_stream_interval_groups_tokens_after_the_first_and_changes_no_token(client):
    """The model `interval` (the tiny model, stream_interval = 4): the first token is sent as soon as it is there,
    then messages of at least four tokens (more when the reader lags), the last with what is left."""
    options = {"prompt": "Once upon a time", "max_new_tokens": 23, "ignore_eos": True}
    plain = stream_pieces(client, **options)
    grouped = stream_pieces(client, model="interval", **options)
    assert [t for p in grouped for t in p.token_ids] == [t for p in plain for t in p.token_ids]
    assert "".join(p.text_delta for p in grouped) == "".join(p.text_delta for p in plain)
    sizes = [len(p.token_ids) for p in grouped]
    assert sum(sizes) == 23 and sizes[0] >= 1 and all(size >= 4 for size in sizes[1:-1]), sizes
    assert len(grouped) <= 1 + -(-(23 - sizes[0]) // 4)
    last = grouped[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.completion_tokens == 23
    assert list(client.generate(model="interval", **options).token_ids) == [t for p in grouped for t in p.token_ids]


def test_chat_uses_the_chat_template(client):
    chat = client.chat([("user", "hello")], max_new_tokens=4, ignore_eos=True)
    raw = client.generate("hello", max_new_tokens=4, ignore_eos=True)
    # The template wraps the message in turn markers, so the prompt is longer than the bare text.
    assert chat.usage.prompt_tokens > raw.usage.prompt_tokens + 3


def test_stop_sequence_is_cut_exactly(client, tokenizer):
    base = client.generate("Stop test:", max_new_tokens=40, ignore_eos=True)
    text = base.text
    # A stop sequence taken from the middle of what the model writes anyway.
    start = next(i for i in range(len(text) // 3, len(text) - 3) if text[i : i + 3].strip() == text[i : i + 3])
    stop = text[start : start + 3]
    expected = text[: text.index(stop)]
    unary = client.generate("Stop test:", max_new_tokens=40, ignore_eos=True, stop_sequences=[stop])
    assert unary.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert unary.text == expected
    # token_ids keep the tokens that made the stop sequence: they are the unstopped run's first tokens.
    n = unary.usage.completion_tokens
    assert list(unary.token_ids) == list(base.token_ids[:n]) and len(unary.token_ids) == n
    assert stop in tokenizer.decode(list(unary.token_ids), skip_special_tokens=True)
    pieces = stream_pieces(client, prompt="Stop test:", max_new_tokens=40, ignore_eos=True, stop_sequences=[stop])
    assert "".join(p.text_delta for p in pieces) == expected
    assert pieces[-1].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE


def test_seed_reproducibility(client):
    options = {"max_new_tokens": 20, "ignore_eos": True, "temperature": 1.0, "top_k": 50}
    first = client.generate("Random words:", seed=1234, **options)
    again = client.generate("Random words:", seed=1234, **options)
    other = client.generate("Random words:", seed=4321, **options)
    assert list(first.token_ids) == list(again.token_ids)
    assert first.text == again.text
    assert list(first.token_ids) != list(other.token_ids)


def test_greedy_is_deterministic(client):
    a = client.generate("Count:", max_new_tokens=10, ignore_eos=True)
    b = client.generate("Count:", max_new_tokens=10, ignore_eos=True)
    assert a.usage.completion_tokens == 10
    assert list(a.token_ids) == list(b.token_ids)


PARIS = [("user", "What is the capital of France?")]


@pytest.mark.builtin
def test_min_new_tokens_keeps_the_end_of_sequence_away(client):
    free = client.chat(PARIS, model="builtin", max_new_tokens=40)
    assert free.finish_reason == pb.FINISH_REASON_END_OF_SEQUENCE and free.usage.completion_tokens < 20
    held = client.chat(PARIS, model="builtin", max_new_tokens=40, min_new_tokens=25)
    assert held.usage.completion_tokens >= 25
    # Greedy, so the same answer starts both; the held one goes on where the free one ended.
    assert list(held.token_ids[: free.usage.completion_tokens - 1]) == list(free.token_ids[:-1])


def test_temperature_zero_means_one(client):
    options = {"max_new_tokens": 12, "ignore_eos": True, "do_sample": True, "seed": 77}
    zero = client.generate("Random words:", temperature=0, **options)
    one = client.generate("Random words:", temperature=1.0, **options)
    hot = client.generate("Random words:", temperature=5.0, **options)
    assert list(zero.token_ids) == list(one.token_ids)
    assert list(hot.token_ids) != list(one.token_ids)


def test_top_k_one_is_greedy(client):
    greedy = client.generate("Random words:", max_new_tokens=12, ignore_eos=True)
    for seed in (1, 2):
        sampled = client.generate("Random words:", max_new_tokens=12, ignore_eos=True, do_sample=True,
                                  temperature=1.5, top_k=1, seed=seed)
        assert list(sampled.token_ids) == list(greedy.token_ids)
    wide = client.generate("Random words:", max_new_tokens=12, ignore_eos=True, do_sample=True, temperature=1.5,
                           top_k=50, seed=1)
    assert list(wide.token_ids) != list(greedy.token_ids)


def test_stop_sequence_limits(client):
    import grpc

    ok = client.generate("x", max_new_tokens=2, ignore_eos=True, stop_sequences=[f"{i:03d}" + "s" * 253 for i in range(16)])
    assert ok.usage.completion_tokens == 2
    for stops, field in (([f"{i}" for i in range(17)], "stopping.stop_sequences"), (["s" * 257], "stopping.stop_sequences[0]")):
        with pytest.raises(ModelpoolError) as err:
            client.generate("x", max_new_tokens=2, stop_sequences=stops)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.message.startswith(field + ":")


def test_queue_time_is_reported(client):
    """`limited` runs one sequence at a time: a request behind another waits, and its timings say so."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.generate, "first", model="limited", max_new_tokens=300, ignore_eos=True)
        from tests.helpers import load, wait_until

        wait_until(lambda: load(client, "limited")[0] == 1, what="first running")
        second = client.generate("second", model="limited", max_new_tokens=3, ignore_eos=True)
        first = first.result()
    t = second.timings
    assert 0 < t.queue_seconds < t.time_to_first_token_seconds <= t.total_seconds
    assert first.timings.queue_seconds < t.queue_seconds


def test_two_workers_both_serve_with_their_own_devices(client):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: client.generate(f"Request {i}", max_new_tokens=16, ignore_eos=True), range(8)))
    assert all(r.usage.completion_tokens == 16 for r in replies)
    tiny = next(m for m in client.models() if m.name == "tiny")
    assert [w.cuda_visible_devices for w in tiny.workers] == ["0", "1"]
    assert all(w.state == pb.WORKER_STATE_READY for w in tiny.workers)
    assert len({w.pid for w in tiny.workers}) == 2
    assert all(w.completed_requests > 0 for w in tiny.workers), [w.completed_requests for w in tiny.workers]


def test_list_models(client):
    models = {m.name: m for m in client.models()}
    assert set(models) == {"tiny", "nochat", "limited", "fragile", "interval", "builtin"}
    tiny = models["tiny"]
    assert tiny.is_default and tiny.dtype == "float32" and tiny.context_length == 512
    assert tiny.has_chat_template and not models["nochat"].has_chat_template
    assert tiny.workers[0].devices == ["cpu"]
    assert dict(tiny.workers[0].device_map_summary) == {"cpu": 1}  # no device_map on a CPU: the whole model
    assert models["builtin"].source == "builtin"


@pytest.mark.builtin
def test_builtin_model_knows_paris(client):
    reply = client.chat([("user", "What is the capital of France?")], model="builtin", max_new_tokens=20)
    assert "Paris" in reply.text
    assert reply.finish_reason == pb.FINISH_REASON_END_OF_SEQUENCE


@pytest.mark.builtin
def test_chinese_streams_without_broken_characters(client):
    messages = [("user", "请用中文回答：中国的首都是哪里？")]
    pieces = stream_pieces(client, messages=messages, model="builtin", max_new_tokens=40, ignore_eos=True)
    unary = client.chat(messages, model="builtin", max_new_tokens=40, ignore_eos=True)
    assert unary.usage.completion_tokens == pieces[-1].usage.completion_tokens == 40
    assert all("\ufffd" not in p.text_delta for p in pieces)
    assert "".join(p.text_delta for p in pieces) == unary.text
    # The model answers with non-ASCII text, so multi-byte characters did cross token boundaries.
    assert any(ord(ch) > 0x2E80 for ch in unary.text), unary.text


def test_unknown_default_model_field_routes_to_default(client):
    reply = client.generate("x", model="", max_new_tokens=2, ignore_eos=True)
    assert reply.model == "tiny"


def test_concurrent_requests_match_each_run_alone(client):
    """Through the whole service: batching (sequences joining and leaving) does not change any result."""
    jobs = [
        {"prompt": f"Job {i}: " + "word " * (i * 3), "max_new_tokens": 6 + 9 * i, "ignore_eos": True,
         **({"temperature": 0.9, "top_p": 0.95, "seed": i} if i % 2 else {"repetition_penalty": 1.3})}
        for i in range(6)
    ]
    alone = [list(client.generate(**job).token_ids) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: list(client.generate(**job).token_ids), jobs))
    assert together == alone
