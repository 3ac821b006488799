"""Adapter training end to end on a tiny random Llama: data masks, feature cache, loss, metrics, checkpoints, CLI."""

from __future__ import annotations

import json
import random
import shutil
import stat

import pytest
import torch
from safetensors import safe_open

from conftest import VOCAB, tiny_base, tiny_tokenizer
from kangaroo_hf import KangarooForCausalLM
from kangaroo_hf.training import TrainingArguments, prepare_model, train_adapter
from kangaroo_hf.training.data import (
    EncodedConversation,
    SelfDistillArguments,
    encode_conversation,
    encode_conversations,
    load_conversations,
    self_distill,
    split_validation,
)
from kangaroo_hf.training.features import FeatureCache
from kangaroo_hf.training.loss import simulate_tau

# One character per token in the tiny vocabulary: '9' opens a turn, the role's initial follows, '8' closes it.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '9' + message['role'][0] + message['content'] + '8' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '9a' }}{% endif %}"
)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _conversations(count: int, seed: int = 0) -> list[dict]:
    """Short conversations whose answers follow the prompt (a shifted copy), one or two exchanges each."""
    rng = random.Random(seed)
    conversations = []
    for index in range(count):
        messages = []
        for _ in range(1 + (index % 3 == 0)):
            prompt = "".join(rng.choice(LETTERS) for _ in range(rng.randint(4, 12)))
            answer = "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in prompt) + str(index % 10)
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        conversations.append({"id": f"tiny-{index:04d}", "messages": messages})
    return conversations


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in _conversations(60)))
    return path


def _args(tmp_path, name: str, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / name),
        feature_cache_dir=str(tmp_path / "features"),
        exit_layer=2,
        max_length=48,
        validation_size=10,
        extraction_dtype="float32",
        shard_tokens=400,
        batch_tokens=160,
        num_epochs=2,
        learning_rate=1e-2,
        warmup_ratio=0.1,
        logging_steps=1,
        seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def test_assistant_mask_covers_answer_and_end_of_turn_only():
    tokenizer = chat_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    encoded = encode_conversation(tokenizer, messages)
    assert tokenizer.convert_ids_to_tokens(encoded.input_ids) == list("9uhi89ayo8")
    assert encoded.assistant_mask == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    # A cut answer: the base never emitted the end-of-turn token, so it is no target.
    truncated = encode_conversation(tokenizer, [messages[0], {**messages[1], "truncated": True}])
    assert truncated.assistant_mask == [0, 0, 0, 0, 0, 0, 0, 1, 1, 0]
    two_turns = messages + [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}]
    assert encode_conversation(tokenizer, two_turns).assistant_mask == [0] * 7 + [1] * 3 + [0] * 7 + [1, 1]
    assert encode_conversation(tokenizer, two_turns, max_length=8).assistant_mask == [0] * 7 + [1]


def test_fallback_rendering_without_chat_template():
    tokenizer = tiny_tokenizer()  # no chat template: "role: content" lines
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    encoded = encode_conversation(tokenizer, messages)
    text = "user: hi\nassistant: yo\n"
    assert len(encoded.input_ids) == len(text)
    assert [text[i] for i, m in enumerate(encoded.assistant_mask) if m] == ["y", "o"]


