"""Remote code: `modeling/` is generated from the package sources, and loads without `kangaroo_hf` installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers.dynamic_module_utils import check_imports, get_relative_imports

from conftest import VOCAB, make_kangaroo
from kangaroo_hf import KangarooForCausalLM
from kangaroo_hf.core.checkpoint import REMOTE_CODE_FILES
from kangaroo_hf.hub import remote_code

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_committed_generated_files_match_the_package_sources():
    stale = remote_code.stale_files(REPO_ROOT)
    assert stale == [], f"{stale} drifted from the package sources: run `python -m kangaroo_hf.hub.remote_code`."


def test_card_templates_are_mirrored_at_the_top_level():
    packaged = {p.name: p.read_bytes() for p in (remote_code.PACKAGE_DIR / "hub_cards").iterdir()}
    mirrored = {p.name: p.read_bytes() for p in (REPO_ROOT / "hub_cards").iterdir()}
    assert packaged and packaged == mirrored


def test_check_mode_reports_and_write_mode_fixes_stale_files(tmp_path, capsys):
    assert remote_code.main(["--check", "--root", str(tmp_path)]) == 1
    assert "modeling/modeling_kangaroo.py" in capsys.readouterr().out
    assert remote_code.main(["--root", str(tmp_path)]) == 0
    assert remote_code.main(["--check", "--root", str(tmp_path)]) == 0
    (tmp_path / "modeling" / "configuration_kangaroo.py").write_text("# edited by hand\n")
    assert remote_code.stale_files(tmp_path) == ["modeling/configuration_kangaroo.py"]
    capsys.readouterr()
    assert remote_code.main(["--check", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out  # a unified diff of the stale file against what the sources give now
    assert "--- modeling/configuration_kangaroo.py" in out and "-# edited by hand" in out
    assert "+class KangarooConfig" in out


def test_every_generated_copy_is_checked_including_the_shipped_adapters():
    generated = remote_code.generated_files()
    shipped = "src/kangaroo_hf/pretrained/smollm2-135m-instruct"
    assert {f"modeling/{name}" for name in REMOTE_CODE_FILES} <= set(generated)
    assert {f"{shipped}/{name}" for name in REMOTE_CODE_FILES} <= set(generated)
    assert generated[f"{shipped}/modeling_kangaroo.py"] == generated["modeling/modeling_kangaroo.py"]


def test_generated_files_are_self_contained(tmp_path):
    rendered = remote_code.render_remote_code()
    assert sorted(rendered) == sorted(REMOTE_CODE_FILES)
    for name, text in rendered.items():
        assert text.startswith("# GENERATED FILE, DO NOT EDIT")
        (tmp_path / name).write_text(text)
    # transformers copies relatively imported files along and refuses missing packages: only the config file is
    # imported relatively, and every absolute import is a dependency of transformers itself.
    assert get_relative_imports(tmp_path / "configuration_kangaroo.py") == []
    assert check_imports(tmp_path / "modeling_kangaroo.py") == ["configuration_kangaroo"]
    imports = [line for text in rendered.values() for line in text.splitlines() if line.lstrip().startswith("from ")]
    assert not [line for line in imports if "kangaroo_hf" in line]


def test_save_pretrained_ships_the_generated_files(tmp_path):
    model = make_kangaroo("llama")
    model.save_pretrained(tmp_path)
    for name, text in remote_code.render_remote_code().items():
        assert (tmp_path / name).read_text() == text


def test_generator_rejects_imports_from_outside_core():
    with pytest.raises(ValueError, match=r"imports from outside core/, which is not part of the remote code"):
        remote_code._transform("checkpoint", "from ..default_model import load_embedded_base\n", ("checkpoint",), {})
    with pytest.raises(ValueError, match=r"imports \.stats, which is not concatenated"):
        remote_code._transform("checkpoint", "from .stats import KangarooStats\n", ("checkpoint",), {})
    with pytest.raises(ValueError, match="cannot import kangaroo_hf"):
        remote_code._transform("checkpoint", "import kangaroo_hf.hub\n", ("checkpoint",), {})


def test_generator_drops_intra_file_imports_and_hoists_config_imports():
    source = textwrap.dedent(
        '''\
        """Docstring."""
        from __future__ import annotations
        from typing import TYPE_CHECKING
        from .configuration import KangarooConfig
        if TYPE_CHECKING:
            from .modeling import KangarooForCausalLM
        def f():
            from .hub import g
            return g, KangarooConfig
        __all__ = ["f"]
        '''
    )
    body, hoisted, exported = remote_code._transform(
        "generation", source, ("generation", "modeling", "hub"), {"configuration": "configuration_kangaroo"}
    )
    assert body == "from typing import TYPE_CHECKING\ndef f():\n    return g, KangarooConfig"
    assert hoisted == {"configuration_kangaroo": {"KangarooConfig"}}
    assert exported == ["f"]


BLOCKED_PACKAGE_SCRIPT = """
import importlib.abc, json, sys

