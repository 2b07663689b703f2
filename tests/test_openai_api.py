"""The OpenAI API as real clients send it, against ONE running app per engine (module-scoped, parametrised by
engine so that a second engine joins with one more param): the official ``openai`` client, lm-evaluation-harness
``local-completions`` (loglikelihood) and ``local-chat-completions`` (generate_until), echo logprobs against a
local forward pass, seeds under load, multi-LoRA by model id, a disconnected request stopping, the health probe,
and the web UI behind 2 Ingress replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import pytest
from conftest import free_port

pytestmark = pytest.mark.integration

APP = "chatmusician-openai-test"
MODEL = "chatmusician"
CAP = 1024
GREEDY = {"temperature": 0, "extra_body": {"repetition_penalty": 1.0}}


def make_adapter(base_path: str, out, seed: int) -> str:
    import torch
    from peft import LoraConfig, get_peft_model

    from chatmusician.model.loading import load_model

    torch.manual_seed(seed)
    lora = get_peft_model(
        load_model(base_path),
        LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    lora.save_pretrained(out)
    return str(out)


RIGGED = "\u2581no"  # after this token the served model's greedy next token is EOS


@pytest.fixture(scope="module")
def rigged_model_path(tiny_model_path, tmp_path_factory) -> str:
    """The tiny model with one token's embedding replaced by a large vector along EOS's output row: after that
    token (and only there: sequences without it are unchanged) EOS is the greedy token, as after a chat-tuned
    model's answer."""
    import shutil

    import torch

    from chatmusician.model.loading import load_model, load_tokenizer

    out = tmp_path_factory.mktemp("rigged") / "model"
    shutil.copytree(tiny_model_path, out)
    tokenizer, model = load_tokenizer(tiny_model_path), load_model(tiny_model_path)
    with torch.no_grad():
        row = model.lm_head.weight[tokenizer.eos_token_id]
        model.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids(RIGGED)] = row / row.norm() * 1000
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def served(request, ray_cluster, rigged_model_path, tmp_path_factory):
    """(base URL, config) of the app for one engine on the rigged tiny model: 2 LoRA adapters (1 kept loaded),
    2 Ingress replicas."""
    from ray import serve

    from chatmusician.render.deployment import build_renderer
    from chatmusician.serve.app import _options, app_config, composer_options
    from chatmusician.serve.composer import Composer
    from chatmusician.serve.ingress import Ingress

    folder = tmp_path_factory.mktemp("adapters")
    adapters = {
        name: make_adapter(rigged_model_path, folder / name, seed)
        for name, seed in (("alpha", 1), ("beta", 2))
    }
    config = app_config(
        {
            "model": rigged_model_path,
            "engine": request.param,
            "torch_threads": 1,
            "max_new_tokens_cap": CAP,
            "lora_adapters": adapters,
            "max_loras": 1,  # beta loads on first use and alpha is unloaded: the bounded cache at work
            "health_probe_idle_s": 0.0,
            "composer": {"num_cpus": 0.5},
            "ingress": {"num_cpus": 0.1},
            "render": {"serve": {"num_cpus": 0.1, "max_replicas": 1}},
        }
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    composer = Composer.options(**composer_options(config)).bind(config)
    ingress = Ingress.options(**_options(config.ingress, 1), num_replicas=2)
    try:
        serve.run(ingress.bind(composer, build_renderer(config.render), config), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}", config
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def base_url(served):
    return served[0]


@pytest.fixture(scope="module")
def client(base_url):
    import openai

    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def composer_stats():
    from ray import serve

    return serve.get_deployment_handle("Composer", app_name=APP).stats.remote().result()


def test_models_list_adapters_and_model_cards(client, base_url):
    assert [m.id for m in client.models.list()] == [MODEL, f"{MODEL}:alpha", f"{MODEL}:beta"]
    assert client.models.retrieve(f"{MODEL}:beta").parent == MODEL
    assert httpx.get(f"{base_url}/v1/models/beta").json()["id"] == f"{MODEL}:beta"
    missing = httpx.get(f"{base_url}/v1/models/gamma")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_n_choices_with_stop_unknown_fields_and_logprobs(client):
    messages = [{"role": "user", "content": "Compose a jig in G."}]
    free = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, seed=3, temperature=1.0
    )
    stop = free.choices[0].message.content[2:4]
    assert stop.strip(), free.choices[0].message.content
    reply = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=16,
        n=3,
        stop=[stop],
        seed=3,
        temperature=1.0,
        logprobs=True,
        top_logprobs=2,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        extra_body={"logit_bias": {}, "parallel_tool_calls": False},  # unknown here: ignored, not a 400
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(stop not in c.message.content for c in reply.choices)
    assert reply.choices[0].finish_reason == "stop"  # seed 3, choice 0: the text that had the stop string
    for choice in reply.choices:
        tokens = choice.logprobs.content
        assert tokens and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens)
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)
    capped = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=3, stop=None, **GREEDY
    )
    assert capped.usage.completion_tokens <= 3


