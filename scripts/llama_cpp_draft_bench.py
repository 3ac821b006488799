"""Time llama.cpp alone against llama.cpp with the exported Kangaroo drafter as its draft model (`-md`).

Not part of CI. Steps, each skipped when its output exists under --work:

1. build `llama-server` from the llama.cpp vendored in the `llama-cpp-python` source distribution (fetched with
   `pip download --no-binary`), with cmake and `-DGGML_NATIVE=ON`;
2. export the drafter (`kangaroo-hf export --gguf`, vocabulary copied from the embedded SmolLM2 GGUF);
3. start three servers on 127.0.0.1: the target alone (the embedded SmolLM2 GGUF), the target with the drafter
   (`--spec-type draft-simple`, at most `max_draft_tokens` drafts, `--spec-draft-p-min` = the adapter's
   `draft_threshold`), and the drafter alone (its cost per token, for the cost model);
4. send every dev question (chat template, greedy, `--max-new-tokens`) to each in turn, the order rotated per
   question, and read llama.cpp's own timings (`predicted_ms`, `draft_n`, `draft_n_accepted`).

    python scripts/llama_cpp_draft_bench.py --work /tmp/llama_cpp --output docs/benchmarks/llama_cpp
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

CONFIGS = ("target", "target+drafter", "drafter")


def build_llama_server(work: Path, version: str | None, jobs: int) -> Path:
    binary = work / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    sdists = sorted(work.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", str(work)],
            check=True,
        )
        sdists = sorted(work.glob("llama_cpp_python-*.tar.gz"))
    source = work / sdists[-1].name.removesuffix(".tar.gz")
    if not source.is_dir():
        with tarfile.open(sdists[-1]) as archive:
            archive.extractall(work, filter="data")
    llama_cpp = source / "vendor" / "llama.cpp"
    flags = ["-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Release"]
    subprocess.run(["cmake", "-S", str(llama_cpp), "-B", str(work / "build"), *flags], check=True)
    subprocess.run(["cmake", "--build", str(work / "build"), "--target", "llama-server", "-j", str(jobs)], check=True)
    return binary


def export_drafter(work: Path, gguf_type: str) -> tuple[Path, dict]:
    from kangaroo_hf import load_default_model
    from kangaroo_hf.hub.export import save_drafter

    model, tokenizer = load_default_model()
    folder = work / f"drafter-{gguf_type}"
    path = folder / f"drafter-{gguf_type}.gguf"
    if not path.is_file():
        save_drafter(model, folder, tokenizer, gguf_type=gguf_type)
    settings = {"draft_threshold": model.config.draft_threshold, "max_draft_tokens": model.config.max_draft_tokens}
    return path, settings


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(binary: Path, model: Path, threads: int, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads)]
    command += ["-c", "4096", "--parallel", "1", "--no-webui", *extra]
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"llama-server stopped: see {log}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"llama-server did not start: see {log}")
        time.sleep(0.5)


def complete(url: str, prompt: str, max_new_tokens: int) -> dict:
    body = {
        "prompt": prompt,
        "n_predict": max_new_tokens,
        "temperature": 0.0,
        "top_k": 1,
        "cache_prompt": False,
    }
    request = urllib.request.Request(
        f"{url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/llama_cpp"), help="build and export folder")
    parser.add_argument("--output", type=Path, required=True, help="folder for results.json and results.md")
    parser.add_argument("--llama-cpp-python-version", default=None, help="source distribution (default: newest)")
    parser.add_argument("--gguf-type", default="q8_0", choices=("f32", "f16", "q8_0"))
    parser.add_argument("--limit-per-category", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.output.mkdir(parents=True, exist_ok=True)

    from kangaroo_hf.bench.runner import find_questions_file, load_questions
    from kangaroo_hf.default_model import embedded_gguf_path, load_embedded_tokenizer

    binary = build_llama_server(args.work, args.llama_cpp_python_version, args.threads)
    drafter, settings = export_drafter(args.work, args.gguf_type)
    target = embedded_gguf_path()
    speculative = ["-md", str(drafter), "--spec-type", "draft-simple", "--spec-draft-n-max"]
    speculative += [str(settings["max_draft_tokens"]), "--spec-draft-n-min", "0"]
    speculative += ["--spec-draft-p-min", str(settings["draft_threshold"])]
    servers = {
        "target": start_server(binary, target, args.threads, [], args.work / "server_target.log"),
        "target+drafter": start_server(binary, target, args.threads, speculative, args.work / "server_spec.log"),
        "drafter": start_server(binary, drafter, args.threads, [], args.work / "server_drafter.log"),
    }
    tokenizer = load_embedded_tokenizer()
    questions = load_questions(find_questions_file(), args.limit_per_category)
    records = []
    try:
        for index, question in enumerate(tqdm(questions, desc="questions", unit="question")):
            messages = [{"role": "user", "content": question.turns[0]}]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            order = CONFIGS[index % 3 :] + CONFIGS[: index % 3]
            runs = {name: complete(servers[name][1], prompt, args.max_new_tokens) for name in order}
            records.append(
                {
                    "question_id": question.question_id,
                    "category": question.category,
                    **{
                        name: {
                            "tokens": run["timings"]["predicted_n"],
                            "ms": run["timings"]["predicted_ms"],
                            "draft_n": run["timings"].get("draft_n", 0),
                            "draft_n_accepted": run["timings"].get("draft_n_accepted", 0),
                            "text": run["content"],
                        }
                        for name, run in runs.items()
                    },
                }
            )
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(30)

    def rate(name: str, rows: list[dict]) -> float:
        return sum(row[name]["tokens"] for row in rows) / sum(row[name]["ms"] for row in rows) * 1000

    drafted = sum(row["target+drafter"]["draft_n"] for row in records)
    accepted = sum(row["target+drafter"]["draft_n_accepted"] for row in records)
    cost = rate("target", records) / rate("drafter", records)  # drafter time per token / target time per token
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "llama_cpp_source": sorted(args.work.glob("llama_cpp_python-*.tar.gz"))[-1].name,
        "target": target.name,
        "drafter": f"{drafter.name} ({args.gguf_type})",
        "settings": settings,
        "prompts": len(records),
        "max_new_tokens": args.max_new_tokens,
        "tokens_per_s": {name: rate(name, records) for name in CONFIGS},
        "speedup": rate("target+drafter", records) / rate("target", records),
        "draft_acceptance": accepted / drafted if drafted else 0.0,
        "drafted": drafted,
        "accepted": accepted,
        "drafter_cost_per_token": cost,
        "identical_text": sum(row["target"]["text"] == row["target+drafter"]["text"] for row in records),
        "per_prompt_speedup_median": statistics.median(
            (row["target"]["ms"] / row["target"]["tokens"])
            / (row["target+drafter"]["ms"] / row["target+drafter"]["tokens"])
            for row in records
        ),
    }
    (args.output / "results.json").write_text(json.dumps({"summary": summary, "records": records}, indent=2) + "\n")
    categories = sorted({row["category"] for row in records}, key=[r["category"] for r in records].index)
    lines = [
        "# llama.cpp with the exported Kangaroo drafter (`-md`)",
        "",
        f"{summary['prompts']} dev questions, greedy, {args.max_new_tokens} new tokens; {summary['machine']}; "
        f"{summary['llama_cpp_source']}; target {summary['target']}, drafter {summary['drafter']}; {summary['date']}.",
        "",
        "| category | target tokens/s | target + drafter tokens/s | speed-up | drafts accepted |",
        "|---|---:|---:|---:|---:|",
    ]
    for category in [*categories, None]:
        rows = [row for row in records if category is None or row["category"] == category]
        drafted_here = sum(row["target+drafter"]["draft_n"] for row in rows)
        accepted_here = sum(row["target+drafter"]["draft_n_accepted"] for row in rows)
        name = category or "**overall**"
        lines.append(
            f"| {name} | {rate('target', rows):.1f} | {rate('target+drafter', rows):.1f} | "
            f"{rate('target+drafter', rows) / rate('target', rows):.2f}x | "
            f"{accepted_here / drafted_here if drafted_here else 0:.0%} |"
        )
    lines += [
        "",
        f"Drafter alone: {summary['tokens_per_s']['drafter']:.1f} tokens/s, so one drafted token costs "
        f"{cost:.2f} of a target token. Identical text (target alone vs with the drafter): "
        f"{summary['identical_text']} of {summary['prompts']}.",
    ]
    (args.output / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if shutil.which("cmake") is None:
        sys.exit("cmake is needed to build llama.cpp")
    main()
