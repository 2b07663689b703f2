"""Run by tests/test_serve_vllm_units.py in the vLLM environment: constrained answers of the tiny random model on
the vllm engine over several meters (seeded sampling), with the meter logits processor and without it
(``vllm.meter_mask``), and greedy unconstrained answers in the same batch; prints one JSON line per arm. Arms:
``on``, ``off``, ``on-process`` (the processor in vLLM's engine core process). The workload is
``benchmarks/vllm_meter.py``'s. Usage: ``python tests/vllm_meter_process.py MODEL SEEDS BUDGET on,off,on-process``."""

import json
import sys

from benchmarks.vllm_meter import arm

if __name__ == "__main__":  # the engine core process is spawned: it re-imports this module
    model, seeds, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for name in sys.argv[4].split(",") if len(sys.argv) > 4 else ["on", "off"]:
        on, process = name.startswith("on"), name.endswith("process")
        print(json.dumps(arm(model, on, seeds, budget, engine_process=process)))
