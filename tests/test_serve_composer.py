"""Composer helpers and engines without Ray: parameters, template, EOS/pad rules, batching, streaming, adapters."""

from __future__ import annotations

import dataclasses

import pytest

from chatmusician.abc.grammar import AbcConstraints
from chatmusician.prompts import build_chat_prompt
from chatmusician.serve.config import EngineConfig, GenerationDefaults
from chatmusician.serve.engines.base import finish, generation_kwargs, logprob_ids, split_at_eos
from chatmusician.serve.engines.echo import EchoEngine
from chatmusician.serve.engines.hf import TransformersEngine, group_by_adapter
from chatmusician.serve.requests import prepare_request, resolve_params
from chatmusician.serve.types import ComposeError, GenerationParams

DEFAULTS = GenerationDefaults()


def params(**overrides) -> GenerationParams:
    return resolve_params(overrides, DEFAULTS, max_new_tokens_cap=2048)


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    return TransformersEngine(EngineConfig(model=tiny_model_path, max_prompt_tokens=256, torch_threads=1))


def test_defaults_are_the_originals_and_overrides_apply():
    p = params()
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_new_tokens) == (
        0.2,
        0.9,
        40,
        1.1,
        1536,
    )
    assert params(temperature=0, max_new_tokens=7, top_k=None).max_new_tokens == 7
    assert params(top_k=None).top_k == 40  # None means "server default"


@pytest.mark.parametrize(
    "overrides, code, param",
    [
        ({"max_new_tokens": 2049}, "invalid_parameter", "max_new_tokens"),  # over the cap
        ({"max_new_tokens": 0}, "invalid_parameter", "max_new_tokens"),
        ({"temperature": -0.1}, "invalid_parameter", "temperature"),
        ({"top_p": 0}, "invalid_parameter", "top_p"),
        ({"top_k": 2.5}, "invalid_parameter", "top_k"),
        ({"repetition_penalty": "high"}, "invalid_parameter", "repetition_penalty"),
        ({"temperature": True}, "invalid_parameter", "temperature"),
        ({"beams": 4}, "unknown_parameter", "beams"),
    ],
)
def test_bad_parameters_are_refused_with_a_code(overrides, code, param):
    with pytest.raises(ComposeError) as err:
        params(**overrides)
    assert (err.value.code, err.value.param, err.value.status) == (code, param, 400)


def test_generation_kwargs_stop_at_eos_never_sample_pad_and_leave_sampling_to_the_row_sampler():
    kw = generation_kwargs(params(), eos_id=2, pad_id=0)
    assert kw["eos_token_id"] == 2 and kw["suppress_tokens"] == [0] and kw["max_new_tokens"] == 1536
    # generate() only takes the argmax of RowSampler's one-hot scores: no global-RNG sampling, no HF warpers
    assert not kw["do_sample"] and not {"temperature", "top_p", "top_k", "repetition_penalty"} & set(kw)
    sampling = params().sampling()
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.repetition_penalty) == (
        0.2,
        0.9,
        40,
        1.1,
    )


def test_openai_routes_take_openai_defaults_and_top_k_minus_one_means_off(engine):
    config = dataclasses.replace(engine.config, generation=DEFAULTS)
    request = {"prompt": "Compose a jig.", "params": {"temperature": 0.5}}
    demo = prepare_request(engine, config, request)[1]
    openai = prepare_request(engine, config, {**request, "defaults": "openai"})[1]
    assert (demo.top_p, demo.top_k, demo.repetition_penalty) == (0.9, 40, 1.1)
    assert (openai.temperature, openai.top_p, openai.top_k, openai.repetition_penalty) == (0.5, 1.0, 0, 1.0)
    assert params(top_k=-1).top_k == 0
    with pytest.raises(ComposeError):
        params(top_k=-2)


def test_logprob_entries_include_the_eos_that_ended_the_answer():
    assert logprob_ids([5, 6], [5, 6, 2, 0], eos_id=2, stopped=False) == [5, 6, 2]
    assert logprob_ids([5, 6], [5, 6, 2], eos_id=2, stopped=True) == [5, 6]  # a stop string ended it
    assert logprob_ids([5], [5, 6, 2], eos_id=2, stopped=False) == [5]  # cut back: no EOS after it
    assert logprob_ids([5, 6, 7], [5, 6, 7], eos_id=2, stopped=False) == [5, 6, 7]


