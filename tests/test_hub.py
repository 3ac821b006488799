"""Adapter-only checkpoints: save, load (folder, offline HF cache, base reuse), cards, push, and safe loading."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils import filter_repo_objects
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import kangaroo_hf  # noqa: F401  (registers the Auto classes)
from conftest import VOCAB, make_kangaroo, tiny_base
from kangaroo_hf import KangarooForCausalLM, default_model
from kangaroo_hf.core.checkpoint import ADAPTER_WEIGHTS_NAME, AUTO_MAP, BASE_SUBFOLDER

CHECKPOINT_FILES = {
    "README.md",
    "config.json",
    "configuration_kangaroo.py",
    "generation_config.json",
    ADAPTER_WEIGHTS_NAME,
    "modeling_kangaroo.py",
}


def _prompt(length: int = 6, seed: int = 0) -> torch.LongTensor:
    return torch.randint(2, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _kangaroo_over_saved_base(tmp_path: Path, arch: str = "llama", **kwargs) -> KangarooForCausalLM:
    """A Kangaroo whose base was saved with `save_pretrained` and reloaded, so its name is that folder."""
    reference = make_kangaroo(arch, **kwargs)
    base_dir = tmp_path / f"{arch}-base"
    reference.get_base_model().save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    model = KangarooForCausalLM.from_base(base, exit_layer=reference.config.exit_layer, **kwargs).eval()
    model.load_adapter_state_dict(reference.adapter_state_dict())
    with torch.no_grad():  # every adapter weight must matter to the drafts
        generator = torch.Generator().manual_seed(1)
        for parameter in model.adapter.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    assert model.config.base_model_name_or_path == str(base_dir)
    return model


def _outputs(model: KangarooForCausalLM, sample: bool = True) -> dict:
    """Greedy tokens and speculation statistics (which depend on the adapter), and seeded sampled tokens."""
    prompt = _prompt()
    greedy = model.generate(prompt, do_sample=False, max_new_tokens=12)[0].tolist()
    outputs = {"greedy": greedy, "greedy_stats": model.last_generate_stats.to_dict()}
    if sample:
        torch.manual_seed(3)
        outputs["sampled"] = model.generate(prompt, do_sample=True, max_new_tokens=12)[0].tolist()
    return outputs


def _assert_same_adapter(loaded: KangarooForCausalLM, original: KangarooForCausalLM) -> None:
    expected = original.adapter_state_dict()
    actual = loaded.adapter_state_dict()
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0)


# -- save ---------------------------------------------------------------------------------------------------------


def test_save_writes_an_adapter_only_safetensors_checkpoint(tmp_path):
    model = _kangaroo_over_saved_base(tmp_path, draft_threshold=0.3, max_draft_tokens=4)
    folder = tmp_path / "kangaroo"
    written = model.save_pretrained(folder)
    files = {p.name for p in folder.iterdir()}
    assert files == CHECKPOINT_FILES == set(written)
    # Not PEFT's names: transformers would treat the folder as a PEFT adapter.
    assert not files & {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "kangaroo"
    assert config["base_model_name_or_path"] == str(tmp_path / "llama-base")
    assert "base_model_revision" in config
    assert (config["exit_layer"], config["draft_threshold"], config["max_draft_tokens"]) == (2, 0.3, 4)
    assert config["auto_map"] == AUTO_MAP
    assert config["base_config"]["model_type"] == "llama"
    weights = load_file(folder / ADAPTER_WEIGHTS_NAME)
    assert sorted(weights) == sorted(model.adapter_state_dict())
    assert all(name.startswith("adapter.") for name in weights)
    base_bytes = (tmp_path / "llama-base" / "model.safetensors").stat().st_size
    assert (folder / ADAPTER_WEIGHTS_NAME).stat().st_size < base_bytes / 4


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_saved_weights_are_as_readable_as_the_config_beside_them(tmp_path):
    # safetensors 0.8 creates its files 0600 whatever the umask; a checkpoint must be readable wherever its
    # config.json is (a container's runtime user, a shared model folder), and an overwrite keeps a chosen mode.
    model = make_kangaroo()
    folder = tmp_path / "kangaroo"
    model.save_pretrained(folder)
    weights, config = folder / ADAPTER_WEIGHTS_NAME, folder / "config.json"
    assert stat.S_IMODE(weights.stat().st_mode) == stat.S_IMODE(config.stat().st_mode)
    os.chmod(weights, 0o640)
    model.save_pretrained(folder)
    assert stat.S_IMODE(weights.stat().st_mode) == 0o640
    # A new file follows the process's umask, which saving leaves as it was.
    previous = os.umask(0o027)
    try:
        model.save_pretrained(tmp_path / "private")
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "private" / ADAPTER_WEIGHTS_NAME).stat().st_mode) == 0o640


def test_safe_serialization_false_is_refused(tmp_path):
    with pytest.raises(ValueError, match="safetensors only"):
        make_kangaroo().save_pretrained(tmp_path, safe_serialization=False)


# -- load ---------------------------------------------------------------------------------------------------------


@pytest.mark.compat
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_round_trip_reproduces_generation_token_for_token(tmp_path, arch):
    model = _kangaroo_over_saved_base(tmp_path, arch, draft_threshold=0.2, max_draft_tokens=4)
    folder = tmp_path / "kangaroo"
    model.save_pretrained(folder)
    expected = _outputs(model)
    assert expected["greedy_stats"]["accepted_drafts"] > 0
    loaded = KangarooForCausalLM.from_pretrained(folder)
    auto_loaded = AutoModelForCausalLM.from_pretrained(folder)
    for candidate in (loaded, auto_loaded):
        assert type(candidate) is KangarooForCausalLM
        assert not candidate.training
        assert candidate.config.exit_layer == 2 and candidate.config.draft_threshold == 0.2
        _assert_same_adapter(candidate, model)
    assert _outputs(loaded) == expected
    assert _outputs(auto_loaded, sample=False) == {k: v for k, v in expected.items() if k != "sampled"}


@pytest.mark.parametrize("weights_dtype", ["float16", "int8"])
def test_smaller_weight_storage_round_trips_and_stays_lossless(tmp_path, weights_dtype):
    model = _kangaroo_over_saved_base(tmp_path, adapter_mlp=True, draft_threshold=0.2, max_draft_tokens=4)
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "small", weights_dtype=weights_dtype)
    full_bytes = (tmp_path / "full" / ADAPTER_WEIGHTS_NAME).stat().st_size
    small_bytes = (tmp_path / "small" / ADAPTER_WEIGHTS_NAME).stat().st_size
    assert small_bytes < full_bytes * (0.55 if weights_dtype == "float16" else 0.4)
    loaded = KangarooForCausalLM.from_pretrained(tmp_path / "small", base_model=model.get_base_model())
    expected = model.adapter_state_dict()
    actual = loaded.adapter_state_dict()
    assert sorted(actual) == sorted(expected)  # the row scales are not adapter weights
    for name, tensor in expected.items():
        if not tensor.is_floating_point():
            assert torch.equal(actual[name], tensor)
        elif weights_dtype == "int8" and tensor.dim() == 2:  # within half a step of its row's int8 grid
            step = tensor.abs().amax(dim=1, keepdim=True) / 127
            assert ((actual[name] - tensor).abs() <= step / 2 + 1e-7).all()
            assert not torch.equal(actual[name], tensor)
        else:  # int8 keeps vectors (norm weights) as they are
            stored = tensor if weights_dtype == "int8" else tensor.half().float()
            torch.testing.assert_close(actual[name], stored, rtol=0, atol=0)
    prompt = _prompt(seed=5)
    plain = model.generate(prompt, do_sample=False, max_new_tokens=16, use_kangaroo=False)
    assert torch.equal(loaded.generate(prompt, do_sample=False, max_new_tokens=16), plain)
    card = (tmp_path / "small" / "README.md").read_text()
    assert ("int8 with row scales/float32" if weights_dtype == "int8" else "MB, float16)") in card


def test_unknown_weights_dtype_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"weights_dtype must be one of .*'int4'"):
        make_kangaroo().save_pretrained(tmp_path / "kangaroo", weights_dtype="int4")
    assert not (tmp_path / "kangaroo").exists()


@pytest.mark.parametrize("damage", ["missing scale", "orphan scale", "unknown format"])
def test_damaged_int8_checkpoint_is_named(tmp_path, damage):
    model = make_kangaroo("llama")
    model.save_pretrained(tmp_path / "kangaroo", weights_dtype="int8")
    path = tmp_path / "kangaroo" / ADAPTER_WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as handle:
        weights, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
    name = "adapter.layers.0.self_attn.q_proj.weight"
    if damage == "missing scale":
        del weights[name + ".int8_scale"]
        match = rf"damaged: the int8 weight '{name}' \(64, 64\) needs a row scale"
    elif damage == "orphan scale":
        weights["adapter.extra.weight.int8_scale"] = torch.ones(3)
        match = r"damaged: the scales \['adapter.extra.weight.int8_scale'\] belong to no int8 weight"
    else:
        metadata["kangaroo_weights"] = "int2-blockwise"
        match = r"stores its weights as 'int2-blockwise', which this version .* cannot read"
    save_file(weights, path, metadata=metadata)
    with pytest.raises(ValueError, match=match):
        KangarooForCausalLM.from_pretrained(tmp_path / "kangaroo", base_model=model.get_base_model())


def test_base_model_is_reused_without_copy(tmp_path):
    model = _kangaroo_over_saved_base(tmp_path)
    model.save_pretrained(tmp_path / "kangaroo")
    base = model.get_base_model()
    loaded = KangarooForCausalLM.from_pretrained(tmp_path / "kangaroo", base_model=base)
    assert loaded.get_base_model() is base
    _assert_same_adapter(loaded, model)


@pytest.mark.parametrize("dtype_kwarg", ["dtype", "torch_dtype"])
def test_dtype_passes_through_to_the_base_and_the_adapter_follows(tmp_path, dtype_kwarg):
    model = _kangaroo_over_saved_base(tmp_path)
    model.save_pretrained(tmp_path / "kangaroo")
    loaded = KangarooForCausalLM.from_pretrained(tmp_path / "kangaroo", **{dtype_kwarg: torch.bfloat16})
    assert loaded.get_base_model().dtype == torch.bfloat16
    assert {p.dtype for p in loaded.adapter.parameters()} == {torch.bfloat16}


def test_device_map_and_loading_kwargs_pass_through_to_the_base(tmp_path, monkeypatch):
    model = _kangaroo_over_saved_base(tmp_path)
    model.save_pretrained(tmp_path / "kangaroo")
    calls, original = [], AutoModelForCausalLM.from_pretrained

    def spy(name, **kwargs):
        calls.append((str(name), kwargs))
        return original(name, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    loaded = KangarooForCausalLM.from_pretrained(tmp_path / "kangaroo", device_map="cpu", attn_implementation="eager")
    [(name, kwargs)] = calls
    assert name == str(tmp_path / "llama-base")
    assert kwargs["device_map"] == "cpu" and kwargs["attn_implementation"] == "eager"
    # The base is never trusted with custom code implicitly, and loads from safetensors only.
    assert kwargs["trust_remote_code"] is False and kwargs["use_safetensors"] is True
    assert loaded.get_base_model().config._attn_implementation == "eager"


def test_save_base_bundles_a_full_copy_that_loading_prefers(tmp_path):
    model = _kangaroo_over_saved_base(tmp_path)
    folder = tmp_path / "full"
    model.save_pretrained(folder, save_base=True)
    assert (folder / BASE_SUBFOLDER / "model.safetensors").is_file()
    shutil.rmtree(tmp_path / "llama-base")  # the recorded base is gone: only the bundled copy can serve
    loaded = KangarooForCausalLM.from_pretrained(folder)
    _assert_same_adapter(loaded, model)
    assert _outputs(loaded, sample=False) == _outputs(model, sample=False)


def _cache_repo(cache: Path, repo_id: str, source: Path, commit: str) -> None:
    """Lay out `source` as the cached snapshot of `repo_id` at `commit`, `main` pointing at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, with `HF_HUB_OFFLINE=1`: nothing may come from the network."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.compat
