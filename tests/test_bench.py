"""`kangaroo-hf bench` on tiny random models: reports, acceptance counts, losslessness checks and tie tolerance."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_kangaroo, spy_product_rows, tiny_tokenizer
from kangaroo_hf import CpuKernels, KangarooStats, loading
from kangaroo_hf.bench import methods as bench_methods
from kangaroo_hf.bench import runner as bench
from kangaroo_hf.bench.runner import (
    BenchSettings,
    LosslessnessError,
    MethodRun,
    PromptRecord,
    Question,
    check_against_reference,
    classify_divergence,
    default_tie_tolerance,
    find_questions_file,
    first_divergence,
    load_questions,
    run_benchmark,
)

SPECULATIVE = ("pld", "early_exit", "kangaroo")
SUMMARY_KEYS = {"speedup", "tokens_per_second", "new_tokens", "time_s", "prompts", "identical_fraction"}
COUNT_KEYS = {"mean_accepted_tokens", "verify_steps", "acceptance_by_position", "drafted_by_position"}
REPORT_FILES = ("results.json", "results.md", "speedup.png", "acceptance.png")


def _write_questions(path, categories=("writing", "qa"), per_category=2):
    rows = []
    for c, category in enumerate(categories):
        for q in range(per_category):
            # Repetitive text gives prompt lookup something to match.
            turn = f"abc{c}{q} abcabc deed {category} abc{q}"
            rows.append({"question_id": 100 * c + q, "category": category, "turns": [turn, "more"]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def questions(tmp_path):
    return load_questions(_write_questions(tmp_path / "question.jsonl"))


@pytest.fixture
def model():
    return make_kangaroo("llama", draft_threshold=0.3, max_draft_tokens=4)


def _settings(**overrides) -> BenchSettings:
    return BenchSettings(**{"max_new_tokens": 8, "warmup": 0, "progress": False, **overrides})


def test_run_benchmark_writes_every_report_and_field(model, questions, tmp_path):
    out = tmp_path / "out"
    results = run_benchmark(model, tiny_tokenizer(), questions, out, _settings(warmup=1), {"model": "tiny"})
    for name in REPORT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "speedup.png").read_bytes()[:4] == b"\x89PNG"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["lossless"] is True and on_disk["identical_fraction"] == 1.0
    assert on_disk["failures"] == 0 and on_disk["divergences"] == []
    assert on_disk["num_prompts"] == 4 and on_disk["categories"] == ["writing", "qa"]
    assert on_disk["settings"]["dtype"] == "float32" and on_disk["settings"]["tie_tolerance"] == 0.0
    assert on_disk["settings"]["model"] == "tiny" and on_disk["settings"]["exit_layer"] == 2
    for key in ("platform", "cpu_model", "usable_cpus", "torch", "transformers", "kangaroo_hf", "torch_threads"):
        assert key in on_disk["machine"]
    assert set(on_disk["methods"]) == {"vanilla", *SPECULATIVE}
    for name, item in on_disk["methods"].items():
        assert item["lossless"] is True
        for summary in (item["overall"], *item["by_category"].values()):
            assert SUMMARY_KEYS <= set(summary)
            assert (COUNT_KEYS <= set(summary)) == (name in SPECULATIVE)
        assert item["overall"]["new_tokens"] == 4 * 8
        assert sum(s["time_s"] for s in item["by_category"].values()) == pytest.approx(item["overall"]["time_s"])
    assert on_disk["methods"]["vanilla"]["overall"]["speedup"] == pytest.approx(1.0)
    for name in SPECULATIVE:
        overall = on_disk["methods"][name]["overall"]
        # Every verification step yields its accepted drafts plus one token of the base's.
        assert overall["new_tokens"] == overall["verify_steps"] + sum(overall["accepted_by_position"])
        assert overall["mean_accepted_tokens"] == pytest.approx(overall["new_tokens"] / overall["verify_steps"])
        assert all(0.0 <= rate <= 1.0 for rate in overall["acceptance_by_position"])
    assert len(on_disk["methods"]["kangaroo"]["overall"]["drafted_by_position"]) == 4
    assert sum(on_disk["methods"]["kangaroo"]["overall"]["drafted_by_position"]) > 0
    assert len(on_disk["per_prompt"]) == 4 and set(on_disk["per_prompt"][0]["runs"]) == set(on_disk["methods"])
    markdown = (out / "results.md").read_text()
    assert "| **overall** |" in markdown and "kangaroo" in markdown and "Lossless: yes" in markdown
    assert results["methods"]["kangaroo"]["overall"]["speedup"] == on_disk["methods"]["kangaroo"]["overall"]["speedup"]


def test_kangaroo_counts_match_last_generate_stats(model, questions, tmp_path):
    results = run_benchmark(
        model, tiny_tokenizer(), questions[:1], tmp_path, _settings(methods=("vanilla", "kangaroo"))
    )
    stats = model.last_generate_stats
    overall = results["methods"]["kangaroo"]["overall"]
    assert overall["verify_steps"] == stats.verify_steps
    assert overall["drafted_by_position"] == stats.drafted_by_position
    assert overall["mean_accepted_tokens"] == pytest.approx(stats.mean_accepted_tokens)


def test_planted_mismatch_is_a_failure_and_strict_raises(model, questions, tmp_path, monkeypatch):
    def corrupted(model, input_ids, gen_kwargs):
        tokens, counts = bench_methods.run_kangaroo(model, input_ids, gen_kwargs)
        tokens[3] = (tokens[3] + 1) % model.config.base_config.vocab_size
        return tokens, counts

    monkeypatch.setitem(bench.METHODS, "kangaroo", corrupted)
    settings = _settings(methods=("vanilla", "kangaroo"))
    results = run_benchmark(model, tiny_tokenizer(), questions[:2], tmp_path / "lenient", settings)
    assert results["lossless"] is False and results["failures"] == 2
    assert results["methods"]["kangaroo"]["lossless"] is False and results["methods"]["vanilla"]["lossless"] is True
    assert results["identical_fraction"] == 0.0
    divergence = results["divergences"][0]
    assert divergence["method"] == "kangaroo" and divergence["position"] == 3 and not divergence["tie"]
    assert divergence["logit_gap"] > 0 and divergence["logit_gap_float32"] is None  # already float32
    assert "**failure**" in (tmp_path / "lenient" / "results.md").read_text()

    with pytest.raises(LosslessnessError, match="1|differ"):
        run_benchmark(
            model,
            tiny_tokenizer(),
            questions[:1],
            tmp_path / "strict",
            _settings(strict=True, methods=("vanilla", "kangaroo")),
        )
    assert (tmp_path / "strict" / "results.json").is_file()  # the reports are written before raising


def test_cli_main_runs_and_strict_exit_code(model, tmp_path, monkeypatch, capsys):
    path = _write_questions(tmp_path / "q.jsonl", categories=("math", "rag", "stem"), per_category=3)
    loaded = []

    def fake_load_model(name, dtype, device="cpu"):
        loaded.append((name, dtype, device))
        return model, tiny_tokenizer()

    monkeypatch.setattr(loading, "load_model", fake_load_model)
    argv = ["--questions", str(path), "--categories", "math,rag", "--limit-per-category", "1", "--max-new-tokens", "8"]
    argv += ["--methods", "vanilla,pld,kangaroo", "--warmup", "0", "--output", str(tmp_path / "cli")]
    assert bench.main(argv) == 0
    assert loaded == [(None, "float32", "cpu")]
    results = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert results["num_prompts"] == 2 and results["categories"] == ["math", "rag"]
    assert set(results["methods"]) == {"vanilla", "pld", "kangaroo"}
    assert results["settings"]["questions"] == str(path) and results["settings"]["limit_per_category"] == 1
    assert "lossless: True" in capsys.readouterr().out

    monkeypatch.setitem(bench.METHODS, "pld", lambda m, ids, kw: ([0] * 8, None))
    argv[argv.index("vanilla,pld,kangaroo")] = "vanilla,pld"
    assert bench.main([*argv, "--strict"]) == 1


def test_cli_loads_a_saved_kangaroo_folder(model, tmp_path):
    from kangaroo_hf.cli import main

    base_dir, kangaroo_dir = tmp_path / "base", tmp_path / "kangaroo"
    model.get_base_model().save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model.config.base_model_name_or_path = str(base_dir)
    model.save_pretrained(kangaroo_dir)
    path = _write_questions(tmp_path / "q.jsonl", per_category=1)
    argv = ["bench", "--model", str(kangaroo_dir), "--questions", str(path), "--max-new-tokens", "6"]
    assert main([*argv, "--methods", "vanilla,kangaroo", "--warmup", "0", "--output", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["settings"]["model"] == str(kangaroo_dir) and results["lossless"] is True
    assert results["settings"]["max_draft_tokens"] == 4


def test_runner_up_token_counts_as_a_tie_only_within_tolerance(model, questions):
    input_ids = loading.chat_input_ids(tiny_tokenizer(), questions[0].turns[0])
    kwargs = {"max_new_tokens": 10, "do_sample": False}
    reference, _ = bench_methods.run_vanilla(model, input_ids, kwargs)
    position = 5
    sequence = torch.cat([input_ids, torch.tensor([reference[:position]])], dim=1)
    with torch.no_grad():
        logits = model.get_base_model()(sequence).logits[0, -1]
    top2 = logits.topk(2)
    assert int(top2.indices[0]) == reference[position]
    gap = float(top2.values[0] - top2.values[1])
    planted = reference[:position] + [int(top2.indices[1])]

    def record():
        return PromptRecord(
            question=questions[0],
            prompt_tokens=input_ids.shape[1],
            runs={"vanilla": MethodRun(reference, 1.0, None), "kangaroo": MethodRun(planted, 1.0, None)},
        )

    probe = bench.GapProbe(model.get_base_model())
    (tie,) = check_against_reference(record(), input_ids, probe, tolerance=gap + 1e-4)
    assert tie.tie and tie.position == position and tie.method_token == int(top2.indices[1])
    assert tie.logit_gap == pytest.approx(gap, abs=1e-4) and tie.top2_gap == pytest.approx(gap, abs=1e-4)
    (failure,) = check_against_reference(record(), input_ids, probe, tolerance=gap / 2)
    assert not failure.tie


def test_classify_divergence():
    assert classify_divergence(0.125, tolerance=0.25)
    assert classify_divergence(-0.25, tolerance=0.25)  # the recomputed logits may order the pair either way
    assert not classify_divergence(0.5, tolerance=0.25)
    assert not classify_divergence(3.0, tolerance=0.25)
    assert not classify_divergence(None, tolerance=0.25)  # an output ended early: never a tie
    assert classify_divergence(0.0, tolerance=0.0) and not classify_divergence(1e-6, tolerance=0.0)


def test_default_tie_tolerance():
    assert default_tie_tolerance(torch.float32) == 0.0
    assert default_tie_tolerance(torch.bfloat16) == 0.25
    assert default_tie_tolerance(torch.float16) == 0.03125


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2
    assert first_divergence([], []) is None


def test_bfloat16_run_reports_ties_with_float32_gaps(questions, tmp_path):
    model = make_kangaroo("qwen2", draft_threshold=0.3, max_draft_tokens=4).to(torch.bfloat16)
    results = run_benchmark(
        model, tiny_tokenizer(), questions[1:3], tmp_path, _settings(methods=("vanilla", "early_exit", "kangaroo"))
    )
    assert results["settings"]["dtype"] == "bfloat16" and results["settings"]["tie_tolerance"] == 0.25
    assert 0.0 <= results["identical_fraction"] <= 1.0
    for divergence in results["divergences"]:
        assert divergence["tie"] == (divergence["logit_gap"] <= 0.25)
        assert divergence["logit_gap_float32"] is not None
    assert results["lossless"] == (results["failures"] == 0)


def test_sampling_skips_the_comparison(model, questions, tmp_path):
    settings = _settings(methods=("vanilla", "kangaroo"), do_sample=True, temperature=0.8)
    results = run_benchmark(model, tiny_tokenizer(), questions[:1], tmp_path, settings)
    assert results["lossless"] is None and results["identical_fraction"] is None and results["divergences"] == []
    assert results["methods"]["kangaroo"]["overall"]["identical_fraction"] is None
    assert "not compared" in (tmp_path / "results.md").read_text()


def test_helper_runners_leave_the_base_unchanged(model, questions):
    base = model.get_base_model()
    before = base.generation_config.to_dict()
    input_ids = loading.chat_input_ids(tiny_tokenizer(), questions[0].turns[0])
    kwargs = {"max_new_tokens": 10, "do_sample": False}
    reference, _ = bench_methods.run_vanilla(model, input_ids, kwargs)
    tokens, counts = bench_methods.run_early_exit(model, input_ids, kwargs)
    assert tokens == reference and counts.new_tokens == len(tokens)
    assert len(counts.drafted_by_position) <= model.config.max_draft_tokens
    tokens, counts = bench_methods.run_pld(model, input_ids, {**kwargs, "prompt_lookup_num_tokens": 3})
    assert tokens == reference and counts.new_tokens == len(tokens)
    assert base.generation_config.to_dict() == before
    assert "_get_candidate_generator" not in vars(base)


def test_speculation_counts_record_and_add():
    counts = KangarooStats()
    counts.record_step(drafted=0, accepted=0)
    counts.record_step(drafted=3, accepted=2)
    other = KangarooStats()
    other.record_step(drafted=5, accepted=5)
    counts.add(other)
    assert counts.verify_steps == 3 and counts.new_tokens == 1 + 3 + 6
    assert counts.drafted_by_position == [2, 2, 2, 1, 1]
    assert counts.accepted_by_position == [2, 2, 1, 1, 1]
    assert counts.acceptance_rate_by_position == [1.0, 1.0, 0.5, 1.0, 1.0]
    assert counts.mean_accepted_tokens == pytest.approx(10 / 3)


def test_load_questions_limits_and_validates(tmp_path):
    path = _write_questions(tmp_path / "q.jsonl", categories=("a", "b", "c"), per_category=3)
    questions = load_questions(path, limit_per_category=2, categories=["c", "a"])
    assert [(q.category, q.question_id) for q in questions] == [("a", 0), ("a", 1), ("c", 200), ("c", 201)]
    assert isinstance(questions[0], Question) and len(questions[0].turns) == 2
    with pytest.raises(ValueError, match="zz"):
        load_questions(path, categories=["zz"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "category": "a"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_questions(bad)


def test_find_questions_file(tmp_path, monkeypatch):
    target = tmp_path / "shared" / "data" / "spec_bench" / "question.jsonl"
    target.parent.mkdir(parents=True)
    target.write_text("")
    nested = tmp_path / "repo" / "sub"
    nested.mkdir(parents=True)
    monkeypatch.delenv(bench.QUESTIONS_ENV, raising=False)
    assert find_questions_file(nested) == target
    monkeypatch.setenv(bench.QUESTIONS_ENV, str(tmp_path / "elsewhere.jsonl"))
    assert find_questions_file(nested) == tmp_path / "elsewhere.jsonl"


def test_settings_are_validated():
    with pytest.raises(ValueError, match="Unknown methods"):
        BenchSettings(methods=("vanilla", "medusa"))
    with pytest.raises(ValueError, match="vanilla"):
        BenchSettings(methods=("kangaroo",))
    with pytest.raises(ValueError, match="tie_tolerance"):
        BenchSettings(tie_tolerance=-1.0)


def test_repeats_time_each_method_several_times_and_report_the_median(model, questions, tmp_path, monkeypatch):
    calls: list[str] = []
    fake_times = iter([5.0, 1.0, 3.0] * 100)  # per method and prompt: three runs whose median is 3.0

    def fake_timed(runner, model_, input_ids, gen_kwargs):
        calls.append(runner.__name__)
        return MethodRun(tokens=[7, 8], time_s=next(fake_times), counts=None)

    monkeypatch.setattr(bench, "_timed", fake_timed)
    results = run_benchmark(
        model, tiny_tokenizer(), questions[:2], tmp_path, _settings(methods=("vanilla",), repeats=3)
    )
    assert calls == ["run_vanilla"] * 6  # 2 prompts x 3 repeats
    assert [record["runs"]["vanilla"]["time_s"] for record in results["per_prompt"]] == [3.0, 3.0]
    assert results["settings"]["repeats"] == 3 and "median of 3 timed runs" in results["settings"]["order"]
    with pytest.raises(ValueError, match="repeats must be an int >= 1, got 0"):
        _settings(repeats=0)


def test_repeats_rotate_the_method_order_and_keep_the_first_output(model, questions, tmp_path, monkeypatch, caplog):
    order: list[str] = []
    outputs = iter([[1, 2], [1, 3]] * 100)  # a method whose output changes between repeats is reported

    def fake_timed(runner, model_, input_ids, gen_kwargs):
        order.append(runner.__name__)
        tokens = next(outputs) if runner.__name__ == "run_kangaroo" else [1, 2]
        return MethodRun(tokens=tokens, time_s=1.0, counts=None)

    monkeypatch.setattr(bench, "_timed", fake_timed)
    with caplog.at_level("WARNING", logger=bench.logger.name):
        results = run_benchmark(
            model, tiny_tokenizer(), questions[:1], tmp_path, _settings(methods=("vanilla", "kangaroo"), repeats=2)
        )
    assert order == ["run_vanilla", "run_kangaroo", "run_kangaroo", "run_vanilla"]
    assert "run_kangaroo" not in caplog.text and "kangaroo gave different outputs on repeats" in caplog.text
    assert results["per_prompt"][0]["runs"]["kangaroo"]["identical"] is True  # the first output, [1, 2]


def test_bench_is_a_cli_subcommand():
    from kangaroo_hf.cli import build_parser

    args = build_parser().parse_args(["bench", "--methods", "vanilla,kangaroo", "--dtype", "bfloat16"])
    assert args.handler is bench._run_bench and args.max_new_tokens == 128 and args.dtype == "bfloat16"
    assert args.repeats == 1 and build_parser().parse_args(["bench", "--repeats", "3"]).repeats == 3


def test_vanilla_few_row_is_plain_decoding_through_the_float32_kernel(model, questions, monkeypatch):
    rows_seen = spy_product_rows(monkeypatch, "few_row_matmul")
    input_ids = loading.chat_input_ids(tiny_tokenizer(), questions[0].turns[0])
    kwargs = {"max_new_tokens": 10, "do_sample": False}
    reference, _ = bench_methods.run_vanilla(model, input_ids, kwargs)
    assert rows_seen == []
    tokens, counts = bench_methods.run_vanilla_cpu_kernels(model, input_ids, kwargs)
    assert tokens == reference and counts is None and 1 in rows_seen
    assert not any("forward" in module.__dict__ for module in model.modules())
    rows_seen.clear()
    model.cpu_kernels = CpuKernels(few_row_matmul=False)  # the switch governs the comparison as it governs Kangaroo
    assert bench_methods.run_vanilla_cpu_kernels(model, input_ids, kwargs)[0] == reference and rows_seen == []
    assert "vanilla_cpu_kernels" in bench_methods.METHODS
    assert "vanilla_cpu_kernels" not in bench.BenchSettings().methods
    # The earlier name still selects it, and the report says which kernels each method ran through.
    settings = bench.BenchSettings(methods=("vanilla", "vanilla_few_row"))
    assert settings.methods == ("vanilla", "vanilla_cpu_kernels")
    assert bench_methods.method_kernels("vanilla", model) == "F.linear"


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_vanilla_few_row_goes_through_packed_weights_in_bfloat16(model, questions, monkeypatch):
    packed_rows = spy_product_rows(monkeypatch, "packed_matmul")
    model.to(torch.bfloat16)
    input_ids = loading.chat_input_ids(tiny_tokenizer(), questions[0].turns[0])
    kwargs = {"max_new_tokens": 10, "do_sample": False}
    reference, _ = bench_methods.run_vanilla(model, input_ids, kwargs)
    assert packed_rows == []
    assert bench_methods.run_vanilla_cpu_kernels(model, input_ids, kwargs)[0] == reference and 1 in packed_rows
    assert not any("forward" in module.__dict__ for module in model.modules())


def test_pld_few_row_is_prompt_lookup_through_the_float32_kernel(model, questions, monkeypatch):
    rows_seen = spy_product_rows(monkeypatch, "few_row_matmul")
    input_ids = loading.chat_input_ids(tiny_tokenizer(), questions[0].turns[0])
    kwargs = {"max_new_tokens": 10, "do_sample": False}
    tokens, counts = bench_methods.run_pld(model, input_ids, {**kwargs, **bench_methods.DEFAULT_METHOD_OPTIONS["pld"]})
    assert rows_seen == [] and sum(counts.drafted_by_position) > 0  # it really looked up
    # The benchmark hands each method its own options: pld_cpu_kernels gets the same lookup as pld.
    options = bench_methods.DEFAULT_METHOD_OPTIONS["pld_cpu_kernels"]
    kernel_tokens, kernel_counts = bench_methods.run_pld_cpu_kernels(model, input_ids, {**kwargs, **options})
    assert kernel_tokens == tokens and kernel_counts.verify_steps == counts.verify_steps and rows_seen
    with pytest.raises(ValueError, match="prompt lookup needs prompt_lookup_num_tokens"):
        bench_methods.run_pld(model, input_ids, kwargs)  # without it generate() would quietly decode plainly


def test_speedup_is_per_token_when_output_lengths_differ():
    """A method whose output ends earlier (a bfloat16 near-tie, say) is not credited with the tokens it never made."""
    from kangaroo_hf.bench.report import build_results

    def record(qid: int, reference_tokens: int, method_tokens: int) -> PromptRecord:
        runs = {
            "vanilla": MethodRun([7] * reference_tokens, 10.0, None),
            "pld": MethodRun([7] * method_tokens, 5.0, None),
        }
        return PromptRecord(Question(qid, "qa", ("q",)), 3, runs)

    same = build_results([record(1, 100, 100)], [], ("vanilla", "pld"), {"do_sample": True})
    assert same["methods"]["pld"]["overall"]["speedup"] == pytest.approx(2.0)  # equal lengths: the time ratio
    shorter = build_results([record(1, 100, 100), record(2, 100, 50)], [], ("vanilla", "pld"), {"do_sample": True})
    overall = shorter["methods"]["pld"]["overall"]
    # 150 tokens in 10 s against 200 tokens in 20 s: 1.5x per token (the time ratio would claim 2x).
    assert overall["speedup"] == pytest.approx(1.5)
    assert overall["speedup"] == pytest.approx(overall["tokens_per_second"] / 10.0)


def test_prompt_lookup_flags_set_both_prompt_lookup_methods(monkeypatch, tmp_path):
    """`pld_cpu_kernels` is `pld` through the kernel: `--pld-*` must reach it too, or it would run other options."""
    from kangaroo_hf import loading as commands_module
    from kangaroo_hf.cli import build_parser

    seen = {}

    def fake_run(model, tokenizer, questions, output_dir, settings, description):
        seen["options"] = settings.method_options
        raise LosslessnessError("stop here")

    monkeypatch.setattr(bench, "run_benchmark", fake_run)
    monkeypatch.setattr(commands_module, "load_model", lambda *args: (None, None))
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["hi"]}) + "\n")
    argv = ["bench", "--questions", str(questions), "--methods", "vanilla,pld,pld_few_row"]
    args = build_parser().parse_args(argv + ["--pld-num-tokens", "3", "--pld-max-ngram", "3"])
    assert args.handler(args) == 1
    expected = {"prompt_lookup_num_tokens": 3, "max_matching_ngram_size": 3}
    assert seen["options"]["pld"] == seen["options"]["pld_cpu_kernels"] == expected


def test_batched_bench_reports_every_batch_size_and_is_lossless(tmp_path, monkeypatch, capsys):
    """`kangaroo-hf bench --batch-size`: tokens/s per method and batch size, identical rows, tau beside batch 1."""
    model = make_kangaroo("llama", draft_threshold=0.3, max_draft_tokens=4, lookup_num_tokens=2)
    path = _write_questions(tmp_path / "q.jsonl", categories=("math", "rag"), per_category=2)
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = "<unk>"
    monkeypatch.setattr(loading, "load_model", lambda name, dtype, device="cpu": (model, tokenizer))
    argv = ["--questions", str(path), "--batch-size", "1,2,4", "--max-new-tokens", "8", "--output", str(tmp_path)]
    assert bench.main(argv) == 0
    results = json.loads((tmp_path / "batch_results.json").read_text())
    assert set(results["batch_sizes"]) == {"1", "2", "4"} and results["prompts"] == 4
    assert results["lossless"] is True
    for summary in results["batch_sizes"].values():
        assert set(summary) == {"vanilla", "vanilla_cpu_kernels", "kangaroo"}
        assert summary["kangaroo"]["identical_fraction"] == 1.0 and summary["kangaroo"]["failed_rows"] == 0
        assert summary["kangaroo"]["tau_gap_vs_batch_1"]["max_abs"] == 0.0  # float32: rows draft as they do alone
    assert (tmp_path / "batch_speedup.png").exists() and "| 4 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="Batched benchmark methods"):
        bench.main([*argv, "--methods", "vanilla,pld"])


def test_kangaroo_tree_method_runs_tree_rounds(tmp_path):
    model = make_kangaroo("llama", draft_threshold=0.3, max_draft_tokens=4, lookup_num_tokens=2)
    questions = load_questions(_write_questions(tmp_path / "q.jsonl"))[:2]
    results = run_benchmark(
        model, tiny_tokenizer(), questions, tmp_path, _settings(methods=("vanilla", "kangaroo", "kangaroo_tree"))
    )
    assert results["lossless"] is True
    assert results["methods"]["kangaroo_tree"]["overall"]["identical_fraction"] == 1.0


def test_kangaroo_assisted_method_uses_the_exported_drafter(tmp_path):
    from kangaroo_hf.bench.methods import exported_drafter

    model = make_kangaroo("llama", draft_threshold=0.3, max_draft_tokens=3)
    questions = load_questions(_write_questions(tmp_path / "q.jsonl"))[:2]
    results = run_benchmark(
        model, tiny_tokenizer(), questions, tmp_path, _settings(methods=("vanilla", "kangaroo_assisted"))
    )
    assert results["lossless"] is True
    overall = results["methods"]["kangaroo_assisted"]["overall"]
    assert overall["identical_fraction"] == 1.0 and overall["mean_accepted_tokens"] > 1.0
    draft = exported_drafter(model)
    assert exported_drafter(model) is draft  # exported once per model
    assert draft.config.num_hidden_layers == model.config.exit_layer + 1
    assert draft.generation_config.num_assistant_tokens != 3  # the per-call settings were put back
