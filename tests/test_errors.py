"""Bad input fails early with an error that names the bad value."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import VOCAB, make_kangaroo, tiny_base
from kangaroo_hf import KangarooConfig, KangarooForCausalLM


@pytest.mark.parametrize("exit_layer", [0, -1, 4, 7])
def test_exit_layer_out_of_range(exit_layer):
    with pytest.raises(ValueError, match=rf"exit_layer must be an int in \[1, 3\].*got {exit_layer}"):
        KangarooForCausalLM.from_base(tiny_base("llama"), exit_layer=exit_layer)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_draft_threshold_outside_unit_interval(threshold):
    with pytest.raises(ValueError, match="draft_threshold must be in \\[0, 1\\]"):
        KangarooForCausalLM.from_base(tiny_base("llama"), draft_threshold=threshold)
    model = make_kangaroo("llama")
    with pytest.raises(ValueError, match="draft_threshold must be in \\[0, 1\\]"):
        model.generate(torch.tensor([[3, 4]]), max_new_tokens=2, draft_threshold=threshold)


@pytest.mark.parametrize("max_draft_tokens", [0, -2, 1.5])
def test_max_draft_tokens_below_one(max_draft_tokens):
    with pytest.raises(ValueError, match="max_draft_tokens must be an int >= 1"):
        KangarooForCausalLM.from_base(tiny_base("llama"), max_draft_tokens=max_draft_tokens)
    with pytest.raises(ValueError, match="max_draft_tokens must be an int >= 1"):
        make_kangaroo("llama").generate(torch.tensor([[3, 4]]), max_new_tokens=2, max_draft_tokens=max_draft_tokens)


def test_adapter_whose_shapes_do_not_match_the_base():
    small = make_kangaroo("llama")
    wide = KangarooForCausalLM.from_base(tiny_base("llama", hidden_size=96, num_attention_heads=4))
    with pytest.raises(ValueError, match=r"do not fit the base \(hidden_size=64.*checkpoint \(96"):
        small.load_adapter_state_dict(wide.adapter_state_dict())
    gqa = KangarooForCausalLM.from_base(tiny_base("llama", num_key_value_heads=4))
    with pytest.raises(ValueError, match=r"num_key_value_heads=2.*k_proj"):
        small.load_adapter_state_dict(gqa.adapter_state_dict())
    with pytest.raises(ValueError, match="missing .*adapter.norm.weight"):
        state = small.adapter_state_dict()
        del state["adapter.norm.weight"]
        small.load_adapter_state_dict(state)


def test_a_batch_without_padding_needs_no_attention_mask():
    model = make_kangaroo("llama")
    prompts = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    expected = model.get_base_model().generate(prompts, max_new_tokens=6, do_sample=False)
    assert model.generate(prompts, max_new_tokens=6, do_sample=False).tolist() == expected.tolist()
    assert len(model.last_generate_stats.rows) == 2


def test_non_llama_base_names_what_is_missing():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not a LLaMA-family causal LM.*model.embed_tokens"):
        KangarooForCausalLM.from_base(gpt2)


def test_config_rejects_impossible_values_directly():
    base_config = tiny_base("qwen2").config
    with pytest.raises(ValueError, match="exit_layer"):
        KangarooConfig(base_config=base_config, exit_layer=4)
    with pytest.raises(ValueError, match="adapter_num_layers must be an int >= 1, got 0"):
        KangarooConfig(base_config=base_config, adapter_num_layers=0)


def test_kangaroo_needs_a_cache():
    with pytest.raises(ValueError, match="needs use_cache=True"):
        make_kangaroo("llama").generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3, use_cache=False)


def test_misspelled_setting_is_refused_naming_the_nearest_field():
    with pytest.raises(ValueError, match=r"'draft_treshold' \(did you mean 'draft_threshold'\?\)"):
        KangarooForCausalLM.from_base(tiny_base("llama"), draft_treshold=0.1)
    with pytest.raises(ValueError, match=r"unknown setting 'max_draft_token'; did you mean 'max_draft_tokens'"):
        KangarooConfig(base_config=tiny_base("llama").config, max_draft_token=3)
    with pytest.raises(ValueError, match=r"unknown Kangaroo settings: 'colour'"):
        KangarooForCausalLM.from_base(tiny_base("llama"), colour="blue")


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"num_beams": 2}, "num_beams=2"),
        ({"prompt_lookup_num_tokens": 5}, "prompt_lookup_num_tokens=5"),
    ],
)
def test_arguments_that_would_switch_kangaroo_off_are_refused(arguments, named):
    model = make_kangaroo("llama")
    with pytest.raises(ValueError, match=rf"greedy search and sampling only, but {named}.*use_kangaroo=False"):
        model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3, **arguments)
    # Decoding with the base alone still takes them.
    model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3, use_kangaroo=False, **arguments)


def test_another_assistant_model_is_refused():
    model = make_kangaroo("llama")
    with pytest.raises(ValueError, match=r"assistant_model=LlamaForCausalLM asks for assisted generation"):
        model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3, assistant_model=tiny_base("llama", seed=1))


@pytest.mark.parametrize("value", [True, False])
def test_booleans_are_not_layer_indices(value):
    with pytest.raises(ValueError, match=f"exit_layer must be an int.*got {value}"):
        KangarooForCausalLM.from_base(tiny_base("llama"), exit_layer=value)
    with pytest.raises(ValueError, match=f"adapter_num_layers must be an int >= 1, got {value}"):
        KangarooConfig(base_config=tiny_base("llama").config, adapter_num_layers=value)


def test_per_call_settings_are_listed_once():
    import inspect

    from kangaroo_hf.cli.main import build_parser
    from kangaroo_hf.core.drafting import DRAFT_SETTINGS, PER_CALL_SETTINGS

    parameters = inspect.signature(KangarooForCausalLM.generate).parameters
    assert set(PER_CALL_SETTINGS) <= set(parameters) and set(PER_CALL_SETTINGS) <= set(DRAFT_SETTINGS)
    # Every per-call setting has its `kangaroo-hf generate` flag, typed as the setting, and reaches the round.
    overrides = {
        "draft_threshold": 0.25,
        "max_draft_tokens": 2,
        "first_draft_threshold": 0.1,
        "lookup_num_tokens": 3,
        "tree_rounds": True,
    }
    assert set(overrides) == set(PER_CALL_SETTINGS)
    argv = ["generate", *(f"--{name.replace('_', '-')}={str(value).lower()}" for name, value in overrides.items())]
    args = build_parser().parse_args(argv)
    assert {name: getattr(args, name) for name in overrides} == overrides
    model = make_kangaroo("llama")
    from kangaroo_hf.core.drafting import DraftSettings

    settings = DraftSettings.from_config(model.config, **overrides)
    assert all(getattr(settings, name) == value for name, value in overrides.items())
    # Bool flags read true/false (argparse's bool("false") would be True).
    assert build_parser().parse_args(["generate", "--tree-rounds", "false"]).tree_rounds is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--tree-rounds", "maybe"])
