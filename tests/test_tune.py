"""`kangaroo-hf tune` measures every grid point losslessly and saves the fastest settings."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from conftest import VOCAB, make_kangaroo, tiny_tokenizer
from kangaroo_hf import KangarooForCausalLM
from kangaroo_hf.bench.tune import calibration_prompts, tune


def test_tune_grid_sorted_by_speedup_and_lossless():
    model = make_kangaroo("llama")
    prompts = [torch.randint(2, VOCAB, (1, 5 + i), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    results = tune(
        {"tiny": model}, prompts, thresholds=[0.0, 0.5], max_drafts=[2, 4], lookups=[0, 3], max_new_tokens=8
    )
    assert len(results) == 8
    assert [r.speedup for r in results] == sorted((r.speedup for r in results), reverse=True)
    assert all(r.mean_accepted_tokens >= 1.0 for r in results)


def test_cli_tune_writes_the_best_settings(tmp_path, monkeypatch):
    from kangaroo_hf import loading
    from kangaroo_hf.cli import main

    model, tokenizer = make_kangaroo("qwen2"), tiny_tokenizer()
    monkeypatch.setattr(loading, "load_model", lambda name, dtype, device: (model, tokenizer))
    data = tmp_path / "calibration.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "abc" * i}]}) + "\n" for i in (1, 2)))
    output = tmp_path / "tuned"
    argv = ["tune", "--data", str(data), "--num-prompts", "2", "--thresholds", "0.1,0.9", "--max-drafts", "2"]
    assert main([*argv, "--max-new-tokens", "6", "--output", str(output)]) == 0
    results = json.loads((output / "tune_results.json").read_text())
    best = results[0]
    config = json.loads((output / "config.json").read_text())
    assert config["draft_threshold"] == best["draft_threshold"] and config["max_draft_tokens"] == 2
    assert isinstance(
        KangarooForCausalLM.from_pretrained(output, base_model=model.get_base_model()), KangarooForCausalLM
    )


def test_calibration_prompts_spread_over_files(tmp_path):
    files = []
    for index in range(2):
        path = tmp_path / f"f{index}.jsonl"
        path.write_text(
            "".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n" for i in range(5))
        )
        files.append(path)
    prompts = calibration_prompts(files, 4, tiny_tokenizer())
    assert len(prompts) == 4 and all(p.shape[0] == 1 for p in prompts)


def test_calibration_prompts_mix_the_sources_of_a_file(tmp_path, monkeypatch):
    from kangaroo_hf import loading

    rows = [{"id": f"flan-{i}", "messages": [{"role": "user", "content": f"flan {i}"}]} for i in range(6)]
    rows += [{"source": "t0/xsum", "messages": [{"role": "user", "content": f"t0 {i}"}]} for i in range(2)]
    rows += [{"source": "gsm8k", "messages": [{"role": "user", "content": "gsm 0"}]}]
    path = tmp_path / "validation.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    monkeypatch.setattr(loading, "chat_input_ids", lambda tokenizer, text: text)
    assert calibration_prompts([path], 5, None) == ["flan 0", "t0 0", "gsm 0", "flan 1", "t0 1"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "x-1", "messages": [{"role": "assistant", "content": "a"}]}))
    with pytest.raises(ValueError, match=r"bad\.jsonl:1 has no user message"):
        calibration_prompts([tmp_path / "bad.jsonl"], 1, None)


def test_lossless_check_accepts_only_numerical_ties(monkeypatch):
    import pytest

    from kangaroo_hf.bench import losslessness
    from kangaroo_hf.bench.tune import _check_lossless

    model = make_kangaroo("llama")
    input_ids = torch.randint(2, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    plain = model.generate(input_ids, use_kangaroo=False, do_sample=False, max_new_tokens=6)
    assert _check_lossless(model, input_ids, plain, plain.clone(), "same") == 0
    with torch.no_grad():  # swap the third new token for the base's second choice there
        position = input_ids.shape[1] + 2
        second = model.get_base_model()(plain[:, :position]).logits[0, -1].topk(2).indices[1]
    changed = plain.clone()
    changed[0, position] = second
    with pytest.raises(RuntimeError, match="differs from plain decoding beyond a numerical tie"):
        _check_lossless(model, input_ids, plain, changed, "float32")  # float32: no tolerance
    # as if both logits were one step apart
    monkeypatch.setattr(losslessness, "default_tie_tolerance", lambda dtype: 1e9)
    assert _check_lossless(model, input_ids, plain, changed, "reduced precision") == 1
