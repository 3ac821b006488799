"""Kangaroo behaves like any transformers causal LM: streamers, criteria, dict outputs, pipelines, Auto classes."""

from __future__ import annotations

import threading

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    pipeline,
)
from transformers.generation.streamers import BaseStreamer

import kangaroo_hf  # noqa: F401  (registers the Auto classes)
from conftest import VOCAB, make_kangaroo, tiny_tokenizer
from kangaroo_hf import KangarooConfig, KangarooForCausalLM


class RecordingStreamer(BaseStreamer):
    def __init__(self) -> None:
        self.chunks: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended = True


def _prompt(length: int = 6, seed: int = 0) -> torch.LongTensor:
    return torch.randint(2, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def test_streamer_receives_every_new_token_once_in_order():
    model = make_kangaroo("llama", draft_threshold=0.0, max_draft_tokens=4)
    prompt = _prompt()
    streamer = RecordingStreamer()
    out = model.generate(prompt, do_sample=False, max_new_tokens=25, streamer=streamer)
    assert streamer.ended
    assert streamer.chunks[0] == prompt[0].tolist()
    streamed = [token for chunk in streamer.chunks[1:] for token in chunk]
    assert streamed == out[0, prompt.shape[1] :].tolist()
    assert any(len(chunk) > 1 for chunk in streamer.chunks[1:])  # several tokens per verification step


def test_text_iterator_streamer_in_a_thread():
    tokenizer = tiny_tokenizer()
    model = make_kangaroo("qwen2", draft_threshold=0.0, max_draft_tokens=3)
    prompt = _prompt(5, 1)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    thread = threading.Thread(
        target=model.generate, kwargs=dict(inputs=prompt, do_sample=False, max_new_tokens=20, streamer=streamer)
    )
    thread.start()
    text = "".join(streamer)
    thread.join()
    expected = model.get_base_model().generate(prompt, do_sample=False, max_new_tokens=20)
    assert text == tokenizer.decode(expected[0, 5:])


class StopAfterToken(StoppingCriteria):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_custom_stopping_criteria_stop_where_the_base_stops():
    model = make_kangaroo("mistral", draft_threshold=0.0, max_draft_tokens=5)
    prompt = _prompt(4, 2)
    free_run = model.get_base_model().generate(prompt, do_sample=False, max_new_tokens=30)[0, 4:].tolist()
    token = next(t for i, t in enumerate(free_run) if i >= 6 and t not in free_run[:i])
    criteria = StoppingCriteriaList([StopAfterToken(token)])
    expected = model.get_base_model().generate(prompt, do_sample=False, max_new_tokens=30, stopping_criteria=criteria)
    actual = model.generate(prompt, do_sample=False, max_new_tokens=30, stopping_criteria=criteria)
    assert actual.tolist() == expected.tolist()
    assert actual[0, -1].item() == token


def test_return_dict_in_generate_with_scores():
    model = make_kangaroo("llama", draft_threshold=0.0, max_draft_tokens=4)
    prompt = _prompt(7, 3)
    kwargs = dict(do_sample=False, max_new_tokens=12, return_dict_in_generate=True, output_scores=True)
    expected = model.get_base_model().generate(prompt, **kwargs)
    actual = model.generate(prompt, **kwargs)
    assert actual.sequences.tolist() == expected.sequences.tolist()
    assert len(actual.scores) == len(expected.scores) == 12
    for ours, theirs in zip(actual.scores, expected.scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_pipeline_decodes_with_kangaroo():
    tokenizer = tiny_tokenizer()
    model = make_kangaroo("llama", draft_threshold=0.0, max_draft_tokens=4)
    prompt = "hello kangaroo"
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    ours = generator(prompt, max_new_tokens=15, do_sample=False)[0]["generated_text"]
    assert model.last_generate_stats is not None and model.last_generate_stats.new_tokens == 15
    theirs = pipeline("text-generation", model=model.get_base_model(), tokenizer=tokenizer)(
        prompt, max_new_tokens=15, do_sample=False
    )[0]["generated_text"]
    assert ours == theirs


def test_auto_classes_know_kangaroo():
    model = make_kangaroo("qwen2", exit_layer=1)
    config = AutoConfig.for_model("kangaroo", base_config=model.config.base_config.to_dict(), exit_layer=1)
    assert isinstance(config, KangarooConfig)
    built = AutoModelForCausalLM.from_config(config)
    assert isinstance(built, KangarooForCausalLM)
    assert type(built.get_base_model()).__name__ == "Qwen2ForCausalLM"


def test_forward_returns_the_base_loss_and_logits(arch):
    model = make_kangaroo(arch)
    ids = _prompt(12, 4)
    ours = model(ids, labels=ids)
    theirs = model.get_base_model()(ids, labels=ids)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=0)
    split = model(ids, labels=ids, output_exit_hidden_states=True)  # the two-slice path computes the same thing
    torch.testing.assert_close(split.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.loss, theirs.loss, rtol=1e-5, atol=1e-5)
    assert split.exit_hidden_states.shape == (1, 12, model.parts.config.hidden_size)


def test_wraps_the_given_base_without_copying():
    model = make_kangaroo("llama")
    base = model.get_base_model()
    assert model.parts.lm_head is base.lm_head
    assert model.parts.layers is base.model.layers
    adapter_params = sum(p.numel() for p in model.adapter.parameters())
    base_params = sum(p.numel() for p in base.parameters())
    assert sum(p.numel() for p in model.parameters()) == adapter_params + base_params