def test_repo_ids_resolve_through_the_offline_hf_cache(tmp_path, offline_cache):
    model = make_kangaroo("llama", base_model_name_or_path="tiny-org/tiny-llama", draft_threshold=0.2)
    model.get_base_model().save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "kangaroo")
    _cache_repo(offline_cache, "tiny-org/tiny-llama", tmp_path / "base", "a" * 40)
    _cache_repo(offline_cache, "tiny-org/tiny-llama-kangaroo", tmp_path / "kangaroo", "b" * 40)
    _assert_same_adapter(KangarooForCausalLM.from_pretrained("tiny-org/tiny-llama-kangaroo"), model)
    loaded = AutoModelForCausalLM.from_pretrained("tiny-org/tiny-llama-kangaroo")
    _assert_same_adapter(loaded, model)
    assert _outputs(loaded, sample=False) == _outputs(model, sample=False)


def test_repo_id_missing_from_the_offline_cache_is_named(offline_cache):
    with pytest.raises(FileNotFoundError, match="tiny-org/not-cached"):
        KangarooForCausalLM.from_pretrained("tiny-org/not-cached")


def test_embedded_base_falls_back_to_the_gguf_when_not_in_the_hf_cache(tmp_path, offline_cache, monkeypatch):
    model = make_kangaroo("llama", base_model_name_or_path=default_model.EMBEDDED_BASE_ID)
    model.save_pretrained(tmp_path / "kangaroo")
    calls = []

    def fake_embedded_base(dtype=torch.float32, device="cpu"):
        calls.append(dtype)
        return tiny_base("llama").to(dtype), None

    monkeypatch.setattr(default_model, "load_embedded_base", fake_embedded_base)
    loaded = KangarooForCausalLM.from_pretrained(tmp_path / "kangaroo", dtype=torch.bfloat16)
    assert calls == [torch.bfloat16]
    assert loaded.get_base_model().dtype == torch.bfloat16
    _assert_same_adapter(loaded, model.to(torch.bfloat16))


