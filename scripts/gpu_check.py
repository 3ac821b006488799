"""Kangaroo's own loop (batches, tree rounds) and the batch-1 loop on a CUDA device: greedy outputs equal the base's.

Not part of CI (CI has no GPU). Run from the repository root on a machine with CUDA:

    PYTHONPATH=src python scripts/gpu_check.py

It builds the test suite's tiny random Llama, Mistral (sliding window 12) and Qwen2 models, moves them to the GPU and
compares `KangarooForCausalLM.generate` with the base's own `generate` (float32, greedy; batches left-padded), then
runs sampling and bfloat16 once each. Exit status 1 if any greedy float32 output differs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]

from conftest import make_kangaroo  # noqa: E402
from test_batched import batch  # noqa: E402

SETTINGS = {
    "chain": {},
    "lookup": {"lookup_num_tokens": 3, "lookup_max_tokens": 8},
    "tree": {"lookup_num_tokens": 3, "lookup_max_tokens": 8, "tree_rounds": True},
    "final context": {"adapter_context": "final", "lookup_num_tokens": 2},
}


def main() -> int:
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(device), "torch", torch.__version__)
    failures = 0
    for arch in ("llama", "mistral", "qwen2"):
        for name, settings in SETTINGS.items():
            model = make_kangaroo(arch, draft_threshold=0.2, **settings).to(device)
            base = model.get_base_model()
            input_ids, attention_mask = (tensor.to(device) for tensor in batch(seed=3, repeat=True))
            for rows in (1, input_ids.shape[0]):
                kwargs = dict(
                    attention_mask=attention_mask[-rows:], max_new_tokens=30, do_sample=False, pad_token_id=0
                )
                expected = base.generate(input_ids[-rows:], **kwargs)
                start = time.perf_counter()
                actual = model.generate(input_ids[-rows:], **kwargs)
                elapsed = time.perf_counter() - start
                same = torch.equal(actual, expected)
                failures += not same
                stats = model.last_generate_stats
                print(
                    f"{arch:8s} {name:14s} rows={rows} identical={same} tau={stats.mean_accepted_tokens:.2f} "
                    f"{elapsed * 1000:.0f} ms"
                )
            torch.manual_seed(0)
            sampled = model.generate(
                input_ids,
                attention_mask=attention_mask,
                max_new_tokens=20,
                do_sample=True,
                temperature=0.8,
                pad_token_id=0,
            )
            assert sampled.shape[0] == input_ids.shape[0] and sampled.device.type == "cuda"
    model = make_kangaroo("llama", draft_threshold=0.2, **SETTINGS["tree"]).to(device, torch.bfloat16)
    input_ids, attention_mask = (tensor.to(device) for tensor in batch(seed=4, repeat=True))
    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    print(
        "bfloat16 batch + tree rounds ran:",
        tuple(out.shape),
        f"tau={model.last_generate_stats.mean_accepted_tokens:.2f}",
    )
    print("greedy float32 failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