def test_seeded_request_alone_and_alongside_seven_streams(client, base_url):
    messages = [{"role": "user", "content": "Compose a reel in D."}]
    kwargs = {"model": MODEL, "messages": messages, "max_tokens": 24, "seed": 11, "temperature": 1.0}
    alone = client.chat.completions.create(**kwargs).choices[0].message.content

    async def busy():
        import openai

        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as aclient:

            async def stream():
                s = await aclient.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=24, temperature=1.0, stream=True
                )
                return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])

            results = await asyncio.gather(
                *(stream() for _ in range(7)), aclient.chat.completions.create(**kwargs)
            )
        return results[-1].choices[0].message.content, results[:-1]

    seeded, others = asyncio.run(busy())
    assert seeded == alone
    assert len(set(others)) > 1  # the neighbours really sampled (each from its own generator)


def test_streaming_usage_chunk_and_stop(client):
    messages = [{"role": "user", "content": "Compose a waltz."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, **GREEDY)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == plain.choices[0].message.content
    )
    text = plain.choices[0].message.content
    stop = text[3:5]
    stopped = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, stream=True, stop=stop, **GREEDY
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stopped if c.choices)
    assert streamed == text[: text.find(stop)]


def test_streamed_logprobs_equal_the_same_request_not_streamed(client):
    messages = [{"role": "user", "content": "Compose a hornpipe."}]
    kwargs = {"model": MODEL, "messages": messages, "max_tokens": 10, "seed": 5, "temperature": 1.0}
    plain = client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=2).choices[0]
    chunks = [c for c in client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=2, stream=True)]
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.message.content
    assert [t.token for t in streamed] == [t.token for t in plain.logprobs.content]
    assert (
        max(abs(a.logprob - b.logprob) for a, b in zip(streamed, plain.logprobs.content, strict=True)) < 1e-4
    )
    assert all(len(t.top_logprobs) == 2 for t in streamed)
    text = client.completions.create(
        model=MODEL, prompt="X:1\nK:G\n", max_tokens=6, logprobs=1, seed=2, stream=True
    )
    pieces = list(text)
    lp = next(c.choices[0].logprobs for c in pieces if c.choices and c.choices[0].logprobs)
    answer = "".join(c.choices[0].text for c in pieces if c.choices)
    assert len(lp.tokens) == len(lp.token_logprobs) >= 1 and all(v <= 0 for v in lp.token_logprobs)
    assert lp.text_offset[0] == 0 and all(0 <= o <= len(answer) for o in lp.text_offset)


