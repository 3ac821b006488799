"""The round profiler accounts for the whole generate() time and leaves the model unpatched."""

from __future__ import annotations

import torch

from conftest import VOCAB, make_kangaroo
from kangaroo_hf.profiling import format_profile, profile_generation


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
    assert "forward" not in vars(model) and "shallow_forward" not in vars(model)
    expected = model.get_base_model().generate(input_ids, do_sample=False, max_new_tokens=20)
    assert model.generate(input_ids, do_sample=False, max_new_tokens=20).tolist() == expected.tolist()