class BlockKangarooHF(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "kangaroo_hf":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: no kangaroo_hf here)", name=name)
        return None

sys.meta_path.insert(0, BlockKangarooHF())
try:
    import kangaroo_hf  # noqa: F401
    sys.exit("kangaroo_hf is importable")
except ImportError:
    pass

import torch
from transformers import AutoModelForCausalLM

folder, prompt = sys.argv[1], torch.tensor([json.loads(sys.argv[2])])
try:
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
    sys.exit("remote code loaded without trust_remote_code=True")
except ValueError as error:
    assert "trust_remote_code" in str(error), error
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
greedy = model.generate(prompt, do_sample=False, max_new_tokens=12)[0].tolist()
stats = model.last_generate_stats.to_dict()
print(json.dumps({
    "class": f"{type(model).__module__}.{type(model).__name__}",
    "greedy": greedy,
    "stats": stats,
    "kangaroo_hf_imported": any(name.split(".")[0] == "kangaroo_hf" for name in sys.modules),
}))
"""


@pytest.mark.compat
@pytest.mark.parametrize("weights_dtype", [None, "int8"])
def test_trust_remote_code_loads_without_the_package(tmp_path, weights_dtype):
    model = make_kangaroo("qwen2", draft_threshold=0.2, max_draft_tokens=4)
    model.get_base_model().save_pretrained(tmp_path / "base")
    model.config.base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "kangaroo", weights_dtype=weights_dtype)
    if weights_dtype == "int8":  # the remote code must decode the int8 file exactly as the package does
        model = KangarooForCausalLM.from_pretrained(tmp_path / "kangaroo", base_model=model.get_base_model())
    prompt = torch.randint(2, VOCAB, (6,), generator=torch.Generator().manual_seed(0)).tolist()
    expected = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12)[0].tolist()
    expected_stats = model.last_generate_stats.to_dict()
    (tmp_path / "check.py").write_text(BLOCKED_PACKAGE_SCRIPT)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(tmp_path / "check.py"), str(tmp_path / "kangaroo"), json.dumps(prompt)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"].startswith("transformers_modules.") and report["class"].endswith(
        "modeling_kangaroo.KangarooForCausalLM"
    )
    assert report["kangaroo_hf_imported"] is False
    assert report["greedy"] == expected
    assert report["stats"] == expected_stats  # the same adapter drafts the same tokens


def test_imported_modules_are_pulled_in_after_their_dependencies(monkeypatch):
    top = {"modeling": ["backbone", "helpers"], "helpers": ["backbone"], "hub": ["configuration"], "backbone": []}
    lazy = {"modeling": ["hub"]}

    def fake_imports(module, top_level_only):
        return top.get(module, []) + ([] if top_level_only else lazy.get(module, []))

    monkeypatch.setattr(remote_code, "_relative_imports", fake_imports)
    order = remote_code.module_order(("backbone", "modeling"), provided=("configuration",))
    assert order == ("backbone", "helpers", "modeling", "hub")