def test_load_default_model_reads_the_shipped_adapter_folder(tmp_path, monkeypatch):
    model = make_kangaroo("llama", base_model_name_or_path=default_model.EMBEDDED_BASE_ID)
    model.save_pretrained(tmp_path / "shipped")
    monkeypatch.setattr(default_model, "SHIPPED_ADAPTER", tmp_path / "shipped")
    monkeypatch.setattr(default_model, "load_embedded_base", lambda dtype, device: (model.get_base_model(), "tok"))
    loaded, tokenizer = default_model.load_default_model()
    assert tokenizer == "tok" and loaded.get_base_model() is model.get_base_model()
    _assert_same_adapter(loaded, model)


# -- safe and clear loading ---------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path) -> tuple[KangarooForCausalLM, Path]:
    model = make_kangaroo("llama")
    model.get_base_model().save_pretrained(tmp_path / "base")
    model.config.base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "kangaroo")
    return model, tmp_path / "kangaroo"


def test_pickle_weight_files_are_refused_unread(checkpoint, monkeypatch):
    model, folder = checkpoint
    (folder / ADAPTER_WEIGHTS_NAME).unlink()
    torch.save(model.adapter_state_dict(), folder / "kangaroo_adapter.bin")
    torch.save({}, folder / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle file was read"))
    with pytest.raises(ValueError, match=r"pickle.*kangaroo_adapter\.bin.*pytorch_model\.bin.*safetensors"):
        KangarooForCausalLM.from_pretrained(folder, base_model=model.get_base_model())


def test_missing_adapter_file_is_named(checkpoint):
    model, folder = checkpoint
    (folder / ADAPTER_WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=ADAPTER_WEIGHTS_NAME):
        KangarooForCausalLM.from_pretrained(folder, base_model=model.get_base_model())


@pytest.mark.parametrize("keep", [0, 7, -20])
def test_truncated_or_corrupt_safetensors_is_named(checkpoint, keep):
    model, folder = checkpoint
    path = folder / ADAPTER_WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(ValueError, match=r"kangaroo_adapter\.safetensors.*truncated or corrupt"):
        KangarooForCausalLM.from_pretrained(folder, base_model=model.get_base_model())


@pytest.mark.parametrize(
    "field, value",
    [("hidden_size", 32), ("vocab_size", 128), ("num_attention_heads", 8), ("num_key_value_heads", 4)],
)
def test_base_whose_shapes_differ_from_the_recorded_one(checkpoint, field, value):
    _, folder = checkpoint
    recorded = json.loads((folder / "config.json").read_text())["base_config"][field]
    other = tiny_base("llama", **{field: value})
    with pytest.raises(ValueError, match=rf"{field}: checkpoint {recorded} vs base {value}"):
        KangarooForCausalLM.from_pretrained(folder, base_model=other)


def test_adapter_weights_that_do_not_fit_the_base(checkpoint):
    model, folder = checkpoint
    weights = load_file(folder / ADAPTER_WEIGHTS_NAME)
    name = "adapter.layers.0.self_attn.q_proj.weight"
    weights[name] = torch.zeros(weights[name].shape[0] // 2, weights[name].shape[1])
    save_file(weights, folder / ADAPTER_WEIGHTS_NAME)
    with pytest.raises(ValueError, match=rf"{name}: checkpoint \(32, 64\) vs model \(64, 64\)"):
        KangarooForCausalLM.from_pretrained(folder, base_model=model.get_base_model())


def test_exit_layer_beyond_the_base_depth(checkpoint):
    _, folder = checkpoint
    shallow = tiny_base("llama", num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"exit_layer=2 is beyond the depth .* 2 layers .*recorded 4"):
        KangarooForCausalLM.from_pretrained(folder, base_model=shallow)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "exit_layer": 9}))
    with pytest.raises(ValueError, match=r"exit_layer .*4 layers.*got 9"):
        KangarooForCausalLM.from_pretrained(folder, base_model=tiny_base("llama"))


