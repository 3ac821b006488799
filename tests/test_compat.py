"""The private transformers names Kangaroo relies on exist in the installed version, and the supported range holds."""

from __future__ import annotations

import inspect
import warnings

import pytest
import transformers.generation.candidate_generator as candidate_generator_module
from transformers.generation.candidate_generator import CandidateGenerator

from kangaroo_hf.core import compat
from kangaroo_hf.core.drafting import KangarooCandidateGenerator

pytestmark = pytest.mark.compat


def test_installed_transformers_has_every_private_name_kangaroo_uses():
    missing = compat.missing_private_names()
    assert not missing, "The installed transformers lacks: " + "; ".join(missing)


def test_a_missing_private_name_is_named(monkeypatch):
    absent = (
        ("transformers.generation.utils:GenerationMixin._gone", "x"),
        ("source:GenerationMixin._assisted_decoding:no_such", "y"),
    )
    monkeypatch.setattr(compat, "PRIVATE_NAMES", (*compat.PRIVATE_NAMES, *absent))
    assert compat.missing_private_names() == [
        "transformers.generation.utils:GenerationMixin._gone (x)",
        "source:GenerationMixin._assisted_decoding:no_such (y)",
    ]


def _public_members(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_kangaroo_generator_implements_what_every_builtin_generator_implements():
    builtins = [
        cls
        for cls in vars(candidate_generator_module).values()
        if inspect.isclass(cls) and issubclass(cls, CandidateGenerator) and cls is not CandidateGenerator
    ]
    assert builtins
    common = set.intersection(*(_public_members(cls) for cls in builtins))
    # Generators that read the loop's model outputs (as Kangaroo's does) also hand it forward overrides.
    readers = [cls for cls in builtins if cls.requires_model_outputs]
    if readers:
        common |= set.intersection(*(_public_members(cls) for cls in readers))
    missing = sorted(common - _public_members(KangarooCandidateGenerator) - {"model_kwargs_overrides"})
    assert not missing, f"KangarooCandidateGenerator lacks {missing}"
    # model_kwargs_overrides is an instance attribute, set from construction on (see generator tests).
    assert KangarooCandidateGenerator.requires_model_outputs is True


def test_generator_exposes_overrides_and_drafting_tokens_from_construction():
    from transformers import GenerationConfig, StoppingCriteriaList

    from conftest import make_kangaroo
    from kangaroo_hf.core.drafting import DraftSettings

    model = make_kangaroo("llama")
    settings = DraftSettings(draft_threshold=0.5, max_draft_tokens=4, lookup_num_tokens=3, lookup_max_tokens=9)
    generator = KangarooCandidateGenerator(model, settings, GenerationConfig(), None, StoppingCriteriaList())
    assert generator.num_drafting_tokens == 9  # the longest proposal a round can make (a grown lookup)
    assert generator.model_kwargs_overrides == {"output_exit_hidden_states": True}


@pytest.mark.parametrize(
    ("version", "supported"),
    [("5.24.0", True), ("5.25.3", True), ("5.23.2", False), ("5.26.0", False), ("5.26.0.dev0", False), ("6.0", False)],
)
def test_supported_range(version, supported):
    assert compat.transformers_supported(version) is supported


def test_unsupported_transformers_warns_once_naming_both_versions(monkeypatch):
    monkeypatch.setattr(compat, "_warned_version", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert compat.warn_if_unsupported_transformers("5.27.1")
        assert not compat.warn_if_unsupported_transformers("5.27.1")
        assert not compat.warn_if_unsupported_transformers("5.25.0")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "5.27.1 is installed" in message and "transformers>=5.24,<5.26" in message


def test_import_under_an_unsupported_transformers_warns_and_does_not_crash(tmp_path):
    import subprocess
    import sys

    script = (
        "import warnings, transformers\n"
        "transformers.__version__ = '5.99.0'\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import kangaroo_hf\n"
        "print([str(w.message) for w in caught if 'kangaroo_hf is tested with' in str(w.message)])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "5.99.0 is installed" in result.stdout


def test_pyproject_pins_the_supported_range():
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    low, high = compat.SUPPORTED_TRANSFORMERS
    assert f"transformers>={low},<{high}" in pyproject["project"]["dependencies"]


def test_cache_layers_expose_keys_and_values_the_own_loop_gathers():
    """The own loop moves slots inside `DynamicCache` layers and reads the attention kernel from the config."""
    import torch
    from transformers import DynamicCache, LlamaConfig

    cache = DynamicCache()
    keys, values = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    cache.update(keys, values, 0)
    (layer,) = compat.cache_layer_tensors(cache)
    assert [tuple(t.shape) for t in layer.tensors()] == [(2, 3, 5, 4), (2, 3, 5, 4)]
    layer.set(keys[:, :, :2], values[:, :, :2])
    assert cache.get_seq_length() == 2
    cache.update(keys[:, :, :1], values[:, :, :1], 0)  # the cache keeps growing from what was set
    assert cache.get_seq_length() == 3
    assert compat.attention_implementation(LlamaConfig(attn_implementation="eager")) == "eager"