def test_completions_echo_logprobs_equal_a_local_forward_pass(client, served):
    import torch

    from chatmusician.model.loading import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(served[1].model), load_model(served[1].model).eval()
    ids = tokenizer("X:1\nM:6/8\nK:G\nGAB cde|", add_special_tokens=False)["input_ids"]
    out = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=1, logprobs=1, echo=True, temperature=0
    )
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    expected = [float(want[t, ids[t + 1]]) for t in range(len(ids) - 1)]
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1 : len(ids)], expected, strict=True)) < 1e-4
    text = out.choices[0].text
    ends = [*lp.text_offset[1:], len(text)]  # text_offset indexes the echoed prompt and the answer
    assert text[: lp.text_offset[len(ids)]] == tokenizer.decode(ids)
    assert "".join(text[a:b] for a, b in zip(lp.text_offset, ends, strict=True)) == text
    text = client.completions.create(model=MODEL, prompt=["X:1\nK:D\n", "X:2\n"], max_tokens=4, stop="|")
    assert len(text.choices) == 2 and all("|" not in c.text for c in text.choices)


def lm_eval_tasks(tmp_path):
    rows = [
        {"question": "Which field gives the key of an ABC tune?", "choices": ["K:", "T:"], "answer": 0},
        {"question": "Which field gives the meter?", "choices": ["X:", "M:"], "answer": 1},
        {"question": "Which field gives the unit note length?", "choices": ["L:", "Q:"], "answer": 0},
    ]
    data = tmp_path / "abc_fields.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    source = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
    }
    choice = {
        "task": "cm_api_fields_choice",
        **source,
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    generate = {
        "task": "cm_api_fields_generate",
        **source,
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{choices[answer]}}",
        "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    return choice, generate


def test_lm_eval_loglikelihoods_equal_in_process_hflm_where_eos_is_greedy(served):
    """lm-eval ``local-completions`` against this server scores exactly as lm-eval's in-process HFLM on the same
    model, also where EOS is the greedy token after the continuation (the EOS entry must be in the echo)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    base_url, config = served
    pairs = [
        ("Which field gives the key?\nAnswer:", " no"),  # one token, then EOS is greedy
        ("Which field gives the meter?\nAnswer:", " M: no"),
        ("Which field gives the meter?\nAnswer:", " M:"),  # EOS not greedy after it
    ]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    remote = LocalCompletionsAPI(
        base_url=f"{base_url}/v1/completions", model=MODEL, tokenizer_backend="huggingface",
        tokenizer=config.model, num_concurrent=1, max_retries=1,
    )  # fmt: skip
    local = HFLM(pretrained=config.model, device="cpu", batch_size=1, dtype="float32")
    got, want = remote.loglikelihood(requests), local.loglikelihood(requests)
    assert want[0][0] < -1 and not want[0][1]  # the wrong answer would be (0.0, True)
    for (ll, greedy), (ll_want, greedy_want) in zip(got, want, strict=True):
        assert abs(ll - ll_want) < 1e-3 and greedy == greedy_want, (got, want)


def test_lm_evaluation_harness_local_completions_and_chat_completions(base_url, served, tmp_path):
    import lm_eval

    choice, generate = lm_eval_tasks(tmp_path)
    loglikelihood = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{base_url}/v1/completions",
            "model": MODEL,
            "tokenizer_backend": "huggingface",
            "tokenizer": served[1].model,
            "num_concurrent": 2,
            "max_retries": 1,
        },
        tasks=[choice],
        bootstrap_iters=0,
    )
    acc = loglikelihood["results"]["cm_api_fields_choice"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and loglikelihood["n-samples"]["cm_api_fields_choice"]["effective"] == 3
    generated = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args={"base_url": f"{base_url}/v1/chat/completions", "model": MODEL, "max_retries": 1},
        tasks=[generate],
        apply_chat_template=True,
        bootstrap_iters=0,
    )
    exact = generated["results"]["cm_api_fields_generate"]["exact_match,none"]
    assert 0.0 <= exact <= 1.0 and generated["n-samples"]["cm_api_fields_generate"]["effective"] == 3


def test_two_adapters_answer_like_base_plus_that_adapter_run_directly(client, served):
    import torch
    from peft import PeftModel

    from chatmusician.model.loading import load_model, load_tokenizer
    from chatmusician.prompts import build_chat_prompt

    _, config = served
    tokenizer = load_tokenizer(config.model)
    question = "Compose a hornpipe."
    ids = torch.tensor([tokenizer(build_chat_prompt(question, []), add_special_tokens=False)["input_ids"]])

    def direct(adapter: str | None) -> str:
        model = load_model(config.model)
        if adapter:
            model = PeftModel.from_pretrained(model, config.lora_adapters[adapter])
        with torch.no_grad():
            out = (
                model.eval()
                .generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=12,
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    suppress_tokens=[tokenizer.pad_token_id],
                )[0, ids.shape[1] :]
                .tolist()
            )
        if tokenizer.eos_token_id in out:
            out = out[: out.index(tokenizer.eos_token_id)]
        return tokenizer.decode(out, skip_special_tokens=True)

    def served_answer(model_id: str) -> str:
        messages = [{"role": "user", "content": question}]
        reply = client.chat.completions.create(model=model_id, messages=messages, max_tokens=12, **GREEDY)
        return reply.choices[0].message.content

    answers = {m: served_answer(m) for m in (f"{MODEL}:alpha", "beta", MODEL, f"{MODEL}:alpha")}
    assert answers[f"{MODEL}:alpha"] == direct("alpha") and answers["beta"] == direct("beta")
    assert answers[MODEL] == direct(None)
    assert len({answers[f"{MODEL}:alpha"], answers["beta"], answers[MODEL]}) == 3
    with pytest.raises(Exception) as err:
        served_answer(f"{MODEL}:gamma")
    assert getattr(err.value, "status_code", None) == 404


def test_disconnected_non_streaming_request_stops(served):
    """The client leaves mid-answer: the row stops long before its budget (Serve cancels the call; the
    Composer's cancel event ends the row at its next token; vLLM aborts the request while it runs)."""
    base_url, config = served
    stats = composer_stats()
    before, aborted_before = len(stats["cancelled"]), stats["engine_aborted"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Compose a long suite."}],
            "max_tokens": CAP, "temperature": 0, "repetition_penalty": 1.0}  # fmt: skip

    async def leave_early():
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as http:
            task = asyncio.create_task(http.post("/v1/chat/completions", json=body))
            batches = (await asyncio.to_thread(composer_stats))["batches"]
            deadline = time.monotonic() + 120
            while (await asyncio.to_thread(composer_stats))[
                "batches"
            ] == batches and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # until the Composer has the request in a batch
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(leave_early())

    def settled(stats) -> bool:  # the Composer saw the caller leave; vLLM's engine thread ran the abort
        return len(stats["cancelled"]) > before and (
            config.engine != "vllm" or stats["engine_aborted"] > aborted_before
        )

    deadline = time.monotonic() + 120
    while not settled(stats := composer_stats()) and time.monotonic() < deadline:
        time.sleep(0.2)
    cancelled = stats["cancelled"]
    assert len(cancelled) > before, cancelled
    if config.engine == "vllm":  # its answers come once, at the end: it says the request was stopped running
        assert cancelled[-1] is None and stats["engine_aborted"] == aborted_before + 1, stats
    else:
        assert cancelled[-1] < CAP // 2, cancelled


def test_short_non_streaming_request_is_not_held_behind_a_long_one(base_url, served):
    """A short request sent while a long one generates comes back first: vLLM's continuous batch takes it at
    once; on the transformers engine it starts the next batch beside the running one (concurrent_batches: 2;
    with one batch at a time it waited for the long one's whole batch)."""
    long_body = {"model": MODEL, "messages": [{"role": "user", "content": "Compose a long suite."}],
                 "max_tokens": CAP, "temperature": 0, "repetition_penalty": 1.0}  # fmt: skip
    short_body = {**long_body, "max_tokens": 4}

    async def race():
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as http:
            long_task = asyncio.create_task(http.post("/v1/chat/completions", json=long_body))
            batches = (await asyncio.to_thread(composer_stats))["batches"]
            deadline = time.monotonic() + 120
            while (await asyncio.to_thread(composer_stats))[
                "batches"
            ] == batches and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # until the Composer has the long request
            short = await http.post("/v1/chat/completions", json=short_body)
            long = long_task.result() if long_task.done() else None
            long_task.cancel()  # the client leaves: the long row is aborted
            with contextlib.suppress(asyncio.CancelledError):
                await long_task
            return short, long

    for _ in range(3):  # a loaded machine may finish the whole long answer first: then the race says nothing
        short, long = asyncio.run(race())
        assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] <= 4
        if long is None or long.status_code != 200 or long.json()["usage"]["completion_tokens"] < CAP:
            break
    assert long is None, f"the long request came back first: {long.status_code} {long.text[:300]}"


def test_health_probe_and_metrics(base_url):
    from ray import serve

    handle = serve.get_deployment_handle("Composer", app_name=APP)
    probes = handle.stats.remote().result()["probes"]
    handle.check_health.remote().result()  # health_probe_idle_s=0: always one forward pass
    stats = handle.stats.remote().result()
    assert stats["probes"] > probes
    assert stats["requests"] > 0 and stats["completion_tokens"] > 0 and stats["ttft_s"]


def test_web_ui_behind_two_ingress_replicas(base_url):
    """The page keeps no server state: any replica serves the page, its analyze call and the chat it sends."""
    replicas = set()
    tune = "X:1\nM:4/4\nL:1/8\nK:G\nGABc d2e2|f2g2 a4|]"
    with httpx.Client(base_url=base_url, timeout=120) as http:
        deadline = time.monotonic() + 120
        while len(replicas) < 2 and time.monotonic() < deadline:
            page = http.get("/ui/")
            analyzed = http.post("/ui/api/analyze", json={"text": tune})
            assert page.status_code == 200 and "<html" in page.text.lower()
            assert analyzed.status_code == 200 and len(analyzed.json()["tunes"]) == 1
            replicas |= {page.headers["x-replica"], analyzed.headers["x-replica"]}
        assert len(replicas) == 2
        chat = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "stream": True,
        }
        with http.stream("POST", "/v1/chat/completions", json=chat) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]"