def test_base_of_another_architecture(checkpoint):
    _, folder = checkpoint
    with pytest.raises(ValueError, match=r"saved for a 'llama' base.*is a 'qwen2' model"):
        KangarooForCausalLM.from_pretrained(folder, base_model=tiny_base("qwen2"))


def test_a_folder_that_is_not_a_kangaroo_checkpoint(tmp_path):
    tiny_base("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"model_type 'llama', expected 'kangaroo'"):
        KangarooForCausalLM.from_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="config.json"):
        KangarooForCausalLM.from_pretrained(tmp_path)


def test_loading_never_runs_code_from_the_folder(checkpoint, tmp_path):
    model, folder = checkpoint
    marker = tmp_path / "code-ran"
    trap = f"open({str(marker)!r}, 'w').close()\nraise RuntimeError('remote code ran')\n"
    for name in ("configuration_kangaroo.py", "modeling_kangaroo.py"):
        (folder / name).write_text(trap)
    KangarooForCausalLM.from_pretrained(folder, base_model=model.get_base_model())
    # With the package imported, its own classes win even when remote code is trusted.
    AutoModelForCausalLM.from_pretrained(folder)
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert not marker.exists()


# -- model card ---------------------------------------------------------------------------------------------------


def test_model_card_metadata_and_body(tmp_path):
    model = make_kangaroo("llama", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    metrics = {
        "speedup": 1.734,
        "by_category": {"translation": 1.41},
        "epochs": [{"validation": {"top1_agreement": 0.5}}, {"validation": {"top1_agreement": 0.625}}],
    }
    training_args = {"data": ["chat.jsonl"], "steps": 300, "learning_rate": 3e-4}
    model.save_pretrained(tmp_path, metrics=metrics, training_args=training_args)
    assert json.loads((tmp_path / "kangaroo_metrics.json").read_text()) == metrics
    assert json.loads((tmp_path / "training_args.json").read_text()) == training_args
    metadata = metadata_load(tmp_path / "README.md")
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "text-generation"
    assert {"kangaroo", "speculative-decoding"} <= set(metadata["tags"])
    card = (tmp_path / "README.md").read_text()
    params = sum(t.numel() for t in model.adapter_state_dict().values() if t.is_floating_point())
    megabytes = (tmp_path / ADAPTER_WEIGHTS_NAME).stat().st_size / 1e6
    assert "| Exit layer | 2 of 4 |" in card
    assert f"| Adapter parameters | {params:,} ({megabytes:.2f} MB, float32) |" in card
    rows = ("| speedup | 1.734 |", "| data | chat.jsonl |", "| steps | 300 |", "| learning_rate | 0.0003 |")
    assert all(row in card for row in rows)
    # A visitor's summary: per-category rows and unlisted training arguments stay in the JSON files.
    assert "by_category" not in card and "Per-category results are in `kangaroo_metrics.json`." in card
    assert "Every training argument is recorded in `training_args.json`." in card
    assert "| epochs[-1].validation.top1_agreement | 0.625 |" in card and "0.5 |" not in card
    assert "| Base tuning | none |" in card
    assert "$" not in card.split("---", 2)[2]  # every template placeholder was filled


def test_model_card_describes_the_prompt_lookup_rules(tmp_path):
    lookup = dict(lookup_num_tokens=6, lookup_max_tokens=12, lookup_trust_ngram=3, lookup_hit_rate_decay=0.8)
    make_kangaroo("llama", **lookup).save_pretrained(tmp_path)
    assert (
        "| Prompt lookup | up to 6 context tokens copied per round, growing to 12 while copies are accepted (n-grams "
        "up to 3; matches of 3+ tokens copied even over a sure adapter; copied whenever the context's recent hit rate "
        "(decay 0.8) beats the adapter's confidence) |"
    ) in (tmp_path / "README.md").read_text()
    make_kangaroo("llama").save_pretrained(tmp_path)
    assert "| Prompt lookup | off |" in (tmp_path / "README.md").read_text()


def test_model_card_of_a_local_base_has_no_hub_base_model(checkpoint):
    _, folder = checkpoint
    metadata = metadata_load(folder / "README.md")
    assert "base_model" not in metadata
    assert "No measurements were recorded for this checkpoint yet." in (folder / "README.md").read_text()


# -- push ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch) -> list[dict]:
    """Intercept repo creation and uploads at the `huggingface_hub.HfApi` boundary; record what would go up."""
    calls: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append({"call": "create_repo", "repo_id": repo_id, **kwargs})

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        root = Path(folder_path)
        paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        uploaded = filter_repo_objects(paths, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        files = {path: (root / path).stat().st_size for path in uploaded}
        card = (root / "README.md").read_text() if "README.md" in files else None
        calls.append({"call": "upload_folder", "repo_id": repo_id, "files": files, "card": card, **kwargs})
        return f"commit-url-for-{repo_id}"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def _sizes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_push_to_hub_uploads_exactly_the_adapter_checkpoint(tmp_path, fake_hub):
    model = make_kangaroo("llama")
    model.save_pretrained(tmp_path / "reference")
    result = model.push_to_hub("someone/tiny-kangaroo", private=True, commit_message="first")
    assert result == "commit-url-for-someone/tiny-kangaroo"
    create, upload = fake_hub
    assert create["call"] == "create_repo" and create["repo_id"] == "someone/tiny-kangaroo"
    assert create["private"] is True and create["exist_ok"] is True
    assert upload["commit_message"] == "first"
    assert set(upload["files"]) == CHECKPOINT_FILES
    expected = _sizes(tmp_path / "reference")
    for name, size in upload["files"].items():
        if name != "README.md":  # the pushed card names the repo in its usage snippet
            assert size == expected[name], name
    assert 'from_pretrained("someone/tiny-kangaroo")' in upload["card"]


def test_cli_push_uploads_the_folder_as_saved(tmp_path, fake_hub, capsys):
    from kangaroo_hf.cli import main

    make_kangaroo("llama").save_pretrained(tmp_path / "kangaroo", metrics={"speedup": 1.5})
    (tmp_path / "kangaroo" / ".cache").mkdir()
    (tmp_path / "kangaroo" / ".cache" / "lock").write_text("x")  # local clutter never goes up
    assert main(["push", str(tmp_path / "kangaroo"), "someone/tiny-kangaroo", "--create-pr"]) == 0
    upload = fake_hub[-1]
    assert upload["files"] == {k: v for k, v in _sizes(tmp_path / "kangaroo").items() if not k.startswith(".")}
    assert set(upload["files"]) == CHECKPOINT_FILES | {"kangaroo_metrics.json"}
    assert upload["create_pr"] is True
    assert "someone/tiny-kangaroo" in capsys.readouterr().out


def test_push_refuses_pickles_and_non_kangaroo_folders(tmp_path, fake_hub):
    from kangaroo_hf.core.checkpoint import push_folder

    make_kangaroo("llama").save_pretrained(tmp_path / "kangaroo")
    (tmp_path / "kangaroo" / "optimizer.pt").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match=r"optimizer\.pt is a pickle file"):
        push_folder(tmp_path / "kangaroo", "someone/x")
    tiny_base("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="expected 'kangaroo'"):
        push_folder(tmp_path / "plain", "someone/x")
    assert fake_hub == []


@pytest.mark.smollm2
def test_embedded_smollm2_round_trip_through_the_gguf_fallback(tmp_path, offline_cache):
    if importlib.util.find_spec(default_model.GGUF_PACKAGE) is None:
        pytest.skip(f"needs the embedded model: {default_model.INSTALL_HINT}")
    base, tokenizer = default_model.load_embedded_base()
    model = KangarooForCausalLM.from_base(base, exit_layer=2).eval()
    assert model.config.base_model_name_or_path == default_model.EMBEDDED_BASE_ID
    model.save_pretrained(tmp_path / "kangaroo")
    assert metadata_load(tmp_path / "kangaroo" / "README.md")["base_model"] == default_model.EMBEDDED_BASE_ID
    # The (empty, offline) Hugging Face cache lacks SmolLM2: the base comes from the shipped GGUF.
    loaded = KangarooForCausalLM.from_pretrained(tmp_path / "kangaroo")
    assert loaded.get_base_model() is not base
    _assert_same_adapter(loaded, model)
    prompt = tokenizer("The sky is blue because", return_tensors="pt")["input_ids"]
    expected = model.generate(prompt, do_sample=False, max_new_tokens=4)
    assert loaded.generate(prompt, do_sample=False, max_new_tokens=4).tolist() == expected.tolist()


def test_the_package_registers_its_checkpoint_extensions():
    from kangaroo_hf.core.checkpoint import EXTENSIONS
    from kangaroo_hf.hub.model_card import write_model_card

    assert EXTENSIONS.card_writer is write_model_card
    assert EXTENSIONS.base_loader is default_model.load_embedded_if_uncached
    assert EXTENSIONS.remote_code_writer is not None


def test_without_the_package_extensions_a_checkpoint_has_no_card_and_carries_its_own_code(tmp_path, monkeypatch):
    import sys

    from kangaroo_hf.core.checkpoint import EXTENSIONS

    monkeypatch.setattr(EXTENSIONS, "card_writer", None)
    monkeypatch.setattr(EXTENSIONS, "remote_code_writer", None)
    model = make_kangaroo("llama", base_model_name_or_path="tiny-org/tiny-llama")
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "README.md").exists()
    own_file = Path(sys.modules[type(model).__module__].__file__)
    assert (tmp_path / "modeling_kangaroo.py").read_text() == own_file.read_text()


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_tuned_base_is_rebuilt_on_load_and_a_different_base_is_flagged(tmp_path, caplog):
    peft = pytest.importorskip("peft")
    from kangaroo_hf.core.peft import peft_fingerprint

    tiny_base("llama").save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    tuned = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), lora).eval()
    tuned.save_pretrained(tmp_path / "lora")
    model = KangarooForCausalLM.from_base(tuned, exit_layer=2, peft_adapter_name_or_path=str(tmp_path / "lora"))
    model.save_pretrained(tmp_path / "kangaroo")
    assert "| Base tuning | PEFT adapter" in (tmp_path / "kangaroo" / "README.md").read_text()
    loaded = KangarooForCausalLM.from_pretrained(tmp_path / "kangaroo")
    assert peft_fingerprint(loaded.get_base_model()) == model.config.peft_adapter_fingerprint is not None
    _assert_same_adapter(loaded, model)
    assert _outputs(loaded, sample=False)["greedy"] == _outputs(model, sample=False)["greedy"]
    with caplog.at_level("WARNING"):
        KangarooForCausalLM.from_pretrained(tmp_path / "kangaroo", base_model=tiny_base("llama"))
    assert "but the base carries no PEFT adapter" in caplog.text


def test_adapter_file_with_overwritten_tensor_bytes_is_refused_naming_the_tensor(tmp_path):
    model = make_kangaroo("llama", base_model_name_or_path="tiny-org/tiny-llama")
    model.save_pretrained(tmp_path)
    path = tmp_path / "kangaroo_adapter.safetensors"
    raw = bytearray(path.read_bytes())
    header_length = int.from_bytes(raw[:8], "little")
    data_start = 8 + header_length
    raw[data_start:] = b"\xff" * (len(raw) - data_start)  # every tensor byte overwritten, header intact: NaN floats
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"safetensors is damaged: NaN or infinite weights in adapter"):
        KangarooForCausalLM.from_pretrained(tmp_path, base_model=model.get_base_model())


def test_config_that_is_not_json_is_named(tmp_path):
    model = make_kangaroo("llama", base_model_name_or_path="tiny-org/tiny-llama")
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "kangaroo", "exit_layer": 2,')  # cut off mid-write
    with pytest.raises(ValueError, match=r"config.json is not a valid JSON file"):
        KangarooForCausalLM.from_pretrained(tmp_path, base_model=model.get_base_model())
