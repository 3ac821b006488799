"""`kangaroo-hf generate`, the README's main command: text, speculation statistics, comparison with plain decoding."""

from __future__ import annotations

import pytest

from conftest import make_kangaroo, tiny_tokenizer
from kangaroo_hf import CpuKernels


@pytest.fixture
def tiny_cli_model(monkeypatch):
    from kangaroo_hf import loading

    model, tokenizer = make_kangaroo("llama", draft_threshold=0.0, max_draft_tokens=3), tiny_tokenizer()
    monkeypatch.setattr(loading, "load_model", lambda name, dtype, device: (model, tokenizer))
    return model


def test_generate_prints_text_statistics_and_the_comparison(tiny_cli_model, capsys):
    from kangaroo_hf.cli import main

    assert main(["generate", "abcabc", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "[kangaroo] 12 new tokens" in out
    assert "mean accepted tokens per verification step" in out
    assert "identical output: True" in out and "speedup:" in out
    assert "[plain generate()] 12 new tokens" in out
    assert "of which the float32 few-row kernel" in out and "speculation over it:" in out  # float32 on CPU


def test_generate_shows_no_kernel_split_where_the_kernel_is_off(tiny_cli_model, capsys):
    from kangaroo_hf.cli import main

    tiny_cli_model.cpu_kernels = CpuKernels(few_row_matmul=False)
    assert main(["generate", "abcabc", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "speedup:" in out and "few-row kernel" not in out


def test_generate_shows_the_packed_weights_split_in_bfloat16(tiny_cli_model, capsys):
    import torch

    from kangaroo_hf.cli import main

    tiny_cli_model.to(torch.bfloat16)
    assert main(["generate", "abcabc", "--max-new-tokens", "6", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    expected = "of which the bfloat16 packed weights" if torch.backends.mkldnn.is_available() else "speedup:"
    assert expected in out and "few-row kernel" not in out


def test_generate_passes_the_draft_overrides(tiny_cli_model, capsys, monkeypatch):
    from kangaroo_hf.cli import main

    seen = []
    original = type(tiny_cli_model).generate

    def spy(self, *args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("first_draft_threshold", "lookup_num_tokens", "max_draft_tokens")})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_cli_model), "generate", spy)
    argv = ["generate", "abc", "--max-new-tokens", "5", "--no-compare", "--first-draft-threshold", "1.0"]
    assert main([*argv, "--lookup-num-tokens", "0", "--max-draft-tokens", "2"]) == 0
    assert {"first_draft_threshold": 1.0, "lookup_num_tokens": 0, "max_draft_tokens": 2} in seen
    assert "drafted 0, accepted 0" in capsys.readouterr().out  # no first draft reaches probability 1
