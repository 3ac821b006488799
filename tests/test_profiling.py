"""The round profiler accounts for the whole generate() time and leaves the model unpatched."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import VOCAB, make_kangaroo, spy_product_rows
from kangaroo_hf import CpuKernels
from kangaroo_hf.bench.profile import format_profile, profile_generation


def test_profile_accounts_for_every_piece_and_unpatches():
    model = make_kangaroo("llama", draft_threshold=0.0, max_draft_tokens=3)
    input_ids = torch.randint(2, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    profile = profile_generation(model, input_ids, do_sample=False, max_new_tokens=20)
    assert set(profile.seconds) == {"shallow", "adapter", "draft_head", "verify", "prefill"}
    assert profile.rounds == model.last_generate_stats.verify_steps - 1
    assert 0 <= profile.overhead_s < profile.total_s
    assert abs(sum(profile.seconds.values()) + profile.overhead_s - profile.total_s) < 1e-9
    assert profile.predicted_speedup() > 0
    assert "predicted speedup" in format_profile(profile)
    # float32 on CPU: the plain step is also timed through the kernel Kangaroo decoding uses, and the split reported.
    assert profile.kernel_plain_step_s > 0 and "speculation over it" in format_profile(profile)
    assert profile.to_dict()["predicted_speedup_over_kernel_plain_step"] == pytest.approx(
        profile.predicted_speedup() * profile.kernel_plain_step_s / profile.plain_step_s
    )
    assert "forward" not in vars(model) and "shallow_forward" not in vars(model)
    assert not any("forward" in vars(module) for module in model.modules())
    expected = model.get_base_model().generate(input_ids, do_sample=False, max_new_tokens=20)
    assert model.generate(input_ids, do_sample=False, max_new_tokens=20).tolist() == expected.tolist()


def test_final_context_writes_count_as_adapter_time(monkeypatch):
    model = make_kangaroo("qwen2", adapter_context="final", adapter_mlp=True, draft_threshold=0.0, max_draft_tokens=2)
    calls = []
    original = type(model).adapter_add_context

    def spy(self, *args, **kwargs):  # a slow context write: its time must land in the adapter's share
        calls.append(1)
        time.sleep(0.02)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "adapter_add_context", spy)
    input_ids = torch.randint(2, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    profile = profile_generation(model, input_ids, do_sample=False, max_new_tokens=12)
    assert calls and profile.seconds["adapter"] >= 0.02 * len(calls)
    assert "adapter_add_context" not in vars(model)


def test_no_kernel_timing_where_kangaroo_does_not_use_it():
    model = make_kangaroo("mistral", draft_threshold=0.0, max_draft_tokens=2)
    model.cpu_kernels = CpuKernels(few_row_matmul=False, packed_weights=False)
    input_ids = torch.randint(2, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    profile = profile_generation(model, input_ids, do_sample=False, max_new_tokens=8)
    assert profile.kernel_plain_step_s is None and "speculation over it" not in format_profile(profile)
    assert "predicted_speedup_over_kernel_plain_step" not in profile.to_dict()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_bfloat16_plain_step_is_also_timed_with_packed_weights(monkeypatch):
    model = make_kangaroo("llama", draft_threshold=0.0, max_draft_tokens=2).to(torch.bfloat16)
    input_ids = torch.randint(2, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    packed_rows = spy_product_rows(monkeypatch, "packed_matmul")
    profile = profile_generation(model, input_ids, do_sample=False, max_new_tokens=8)
    assert profile.kernel_plain_step_s > 0 and "speculation over it" in format_profile(profile) and packed_rows
    model.cpu_kernels = CpuKernels(packed_weights=False)
    assert profile_generation(model, input_ids, do_sample=False, max_new_tokens=8).kernel_plain_step_s is None
