"""The vllm engine's pure helpers (no vLLM needed: they run in the platform's .venv) and its deployment options."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import chatmusician
from chatmusician.serve.app import app_config
from chatmusician.serve.engines.vllm_support import (
    adapters_touch_lm_head,
    check_adapter_ranks,
    guidance_grammar,
    sampling_kwargs,
)
from chatmusician.serve.types import GenerationParams


def test_lark_ranges_are_written_in_the_guidance_dialect():
    assert guidance_grammar('bar: note~1..8 " "') == 'bar: note{1,8} " "'
    assert guidance_grammar("x: y~ 2 .. 3 | /a{1,2}/") == "x: y{2,3} | /a{1,2}/"


def test_sampling_kwargs_map_every_parameter():
    params = GenerationParams(0.7, 0.9, 40, 1.1, 32, seed=5, presence_penalty=0.5, frequency_penalty=-0.5,
                              stop=("|",), logprobs=2)  # fmt: skip
    kwargs = sampling_kwargs(params, pad_id=0, eos_id=2)
    assert kwargs == {
        "n": 1, "max_tokens": 32, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "seed": 5, "stop": ["|"], "logprobs": 2,
        "skip_special_tokens": True, "logit_bias": {0: -100.0},
    }  # fmt: skip
    greedy = sampling_kwargs(GenerationParams(0.0, 0.5, 0, 1.0, 8), pad_id=2, eos_id=2)
    assert greedy["top_k"] == -1 and greedy["top_p"] == 1.0 and greedy["stop"] is None
    assert "logit_bias" not in greedy  # the pad token is EOS: it must stay possible


def test_adapters_on_the_output_layer_are_detected(tmp_path):
    attention, head = tmp_path / "attn", tmp_path / "head"
    for folder, targets in ((attention, ["q_proj", "v_proj"]), (head, ["q_proj", "lm_head"])):
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"target_modules": targets}))
    assert not adapters_touch_lm_head({"a": str(attention)})
    assert adapters_touch_lm_head({"a": str(attention), "b": str(head)})


def test_the_vllm_composer_runs_in_its_own_environment(tmp_path):
    from chatmusician.serve.app import app_config, composer_options

    python = tmp_path / "python"
    python.write_text("")
    options = composer_options(app_config({"engine": "vllm", "vllm": {"python": str(python)}}))
    env = options["ray_actor_options"]["runtime_env"]
    assert env["py_executable"] == str(python)
    assert env["env_vars"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    # this checkout's code runs in the vLLM environment, whatever that environment has installed
    assert Path(env["env_vars"]["PYTHONPATH"]) == Path(chatmusician.__file__).resolve().parents[1]
    assert "runtime_env" not in composer_options(app_config({}))["ray_actor_options"]
    with pytest.raises(FileNotFoundError, match="make setup"):
        composer_options(app_config({"engine": "vllm", "vllm": {"python": str(tmp_path / "missing")}}))


def test_vllm_python_is_found_by_setting_not_by_source_tree(tmp_path, monkeypatch):
    from chatmusician.serve.app import vllm_python

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CHATMUSICIAN_VLLM_PYTHON", raising=False)
    assert vllm_python("env/bin/python") == str(tmp_path / "env/bin/python")  # the working directory's
    assert vllm_python("") == sys.executable  # vLLM installed beside the package
    monkeypatch.setenv("CHATMUSICIAN_VLLM_PYTHON", "/opt/vllm/bin/python")
    assert vllm_python("env/bin/python") == "/opt/vllm/bin/python"


def test_composer_capacity_is_sized_from_the_engine():
    from chatmusician.serve.app import composer_capacity

    assert composer_capacity(app_config({"engine": "vllm", "vllm": {"max_num_seqs": 64}})) == 128
    assert composer_capacity(app_config({"max_batch_size": 8})) == 24  # 2 batches generating, 1 assembling
    assert composer_capacity(app_config({"max_batch_size": 8, "concurrent_batches": 1})) == 16
    with pytest.raises(ValueError, match="concurrent_batches must be at least 1"):
        app_config({"concurrent_batches": 0})
    assert composer_capacity(app_config({"composer": {"max_ongoing_requests": 5}})) == 5


def test_eager_mode_by_default_only_without_cuda():
    from chatmusician.serve.engines.vllm_support import eager_default

    assert eager_default(True) is True and eager_default(False) is False
    assert eager_default(None) is (not __import__("torch").cuda.is_available())


def test_adapter_ranks_over_max_lora_rank_are_refused_at_start(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 32, "target_modules": ["q_proj"]}))
    check_adapter_ranks({"wide": str(tmp_path)}, max_lora_rank=32)
    with pytest.raises(ValueError, match="'wide' has rank 32"):
        check_adapter_ranks({"wide": str(tmp_path)}, max_lora_rank=16)


def test_a_failed_engine_step_aborts_its_requests():
    """vLLM's step raises: each running request gets the error and is aborted in vLLM, so the loop does not
    fail on the same requests every step until the health check restarts the replica."""
    import queue
    import threading
    import time
    from collections import deque

    from chatmusician.serve.engines.vllm_engine import VllmEngine

    class FailingLLM:
        def __init__(self):
            self.running, self.steps, self.aborted = {"a", "b"}, 0, []

        def has_unfinished_requests(self):
            return bool(self.running)

        def step(self):
            self.steps += 1
            raise RuntimeError("step failed")

        def abort_request(self, ids):
            self.aborted += ids
            self.running -= set(ids)

    engine = VllmEngine.__new__(VllmEngine)  # the engine thread's loop only, over a fake vLLM
    engine.llm, engine._commands, engine._wake = FailingLLM(), deque(), threading.Event()
    engine._closed, engine.failed_steps = False, 0
    sinks = {"a": queue.Queue(), "b": queue.Queue()}
    engine._sinks = dict(sinks)
    thread = threading.Thread(target=engine._loop, daemon=True)
    thread.start()
    errors = [sink.get(timeout=30) for sink in sinks.values()]
    deadline = time.monotonic() + 30
    while engine.llm.running and time.monotonic() < deadline:
        time.sleep(0.01)
    engine._closed = True
    engine._wake.set()
    thread.join(timeout=30)
    assert [kind for kind, _, _ in errors] == ["error", "error"]
    assert sorted(engine.llm.aborted) == ["a", "b"] and engine.llm.steps == 1


def _vllm_script(script: str, *args: str) -> list[dict]:
    """Run tests/``script`` in the vLLM environment (as a ``vllm`` Composer replica runs); its JSON lines."""
    import os
    import subprocess

    from chatmusician.serve.engines.vllm_env import runtime_env

    env = runtime_env(str(Path(".venv-vllm/bin/python").absolute()), kv_cache_gib=1)  # not resolved: a venv
    proc = subprocess.run(
        [env["py_executable"], str(Path(__file__).parent / script), *args],
        env={**os.environ, **env["env_vars"]},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.integration
def test_the_engine_core_in_its_own_process_answers_as_in_process_and_leaves_with_the_engine(tiny_model_path):
    """``vllm.engine_process``: vLLM's engine core in its own process (as `vllm serve` runs it) gives the same
    greedy answers and logprobs, streamed and final-only, and its processes end with the engine's shutdown."""
    result = _vllm_script("vllm_engine_process.py", tiny_model_path)[-1]
    inside, own = result["in_process"], result["own_process"]
    assert own["final"] and own["stream"] and own["stream"] == own["stream_completion"]
    assert (own["final"], own["stream"]) == (inside["final"], inside["stream"])
    assert own["final_logprobs"] == pytest.approx(inside["final_logprobs"], abs=1e-4)
    assert (
        inside["children"] == 0 and own["children"] >= 1
    )  # the engine core ran beside, not in, this process
    assert own["alive_after_shutdown"] == []