def test_loading_mixes_sources_and_checks_messages(tmp_path, jsonl):
    other = tmp_path / "other.jsonl"
    exchange = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    other.write_text(json.dumps({"messages": exchange}))
    mixed = load_conversations([jsonl, other], max_examples_per_source=20, seed=1)
    assert len(mixed) == 21 and "other-000000" in {c["id"] for c in mixed}
    train, validation = split_validation(mixed, 5, seed=0)
    assert len(train) == 16 and len(validation) == 5
    assert not {c["id"] for c in train} & {c["id"] for c in validation}
    assert len(load_conversations(iter(_conversations(7)))) == 7  # any iterable of dicts (e.g. a datasets.Dataset)
    with pytest.raises(ValueError, match="no assistant turn"):
        load_conversations([{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(ValueError, match="role"):
        load_conversations([{"messages": [{"role": "bot", "content": "x"}]}])


def test_simulate_tau_replays_rounds():
    # 8 answer tokens, all drafts right and confident, at most 3 drafts: prefill 1 token, rounds of 4 and 3 tokens.
    result = simulate_tau([[[True] * 8]], [[[1.0] * 8]], draft_threshold=0.5, max_draft=3)
    assert result["tau"] == pytest.approx(8 / 3)
    # Unconfident first drafts: one draft per round; wrong ones cost a step each.
    correct = [[True, True, False, True, True, True]]
    result = simulate_tau([correct], [[[0.1] * 6]], draft_threshold=0.5, max_draft=4)
    assert result["tau"] == pytest.approx(6 / 4)
    # Depth-dependent drafts (adapter_context="final"): the second draft of a round reads depth 1.
    by_depth = [[True] * 6, [False] * 6]
    assert simulate_tau([by_depth], [[[1.0] * 6] * 2], 0.0, max_draft=3)["tau"] == pytest.approx(6 / 4)


def test_only_the_adapter_is_trainable(tmp_path):
    model = prepare_model(tiny_base("llama"), _args(tmp_path, "frozen"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("adapter.") for name in trainable)
    # Early-exit initialisation: the adapter starts as the base's own final norm on the exit states.
    exit_states = torch.randn(1, 5, model.parts.config.hidden_size)
    out = model.adapter_forward(exit_states, torch.arange(5).unsqueeze(0), None)
    torch.testing.assert_close(out, model.parts.norm(exit_states), rtol=1e-5, atol=1e-5)


def test_feature_cache_is_sharded_half_precision(tmp_path, jsonl):
    tokenizer = chat_tokenizer()
    model = prepare_model(tiny_base("llama"), _args(tmp_path, "cache"))
    sequences = encode_conversations(tokenizer, load_conversations([jsonl]), max_length=48)
    cache = FeatureCache.build(model, sequences, tmp_path / "cache", layers=[1, 2], shard_tokens=300)
    assert len(cache.shards) > 1
    assert cache.num_sequences == len(sequences) and cache.num_tokens == sum(len(s.input_ids) for s in sequences)
    with safe_open(tmp_path / "cache" / cache.shards[0]["file"], framework="pt") as shard:
        assert {"hidden.1", "hidden.2", "last", "input_ids", "assistant_mask", "offsets"} <= set(shard.keys())
        assert shard.get_tensor("hidden.2").dtype == torch.float16
        assert shard.get_tensor("last").dtype == torch.float16
    # Shards are readable wherever index.json is (safetensors alone would leave them 0600).
    index_mode = stat.S_IMODE((tmp_path / "cache" / "index.json").stat().st_mode)
    assert {stat.S_IMODE((tmp_path / "cache" / s["file"]).stat().st_mode) for s in cache.shards} == {index_mode}
    first = cache.load_shard(0, exit_layer=2)[0]
    assert first.input_ids.tolist() == sequences[0].input_ids
    with torch.no_grad():
        reference = model(torch.tensor([sequences[0].input_ids]), output_exit_hidden_states=True)
    torch.testing.assert_close(first.exit_states.float(), reference.exit_hidden_states[0], rtol=2e-3, atol=2e-3)
    # The teacher: the base's own logits come back from the cached (post-norm) last states.
    teacher_logits = model.lm_head_logits(first.last_states.float())
    torch.testing.assert_close(teacher_logits, reference.logits[0], rtol=1e-2, atol=1e-2)
    # Same data, same settings: reused; other data: refused.
    assert FeatureCache.build(model, sequences, tmp_path / "cache", layers=[1, 2], shard_tokens=300).index
    with pytest.raises(ValueError, match="other data"):
        FeatureCache.build(model, sequences[:5], tmp_path / "cache", layers=[1, 2], shard_tokens=300)


def test_training_lowers_the_loss_and_reports_metrics(tmp_path, jsonl):
    args = _args(tmp_path, "run", num_epochs=3)
    result = train_adapter(tiny_base("llama"), [jsonl], args, chat_tokenizer())
    assert len(result.train_loss) == result.global_step
    assert sum(result.train_loss[-3:]) < sum(result.train_loss[:3])
    assert [entry["epoch"] for entry in result.metrics] == [1, 2, 3]
    first, last = result.metrics[0]["validation"], result.metrics[-1]["validation"]
    for metrics in (first, last):
        assert 0.0 <= metrics["top1_agreement"] <= 1.0
        assert 0.0 <= metrics["expected_acceptance"] <= 1.0
        longest = 1.0 + metrics["simulated_max_draft_tokens"]
        assert all(1.0 <= tau <= longest for tau in metrics["simulated_tau"].values())
    assert last["loss"] < first["loss"]
    written = json.loads((tmp_path / "run" / "kangaroo_metrics.json").read_text())
    assert written["epochs"][-1]["validation"] == last
    checkpoint = tmp_path / "run" / f"checkpoint-{result.global_step}"
    assert (checkpoint / "kangaroo_metrics.json").is_file()
    json_mode = (checkpoint / "kangaroo_metrics.json").stat().st_mode
    for name in ("adapter_weights.safetensors", "optimizer.safetensors"):  # not safetensors' own 0600
        assert (checkpoint / name).stat().st_mode == json_mode
    assert json.loads((tmp_path / "run" / "training_args.json").read_text())["exit_layer"] == 2
    # The saved adapter reloads onto the base.
    reloaded = KangarooForCausalLM.from_pretrained(tmp_path / "run", base_model=result.model.get_base_model())
    for name, tensor in result.model.adapter_state_dict().items():
        torch.testing.assert_close(reloaded.adapter_state_dict()[name], tensor)


def test_resume_continues_from_the_checkpoint_and_matches_an_uninterrupted_run(tmp_path, jsonl):
    tokenizer = chat_tokenizer()
    full = train_adapter(tiny_base("llama"), [jsonl], _args(tmp_path, "full", save_steps=3), tokenizer)
    assert full.global_step > 3
    # An "interrupted" run: only the step-3 checkpoint survived.
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", interrupted / "checkpoint-3")
    args = _args(tmp_path, "interrupted", save_steps=3, resume_from_checkpoint="latest")
    resumed = train_adapter(tiny_base("llama"), [jsonl], args, tokenizer)
    assert resumed.global_step == full.global_step
    assert len(resumed.train_loss) == len(full.train_loss)
    torch.testing.assert_close(resumed.train_loss[3:], full.train_loss[3:], rtol=1e-5, atol=1e-6)
    for name, tensor in full.model.adapter_state_dict().items():
        torch.testing.assert_close(resumed.model.adapter_state_dict()[name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adapter_context", ["exit", "final"])
def test_online_features_train_exactly_like_a_float32_disk_cache(tmp_path, jsonl, adapter_context):
    tokenizer = chat_tokenizer()
    settings = dict(adapter_context=adapter_context, draft_vocab_size=20)
    online = train_adapter(
        tiny_base("llama"), [jsonl], _args(tmp_path, "online", online_features=True, **settings), tokenizer
    )
    assert not (tmp_path / "features").exists()  # nothing was cached
    disk = train_adapter(
        tiny_base("llama"), [jsonl], _args(tmp_path, "disk", feature_dtype="float32", **settings), tokenizer
    )
    assert (tmp_path / "features" / "train" / "index.json").is_file()
    assert online.global_step == disk.global_step
    torch.testing.assert_close(online.train_loss, disk.train_loss, rtol=1e-4, atol=1e-5)
    assert online.metrics[-1]["validation"]["simulated_tau"] == disk.metrics[-1]["validation"]["simulated_tau"]
    torch.testing.assert_close(
        online.model.adapter_state_dict(), disk.model.adapter_state_dict(), rtol=1e-4, atol=1e-5
    )


def test_online_features_refuse_an_uncomputed_layer(tmp_path, jsonl):
    from kangaroo_hf.training.features import OnlineFeatures

    model = prepare_model(tiny_base("llama"), TrainingArguments(exit_layer=2))
    sequences = encode_conversations(chat_tokenizer(), load_conversations([jsonl]), 48)
    features = OnlineFeatures(model, sequences, [2], shard_tokens=300)
    assert features.num_sequences == len(sequences) and len(features.shards) > 1
    assert features.num_tokens == sum(len(s.input_ids) for s in sequences)
    with pytest.raises(ValueError, match=r"exit_layer=3 is not among the online feature layers \[2\]"):
        features.load_shard(0, 3)
    with pytest.raises(ValueError, match=r"Feature layers must lie in \[1, 3\], got \[4\]"):
        OnlineFeatures(model, sequences, [4])


def test_self_distill_writes_the_base_greedy_answers(tmp_path):
    tokenizer = chat_tokenizer()
    base = tiny_base("llama")
    conversations = _conversations(5, seed=3)
    cache = tmp_path / "distilled.jsonl"
    settings = SelfDistillArguments(max_new_tokens=6, batch_size=3, chunk_size=4)
    distilled = self_distill(base, tokenizer, conversations, cache, settings)
    assert [c["id"] for c in distilled] == [c["id"] for c in conversations]
    for original, answered in zip(conversations, distilled, strict=True):
        # No end-of-turn token in the tiny model: every answer is cut at max_new_tokens, so later turns are dropped.
        assert answered["messages"][0] == original["messages"][0]
        assert len(answered["messages"]) == 2 and answered["messages"][1]["truncated"]
        prompt = tokenizer.apply_chat_template(original["messages"][:1], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        expected = base.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=0)[0, ids.shape[1] :]
        assert answered["messages"][1]["content"] == tokenizer.decode(expected, skip_special_tokens=True)
    # Resumable: a second call generates nothing new.
    assert len(self_distill(base, tokenizer, conversations, cache, settings)) == len(conversations)


def test_cli_train_on_a_saved_base(tmp_path, jsonl):
    from kangaroo_hf.cli import main

    folder = tmp_path / "base"
    tiny_base("llama").save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    output = tmp_path / "cli-run"
    argv = ["train", "--data", str(jsonl), "--base", str(folder), "--output-dir", str(output), "--num-epochs", "1"]
    argv += ["--max-length", "48", "--batch-tokens", "160", "--validation-size", "10", "--extraction-dtype", "float32"]
    assert main(argv) == 0
    metrics = json.loads((output / "kangaroo_metrics.json").read_text())
    assert 0.0 <= metrics["epochs"][-1]["validation"]["top1_agreement"] <= 1.0


@pytest.mark.parametrize("adapter_mlp", [False, True], ids=["attention", "full-layer"])
def test_training_with_final_state_context(tmp_path, jsonl, adapter_mlp):
    args = _args(tmp_path, "final", adapter_context="final", adapter_mlp=adapter_mlp, num_epochs=2)
    result = train_adapter(tiny_base("llama"), [jsonl], args, chat_tokenizer())
    assert result.model.config.adapter_context == "final"
    assert result.model.config.adapter_mlp is adapter_mlp
    if adapter_mlp:  # trained from the early-exit start (zero MLP output) into a non-trivial MLP
        assert result.model.adapter.layers[0].mlp.down_proj.weight.abs().sum() > 0
        reloaded = KangarooForCausalLM.from_pretrained(result.output_dir, base_model=result.model.get_base_model())
        torch.testing.assert_close(reloaded.adapter_state_dict(), result.model.adapter_state_dict())
    assert sum(result.train_loss[-3:]) < sum(result.train_loss[:3])
    validation = result.metrics[-1]["validation"]
    depths = validation["top1_agreement_by_depth"]
    assert len(depths) == result.model.config.max_draft_tokens and all(0.0 <= a <= 1.0 for a in depths)


def test_loss_on_all_tokens_trains_on_every_position(tmp_path, jsonl):
    from kangaroo_hf.training.loss import make_batch

    tokenizer = chat_tokenizer()
    model = prepare_model(tiny_base("llama"), _args(tmp_path, "all"))
    sequences = encode_conversations(tokenizer, load_conversations([jsonl])[:4], max_length=48)
    cache = FeatureCache.build(model, sequences, tmp_path / "all-cache", layers=[2])
    cached = cache.load_shard(0, exit_layer=2)
    answers_only, everything = make_batch(cached, "cpu"), make_batch(cached, "cpu", all_tokens=True)
    assert answers_only.num_loss_tokens == sum(sum(s.assistant_mask[1:]) for s in sequences)
    assert everything.num_loss_tokens == sum(len(s.input_ids) - 1 for s in sequences)
    assert everything.teacher_states.shape[0] == everything.num_loss_tokens
    args = _args(tmp_path, "all", loss_on="all", num_epochs=1)
    result = train_adapter(tiny_base("llama"), [jsonl], args, tokenizer)
    assert 0.0 <= result.metrics[-1]["validation"]["top1_agreement"] <= 1.0


@pytest.mark.parametrize("subset", [False, True])
def test_hand_written_gradient_matches_autograd(subset):
    from kangaroo_hf.training.loss import DistillStats, distill_loss_chunks

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 30, bias=False)
    draft, teacher = torch.randn(7, 8), torch.randn(7, 8)
    ids = torch.tensor([0, 3, 4, 9, 12, 20, 29]) if subset else None
    grad = distill_loss_chunks(
        head, draft, teacher, 3, DistillStats(), loss_scale=0.5, vocab_ids=ids, full_teacher=False
    )
    weight = head.weight if ids is None else head.weight[ids]
    leaf = draft.clone().requires_grad_()
    target = (teacher @ weight.T).softmax(-1)
    loss = -(target * (leaf @ weight.T).log_softmax(-1)).sum() * 0.5
    loss.backward()
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-4, atol=1e-6)


def test_training_with_a_draft_vocabulary(tmp_path, jsonl):
    args = _args(tmp_path, "vocab", draft_vocab_size=20, num_epochs=2)
    result = train_adapter(tiny_base("llama"), [jsonl], args, chat_tokenizer())
    ids = result.model.adapter.draft_vocab_ids
    assert result.model.config.draft_vocab_size == 20 and ids.numel() == 20
    answer_tokens = {
        token
        for c in _conversations(60)
        for m in c["messages"]
        if m["role"] == "assistant"
        for token in chat_tokenizer()(m["content"] + "8", add_special_tokens=False)["input_ids"]
    }
    assert set(ids.tolist()) <= answer_tokens
    assert sum(result.train_loss[-3:]) < sum(result.train_loss[:3])
    assert 0.0 <= result.metrics[-1]["validation"]["top1_agreement"] <= 1.0
    reloaded = KangarooForCausalLM.from_pretrained(tmp_path / "vocab", base_model=result.model.get_base_model())
    assert reloaded.adapter.draft_vocab_ids.tolist() == ids.tolist()


@pytest.mark.parametrize("subset", [False, True])
def test_token_targets_are_cross_entropy_on_the_next_token(subset):
    from kangaroo_hf.training.loss import DistillStats, distill_loss_chunks

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 30, bias=False)
    draft = torch.randn(7, 8)
    ids = torch.tensor([0, 3, 4, 9, 12, 20, 29]) if subset else None
    targets = torch.tensor([3, 3, 9, 5, 29, 0, 12])  # 5 lies outside the subset
    stats = DistillStats()
    grad = distill_loss_chunks(
        head, draft, None, 3, stats, loss_scale=0.5, vocab_ids=ids, full_teacher=False, target_ids=targets
    )
    weight = head.weight if ids is None else head.weight[ids]
    columns = targets if ids is None else torch.searchsorted(ids, targets)
    inside = torch.ones(7, dtype=torch.bool) if ids is None else ids[columns.clamp(max=6)] == targets
    leaf = draft.clone().requires_grad_()
    log_probs = (leaf @ weight.T).log_softmax(-1)
    losses = -log_probs.gather(1, columns.clamp(max=weight.shape[0] - 1)[:, None])[:, 0]
    (losses[inside].sum() * 0.5).backward()
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-4, atol=1e-6)
    assert stats.loss == pytest.approx(float(losses[inside].sum().detach()), rel=1e-5)
    # Agreement is top-1 == target over every position; a target the draft cannot propose is a miss.
    draft_top = (draft @ weight.T).argmax(-1)
    draft_ids = draft_top if ids is None else ids[draft_top]
    assert stats.agree == float((draft_ids == targets).sum())
    if subset:
        assert grad[3].abs().sum() == 0  # the outside target has no loss, so no gradient
    # Evaluation's form (drafts mapped back to the vocabulary) counts the same agreement.
    full = DistillStats()
    distill_loss_chunks(head, draft, None, 4, full, vocab_ids=ids, target_ids=targets)
    assert full.agree == stats.agree and full.tokens == 7


def test_token_targets_train_without_running_the_deep_layers(tmp_path, jsonl):
    base = tiny_base("llama")
    deep_calls = []
    for layer in base.model.layers[2:]:
        layer.register_forward_hook(lambda *_: deep_calls.append(1))
    for online in (False, True):
        args = _args(tmp_path, f"tokens-{online}", targets="tokens", online_features=online, num_epochs=3)
        result = train_adapter(base, [jsonl], args, chat_tokenizer())
        assert sum(result.train_loss[-3:]) < sum(result.train_loss[:3])
        first, last = result.metrics[0]["validation"], result.metrics[-1]["validation"]
        assert last["loss"] < first["loss"] and 0.0 <= last["top1_agreement"] <= 1.0
        base = result.model.get_base_model()
    assert not deep_calls  # features up to the exit layer only: no full forward of the base
    cache = FeatureCache(tmp_path / "features" / "train")
    assert not cache.has_last_states
    with safe_open(tmp_path / "features" / "train" / cache.shards[0]["file"], framework="pt") as shard:
        assert "last" not in shard.keys() and "hidden.2" in shard.keys()
    # Distribution targets need what this cache lacks: refused with the way out, never trained on silently.
    with pytest.raises(ValueError, match="no last-layer states"):
        train_adapter(tiny_base("llama"), cache, _args(tmp_path, "refused"))


def test_token_targets_on_self_distilled_answers_match_distribution_targets_top1(tmp_path):
    """On the base's own greedy text, the next token is the base's argmax: both targets agree on top-1 metrics."""
    from kangaroo_hf.training.loss import DistillStats, distill_loss_chunks, make_batch

    tokenizer = chat_tokenizer()
    model = prepare_model(tiny_base("llama"), _args(tmp_path, "greedy"))
    prompt = torch.tensor([tokenizer("9uabcd89a", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        answer = model.get_base_model().generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1] :]
    ids = prompt[0].tolist() + answer.tolist()
    sequence = EncodedConversation(ids, [0] * prompt.shape[1] + [1] * len(answer), "greedy")
    cache = FeatureCache.build(model, [sequence], tmp_path / "greedy-cache", layers=[2], storage_dtype="float32")
    batch = make_batch(cache.load_shard(0, exit_layer=2), "cpu")
    hidden = model.adapter_forward(batch.exit_states, batch.position_ids, None)[batch.loss_mask].detach()
    by_distribution, by_tokens = DistillStats(), DistillStats()
    distill_loss_chunks(model.parts.lm_head, hidden, batch.teacher_states, 8, by_distribution)
    distill_loss_chunks(model.parts.lm_head, hidden, None, 8, by_tokens, target_ids=batch.target_ids)
    assert by_tokens.tokens == by_distribution.tokens == len(answer)
    assert by_tokens.agree == by_distribution.agree


def test_training_arguments_reject_inconsistent_targets():
    with pytest.raises(ValueError, match="targets must be"):
        TrainingArguments(targets="logits")
    with pytest.raises(ValueError, match="targets='distribution'"):
        TrainingArguments(targets="tokens", adapter_context="final")
    with pytest.raises(ValueError, match="autocast_adapter needs mixed_precision"):
        TrainingArguments(autocast_adapter=True)
    assert not TrainingArguments(targets="tokens").needs_last_states
    assert TrainingArguments(adapter_context="final").needs_last_states


def test_autocast_adapter_trains_in_bfloat16(tmp_path, jsonl):
    args = _args(tmp_path, "autocast", targets="tokens", mixed_precision="bf16", autocast_adapter=True)
    result = train_adapter(tiny_base("llama"), [jsonl], args, chat_tokenizer())
    assert sum(result.train_loss[-3:]) < sum(result.train_loss[:3])
    assert all(p.dtype == torch.float32 for p in result.model.adapter.parameters())  # float32 master weights


def test_cli_train_continues_a_saved_adapter(tmp_path, jsonl):
    from kangaroo_hf.cli import main

    folder = tmp_path / "base"
    tiny_base("llama").save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    saved = KangarooForCausalLM.from_base(tiny_base("llama"), exit_layer=1, adapter_mlp=True)
    saved.set_draft_vocab(list(range(1, VOCAB)))  # every token but one
    saved.save_pretrained(tmp_path / "saved-adapter")
    output = tmp_path / "continued"
    argv = ["train", "--data", str(jsonl), "--base", str(folder), "--output-dir", str(output), "--num-epochs", "1"]
    argv += ["--max-length", "48", "--batch-tokens", "160", "--validation-size", "10", "--extraction-dtype", "float32"]
    argv += ["--init-adapter", str(tmp_path / "saved-adapter"), "--targets", "tokens", "--learning-rate", "1e-2"]
    argv += ["--draft-vocab-size", "16"]  # the saved adapter's own draft vocabulary wins
    assert main(argv) == 0
    continued = KangarooForCausalLM.from_pretrained(output, base_model=tiny_base("llama"))
    # The saved adapter's shape (not a fresh default adapter), trained further.
    assert continued.config.exit_layer == 1 and continued.config.adapter_mlp
    before, after = saved.adapter_state_dict(), continued.adapter_state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    recorded = json.loads((output / "training_args.json").read_text())
    assert (recorded["exit_layer"], recorded["adapter_mlp"], recorded["targets"]) == (1, True, "tokens")
    assert continued.adapter.draft_vocab_ids.tolist() == list(range(1, VOCAB))
    assert recorded["draft_vocab_size"] == VOCAB - 1
    assert recorded["init_adapter"] == str(tmp_path / "saved-adapter")  # where training started is on record
    with pytest.raises(ValueError, match="init_adapter needs a plain base"):
        prepare_model(continued, TrainingArguments(init_adapter=str(tmp_path / "saved-adapter")))
