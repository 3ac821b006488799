"""The scripts in examples/ run: training on a tiny model, the SmolLM2 ones on the real embedded model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_base, tiny_tokenizer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# One character per token in the tiny vocabulary: '9' opens a turn, the role's initial follows, '8' closes it.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '9' + message['role'][0] + message['content'] + '8' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '9a' }}{% endif %}"
)


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("token_targets", [False, True], ids=["distribution", "tokens"])
def test_train_own_jsonl_on_a_tiny_base(tmp_path, capsys, token_targets):
    base_folder = tmp_path / "base"
    tiny_base("llama").save_pretrained(base_folder)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(base_folder)
    data = tmp_path / "chats.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "abc" * (1 + i % 4)}, {"role": "assistant", "content": "bcd" * 3}]}
        for i in range(40)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "adapter"
    argv = ["--base", str(base_folder), "--data", str(data), "--output-dir", str(output), "--epochs", "1"]
    _load_example("train_own_jsonl").main(argv + (["--token-targets"] if token_targets else []))
    assert (output / "config.json").is_file()
    used = json.loads((output / "training_args.json").read_text())["targets"]
    assert used == ("tokens" if token_targets else "distribution")
    assert "adapter saved to" in capsys.readouterr().out

    from kangaroo_hf import KangarooForCausalLM

    reloaded = KangarooForCausalLM.from_pretrained(output)
    assert reloaded.config.exit_layer == 2


@pytest.mark.smollm2
@pytest.mark.parametrize("script", ["quickstart.py", "pipeline_streaming.py"])
def test_smollm2_examples_run(script):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "Name two primary colors.", "--max-new-tokens", "24"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "verification step" in result.stdout