@pytest.mark.integration
def test_vllm_constrained_answers_are_steered_by_the_meter_while_sampling_not_cut_back(tiny_model_path):
    """The meter logits processor (serve/engines/vllm_meter.py): 18 seeded constrained rows of the random model
    over six meters, with two greedy unconstrained rows in the same batch. With it, every answer is a tune with
    zero bar-duration issues that ends where it should (none cut back, finish "stop") and plays bars (55 in all
    when written); without it (``vllm.meter_mask: false``, the engine before the processor: the meter checked
    after sampling only) the same seeds are cut back to their last right bar, 17 of 18, mostly to nothing (10
    bars in all). The unconstrained rows are untouched (the same greedy answers as with no processor loaded),
    and in vLLM's engine core process the processor gives the same answers as in-process."""
    on, off, own = _vllm_script("vllm_meter_process.py", tiny_model_path, "3", "128", "on,off,on-process")
    answers = on["answers"]
    assert len(answers) == 18 and on["cut_backs"] == 0
    assert [a["reason"] for a in answers] == ["stop"] * 18
    assert [a["bar_duration"] for a in answers] == [[]] * 18  # a tune each, and no bar of the wrong length
    assert [a["whole_issues"] for a in answers] == [[]] * 18  # nor in the whole answer read as one tune
    assert all(a["bars"] >= 1 for a in answers), [(a["bars"], a["text"]) for a in answers]
    assert off["cut_backs"] >= 9, off["cut_backs"]  # the sensitivity check: what the processor prevents
    assert sum(a["bars"] for a in answers) > 3 * sum(a["bars"] for a in off["answers"])
    assert on["free"] == off["free"] == own["free"] and all(on["free"])
    assert [a["text"] for a in own["answers"]] == [a["text"] for a in answers] and own["cut_backs"] == 0


@pytest.mark.integration
def test_the_meter_processor_follows_vllms_batch_and_masks_only_its_rows(tiny_model_path):
    """The processor's bookkeeping, fed vLLM's own BatchUpdate: a row that asks (extra_args) is masked (a bar line
    two eighths short, and the padded vocabulary), one that does not is untouched; a swap moves the mask with
    its request, a removal drops it, a -1 placeholder in the live output ids is skipped, a bad value refused."""
    found = _vllm_script("vllm_meter_units.py", tiny_model_path)[-1]
    assert "must be true or false" in found["validate"]
    assert found["rows_after_add"] == [0] and found["bar_masked"] == [True, False]
    assert found["padded_masked"] == [True, False] and found["plain_untouched"]
    assert found["rows_after_swap"] == [1] and found["bar_masked_after_swap"] == [False, True]
    assert found["rows_after_remove"] == []