def test_constrained_answers_are_complete_tunes_and_streams_send_only_accepted_text(client, served):
    """Grammar-constrained ABC through extra_body on either engine (vllm: structured outputs, guidance backend):
    on this random model too, and with a budget too short for its rambling, the answer is a complete tune with
    the asked header that abc2midi plays (budget-aware finish on both engines); the seeded stream sends exactly
    that answer; a constraint that cannot compile is a 400 before any generation."""
    import openai

    from chatmusician.abc.grammar import AbcConstraints
    from chatmusician.eval.abc_quality import midi_check
    from chatmusician.model.constrained import check_constraints, has_notes, new_matcher, tune_ok
    from chatmusician.model.loading import load_tokenizer

    tokenizer = load_tokenizer(served[1].model)
    fixed = {"constrained": True, "key": "G", "meter": "3/4", "unit_length": "1/8"}
    kwargs = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Compose a waltz."}],
        "max_tokens": 200,
        "seed": 5,
        "temperature": 1.0,
        "extra_body": fixed,
    }
    constraints = AbcConstraints(key="G", meter="3/4", unit_length="1/8")
    check_constraints(tokenizer, constraints)
    for budget in (40, 200):
        response = client.chat.completions.create(**{**kwargs, "max_tokens": budget})
        text = response.choices[0].message.content
        matcher = new_matcher(tokenizer, constraints)
        assert matcher.consume_tokens(tokenizer(text, add_special_tokens=False)["input_ids"]), text
        assert matcher.is_accepting() and "K:G" in text.split("\n") and "M:3/4" in text.split("\n"), text
        assert tune_ok(text) and has_notes(text) and midi_check(text), text
        assert response.usage.completion_tokens <= budget
    streamed = client.chat.completions.create(**kwargs, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**{**kwargs, "extra_body": {"constrained": True, "meter": "banana"}})