def test_every_engine_ends_an_answer_the_same_way(engine):
    tok = engine.tokenizer
    ids = tok("X:1\nK:G\nGAB|cde|", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    # A stop string: the text is cut before it, the ids end at the token that completed it, no EOS entry.
    kept, text, scored, stopped = finish(tok, ids, [*ids, eos], eos, ["|c"], engine_stopped=False)
    assert (
        stopped and text == "X:1\nK:G\nGAB" and "|c" in tok.decode(kept) and "|c" not in tok.decode(kept[:-1])
    )
    assert scored == kept
    # EOS ended it: every token and the EOS get an entry, the text is the whole answer.
    kept, text, scored, stopped = finish(tok, ids, [*ids, eos], eos, [], engine_stopped=False)
    assert (kept, text, scored, stopped) == (
        ids,
        tok.decode(ids, skip_special_tokens=True),
        [*ids, eos],
        False,
    )
    # The engine itself stopped at a stop string (vLLM): no EOS entry either.
    assert finish(tok, ids, [*ids, eos], eos, [], engine_stopped=True)[2] == ids


def test_split_at_eos_and_finish_reason():
    assert split_at_eos([5, 6, 2, 0, 0], eos_id=2, max_new_tokens=5) == ([5, 6], "stop")
    assert split_at_eos([5, 6, 7], eos_id=2, max_new_tokens=3) == ([5, 6, 7], "length")


def test_requests_share_a_batch_by_adapter_whatever_their_budgets_and_seeds(engine):
    assert group_by_adapter([None, None, "sft", None, "sft"]) == [[0, 1, 3], [2, 4]]
    # A seeded row answers the same alone and in a batch of other prompts (its own generator), and so does a row
    # whose budget is shorter than the batch's longest (its own stop).
    p = params(max_new_tokens=10, temperature=1.0, seed=7)
    item = (engine.prepare("Compose a jig."), p)
    short = (engine.prepare("A reel " * 3), params(max_new_tokens=3, temperature=0))
    others = [
        (engine.prepare(q), params(max_new_tokens=n, temperature=1.0)) for q, n in (("Hi", 16), ("A", 12))
    ]
    together = engine.generate([others[0], item, short, others[1]])
    assert together[1] == engine.generate([item])[0]
    assert together[2] == engine.generate([short])[0]
    assert together[2].completion_tokens == 3 and together[2].finish_reason == "length"
    assert [c.completion_tokens <= n for c, n in zip(together, (16, 10, 3, 12), strict=True)] == [True] * 4


def test_a_rows_answer_is_handed_over_when_the_row_finishes_not_when_the_batch_does(engine):

    handed: list[tuple[str, int]] = []
    short = engine.prepare("Compose a jig.")
    short.on_done = lambda c: handed.append(("short", c.completion_tokens))
    long = engine.prepare("Compose a reel.")
    long.on_done = lambda c: handed.append(("long", c.completion_tokens))
    texts: list[str] = []
    long.on_text = texts.append
    out = engine.generate(
        [(long, params(max_new_tokens=40, temperature=0)), (short, params(max_new_tokens=4, temperature=0))]
    )
    assert [name for name, _ in handed] == ["short", "long"]  # the short row first, in its own step
    assert handed == [("short", out[1].completion_tokens), ("long", out[0].completion_tokens)]
    assert "".join(texts) == out[0].text and len(texts) > 1  # the streamed row's pieces add up to its answer


def test_prompt_is_the_exact_template_with_history_and_no_bos(engine):
    history = [("Compose a jig.", "X:1\nK:G\nGAB|"), ("Now in D.", "X:1\nK:D\nDEF|")]
    prepared = engine.prepare("And a reel?", history)
    expected = build_chat_prompt("And a reel?", history)
    assert expected.startswith("Human: Compose a jig. </s> Assistant: X:1") and expected.endswith(
        "Human: And a reel? </s> Assistant: "
    )
    assert prepared.ids == engine.tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert prepared.ids[0] != engine.tokenizer.bos_token_id
    assert prepared.ids.count(engine.eos_id) == 5  # one </s> per closed turn part


def test_too_long_or_empty_prompt_is_refused(engine):
    with pytest.raises(ComposeError) as err:
        engine.prepare("ABC " * 400)
    assert err.value.code == "context_length_exceeded" and err.value.status == 400  # OpenAI's and vLLM's
    with pytest.raises(ComposeError) as err:
        engine.prepare("   ")
    assert err.value.code == "empty_prompt"
    with pytest.raises(ComposeError) as err:
        engine.prepare("hi", [("only a question",)])
    assert err.value.code == "invalid_history"


def test_batched_generation_equals_one_by_one(engine):
    """Left padding and attention masks must not change any answer (greedy decoding)."""
    greedy = params(temperature=0, max_new_tokens=12)
    prompts = ["Compose a reel in D.", "Hi", "Develop a tune influenced by Bach's compositions. " * 3]
    items = [(engine.prepare(p), greedy) for p in prompts]
    batched = engine.generate(items)
    for item, together in zip(items, batched, strict=True):
        alone = engine.generate([item])[0]
        assert together == alone
        assert together.completion_tokens == 12 and together.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_streaming_matches(engine):
    p = params(max_new_tokens=10, temperature=1.0, seed=7)
    prepared = engine.prepare("Compose a jig.")
    first, second = engine.generate([(prepared, p)])[0], engine.generate([(prepared, p)])[0]
    assert first == second
    pieces = list(engine.stream(prepared, p))
    assert "".join(pieces[:-1]) == pieces[-1].text == first.text and pieces[-1] == first


@pytest.fixture()
def biased_engine(engine):
    """The engine with its lm_head rigged so that pad (<unk>) then EOS are the most likely tokens."""
    import torch

    head = engine.model.lm_head.weight
    saved = head.detach().clone()
    yield engine, head
    with torch.no_grad():
        head.copy_(saved)


def test_pad_is_never_sampled_and_generation_stops_at_eos(biased_engine):
    import torch

    engine, head = biased_engine
    prepared = engine.prepare("Compose a jig.")
    with torch.no_grad():
        head[engine.pad_id] = head[engine.pad_id] * 0 + 5.0  # pad dominates every step
    ids = torch.tensor([prepared.ids])
    for p in (params(temperature=0, max_new_tokens=8), params(max_new_tokens=8)):
        kwargs = generation_kwargs(p, engine.eos_id, engine.pad_id)
        with torch.no_grad():
            new = engine.model.generate(input_ids=ids, **kwargs)[0, ids.shape[1] :].tolist()
            kwargs.pop("suppress_tokens")  # the control: without the rule, pad is what comes out
            control = engine.model.generate(input_ids=ids, **kwargs)[0, ids.shape[1] :].tolist()
        assert len(new) == 8 and engine.pad_id not in new, new
        assert engine.pad_id in control, control
    out = engine.generate([(prepared, params(temperature=0, max_new_tokens=8))])[0]
    assert out.finish_reason == "length" and out.completion_tokens == 8 and out.text.strip()
    with torch.no_grad():
        head[engine.eos_id] = head[engine.eos_id] * 0 + 10.0  # now EOS dominates: stop at once
    out = engine.generate([(prepared, params(max_new_tokens=8, logprobs=1))])[0]
    assert (out.text, out.finish_reason, out.completion_tokens) == ("", "stop", 1)
    # EOS has its logprob entry (vLLM's shape: lm-eval reads the last entry as the generated token)
    assert [e["id"] for e in out.logprobs] == [engine.eos_id] and out.logprobs[0]["logprob"] > -1


def test_stream_stops_when_the_consumer_leaves(biased_engine, monkeypatch):
    import torch

    engine, head = biased_engine
    with torch.no_grad():
        head[engine.eos_id] = head[engine.eos_id] * 0 - 100.0  # EOS never comes: only cancelling can stop it
    steps = []
    forward = engine.model.forward
    monkeypatch.setattr(engine.model, "forward", lambda *a, **kw: steps.append(1) or forward(*a, **kw))
    pieces = engine.stream(engine.prepare("Compose a jig."), params(temperature=0, max_new_tokens=1000))
    next(pieces)
    pieces.close()  # joins the generate thread
    assert 1 <= len(steps) < 200, len(steps)  # stopped long before its 1000 tokens


def test_adapters_are_merged_in_order(engine, tiny_model_path, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from chatmusician.model.loading import load_model

    torch.manual_seed(0)
    lora = get_peft_model(
        load_model(tiny_model_path),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    lora.save_pretrained(tmp_path / "adapter")
    expected = lora.merge_and_unload()
    adapted = TransformersEngine(dataclasses.replace(engine.config, adapters=[str(tmp_path / "adapter")]))
    ids = torch.tensor([engine.prepare("Compose a jig.").ids])
    with torch.no_grad():
        base, merged, want = (m(ids).logits for m in (engine.model, adapted.model, expected))
    assert torch.allclose(merged, want, atol=1e-5) and not torch.allclose(merged, base, atol=1e-3)


def test_echo_engine_answers_with_the_prompt_within_max_new_tokens():
    echo = EchoEngine(EngineConfig(engine="echo"))
    prepared = echo.prepare("X:1\nK:G\nGAB cde|")
    assert echo.generate([(prepared, params())])[0].text == "X:1\nK:G\nGAB cde|"
    short = echo.generate([(prepared, params(max_new_tokens=2))])[0]
    assert (short.text, short.finish_reason) == ("X:1\nK:G\n", "length")
    pieces = list(echo.stream(prepared, params()))
    assert "".join(pieces[:-1]) == pieces[-1].text


def test_constrained_refuses_stop_strings_and_budgets_below_the_shortest_tune(engine):
    config = engine.config
    request = {"prompt": "Compose a jig.", "constrained": True, "constraints": {"key": "G"}}
    with pytest.raises(ComposeError) as err:
        prepare_request(engine, config, {**request, "params": {"stop": "|"}})
    assert (err.value.param, err.value.status) == ("stop", 400)
    shortest = engine.shortest_tune(AbcConstraints(key="G"))
    assert shortest > 1
    with pytest.raises(ComposeError) as err:
        prepare_request(engine, config, {**request, "params": {"max_new_tokens": shortest - 1}})
    assert (err.value.param, err.value.status) == ("max_tokens", 400) and str(shortest) in err.value.message
    prepared, p = prepare_request(engine, config, {**request, "params": {"max_new_tokens": shortest}})
    answer = engine.generate([(prepared, dataclasses.replace(p, temperature=0.0))])[0]
    assert answer.text.strip()  # the smallest budget allowed still gives a tune, never an empty 200


def test_vllm_rows_ending_with_eos_are_validated(engine, monkeypatch):
    """vLLM's grammar lets EOS through where the grammar accepts; a tune the validator refuses must not stand."""
    import chatmusician.model.constrained as constrained
    from chatmusician.serve.engines.vllm_engine import VllmEngine

    vllm = VllmEngine.__new__(VllmEngine)  # the pure finishing logic only: no vLLM started
    vllm.tokenizer, vllm.eos_id = engine.tokenizer, engine.eos_id
    constraints = AbcConstraints()
    text = "X:1\nL:1/8\nM:4/4\nK:G\nGABc dcBA|\nabba cabc|\n"  # every bar full: the meter lets it end
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert vllm._finish_tune(constraints, [*ids, engine.eos_id], 200) == (ids, "stop")
    monkeypatch.setattr(constrained, "tune_ok", lambda t: "cab" not in t)  # the validator refuses that line
    kept, reason = vllm._finish_tune(constraints, [*ids, engine.eos_id], 200)
    decoded = engine.tokenizer.decode(kept)
    assert "cab" not in decoded and decoded.startswith("X:1\nL:1/8\nM:4/4\nK:G\nGABc dcBA|"), (
        decoded,
        reason,
    )


def test_engines_requests_and_abc_analysis_import_neither_serve_nor_the_composer():
    """The layering: types <- requests <- engines <- composer (the deployment); the UI's ABC analysis and the
    engines never pull in ray.serve or the deployment module (no import circle)."""
    import subprocess
    import sys

    code = (
        "import sys, chatmusician.abc.analysis, chatmusician.serve.types, chatmusician.serve.requests, "
        "chatmusician.serve.engines.hf, chatmusician.serve.engines.echo, chatmusician.serve.engines.vllm_engine, "
        "chatmusician.serve.webui; "
        "print(sorted(m for m in sys.modules if m == 'ray.serve' or m == 'chatmusician.serve.composer'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_adapter_leases_are_first_come_first_served(tiny_model_path, tmp_path):
    """A request for the active adapter that comes after one waiting to switch waits behind it (before, it
    joined at once, so a steady stream for one adapter could starve the others)."""
    import threading
    import time

    from peft import LoraConfig, get_peft_model

    from chatmusician.model.loading import load_model
    from chatmusician.model.multi_lora import AdapterSet

    paths = {}
    for name in ("alpha", "beta"):
        lora = get_peft_model(load_model(tiny_model_path), LoraConfig(r=2, target_modules=["q_proj"]))
        lora.save_pretrained(tmp_path / name)
        paths[name] = str(tmp_path / name)
    adapters = AdapterSet(load_model(tiny_model_path), paths, max_loaded=2)
    order: list[str] = []

    def lease(name: str) -> None:
        with adapters.use(name):
            order.append(name)

    def until(condition) -> None:
        deadline = time.monotonic() + 30
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)

    held = adapters.use("alpha")
    held.__enter__()
    threads = [threading.Thread(target=lease, args=(name,)) for name in ("beta", "alpha")]
    threads[0].start()
    until(lambda: len(adapters.waiting) == 1)  # beta waits for alpha's user
    threads[1].start()
    until(lambda: len(adapters.waiting) == 2 or order)  # the late alpha queues behind beta
    held.__exit__(None, None, None)
    for thread in threads:
        thread.join(timeout=30)
    assert order == ["beta", "alpha"]


def test_kv_cache_admission_rows_follow_the_model_and_the_caps():
    from types import SimpleNamespace

    from chatmusician.serve.engines.hf import kv_cache_rows

    llama7b = SimpleNamespace(
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_size=4096
    )
    per_row = 2 * 32 * 32 * 128 * 2 * 4096  # fp16 K and V for 4,096 tokens: 2 GiB
    assert per_row == 2 * 1024**3
    assert (
        kv_cache_rows(llama7b, 4096, 2, free_bytes=18 * 1024**3, share=0.8) == 7
    )  # a V100-32GB after weights
    assert kv_cache_rows(llama7b, 4096, 2, free_bytes=1024**3) == 1  # never 0: one request always runs
