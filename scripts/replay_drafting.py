"""Replay Kangaroo's greedy drafting rounds on Spec-Bench without timing anything: tau per category, exactly.

    python scripts/replay_drafting.py --per-category 1
    python scripts/replay_drafting.py --per-category 1 --trust-ngram 3   # as config.lookup_trust_ngram=3
    python scripts/replay_drafting.py --per-category 1 --tree 0.0.0.0,1.0,0.1,2   # a static draft tree instead
    python scripts/replay_drafting.py --validation 397   # held-out training-style answers instead of Spec-Bench
    python scripts/replay_drafting.py --validation 397 --tree-rounds --second-choice-threshold 0.1   # tree rounds

Greedy Kangaroo drafts only along the base's own answer until a draft is rejected, so the draft's teacher-forced
predictions along that answer (one shallow + adapter pass over prompt + answer) decide every round: the adapter's chain
(stop below `draft_threshold`, at most `max_draft_tokens`), the prompt-lookup copy at a round's start (taken when the
adapter's first draft equals the copy's first token or is below the threshold), what the base accepts, and the bonus
token. With the shipped settings this reproduced `kangaroo-hf bench --dtype float32` exactly (at the time: tau 1.71
overall, extraction 2.78, math_reasoning 2.56; the previous adapter 1.68 and 3.28), in seconds instead of minutes
of timed decoding, so drafting rules can be compared here before they are built and timed. Rows per round (1 +
drafts) are reported too: verification cost grows with them. Not modelled: stopping criteria other than the answer's
end (no stop strings in Spec-Bench) and `first_draft_threshold` (off in the shipped settings).
"""

from __future__ import annotations

import argparse
import gzip
import json
from dataclasses import dataclass

import torch
from evaluate_adapters import VALIDATION_SIZE, reference_answers  # this folder's: the same Spec-Bench answers

from kangaroo_hf import KangarooForCausalLM, load_default_model
from kangaroo_hf.core.lookup import PromptLookup
from kangaroo_hf.training.data import EncodedConversation, encode_conversation

SELF_DISTILLED = "docs/adapter_search/self_distilled_answers.jsonl.gz"  # its first 397 conversations are held out

TOP_RANKS = 8  # ranks recorded per position, enough for any tree below


@dataclass
class Answer:
    category: str
    prompt: list[int]
    answer: list[int]
    correct: list[bool]  # the draft's top-1 at answer position i equals answer[i]
    top: list[int]  # the draft's top-1 token there
    confidence: list[float]  # its probability (over the draft vocabulary)
    rank: list[int]  # rank of answer[i] among the draft's predictions there (0: top-1; TOP_RANKS: not in the top ones)
    runners_up: list[list[tuple[int, float]]] | None = None  # the draft's 2nd and 3rd tokens there, with probabilities


def teacher_forced(model: KangarooForCausalLM, references: list[EncodedConversation]) -> list[Answer]:
    """The draft's predictions along the base's answers (`evaluate_adapters.reference_answers`)."""
    answers = []
    weight, bias, vocab_ids = model.draft_head()
    for reference in references:
        prompt_length = reference.assistant_mask.index(1)
        full = torch.tensor([reference.input_ids])
        with torch.no_grad():
            positions = torch.arange(full.shape[1]).unsqueeze(0)
            hidden = model.adapter_forward(model.shallow_forward(full, positions, None), positions, None)
            probs = torch.nn.functional.linear(hidden[0, prompt_length - 1 : -1], weight, bias).float().softmax(-1)
        confidence, index = probs.max(-1)
        top = vocab_ids[index] if vocab_ids is not None else index
        answer = full[0, prompt_length:]
        ranked = probs.topk(TOP_RANKS, dim=-1).indices
        ranked = vocab_ids[ranked] if vocab_ids is not None else ranked
        hits = ranked == answer.unsqueeze(1)  # (answer tokens, TOP_RANKS)
        rank = torch.where(hits.any(1), hits.int().argmax(1), TOP_RANKS)
        top3 = probs.topk(3, dim=-1)
        top3_ids = vocab_ids[top3.indices] if vocab_ids is not None else top3.indices
        runners_up = [
            list(zip(ids[1:], values[1:], strict=True))
            for ids, values in zip(top3_ids.tolist(), top3.values.tolist(), strict=True)
        ]
        answers.append(
            Answer(
                reference.id.split("-")[1],
                reference.input_ids[:prompt_length],
                answer.tolist(),
                (top == answer).tolist(),
                top.tolist(),
                confidence.tolist(),
                rank.tolist(),
                runners_up,
            )
        )
    return answers


def validation_answers(tokenizer, count: int, max_new_tokens: int) -> list[EncodedConversation]:
    """The base's own answers to the first `count` held-out prompts (at most `VALIDATION_SIZE`), cut at
    `max_new_tokens` answer tokens, with ids `validation-<source family>-<index>`: drafting rules can be compared on
    training-style prompts that no adapter was trained on and no rule was chosen on."""
    if not 0 < count <= VALIDATION_SIZE:
        raise SystemExit(f"--validation must be in [1, {VALIDATION_SIZE}] (the held-out split), got {count}")
    with gzip.open(SELF_DISTILLED, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(count), handle, strict=False)]
    sequences = []
    for index, row in enumerate(rows):
        encoded = encode_conversation(tokenizer, row["messages"][:2])
        end = encoded.assistant_mask.index(1) + max_new_tokens
        family = row["id"].rsplit("-", 1)[0].split("/")[0].replace("-", "_")
        sequences.append(
            EncodedConversation(encoded.input_ids[:end], encoded.assistant_mask[:end], f"validation-{family}-{index}")
        )
    return sequences


def parse_tree(spec: str) -> frozenset[tuple[int, ...]]:
    """A static draft tree from rank paths, e.g. "0.0.0,1,0.1": the top-1 chain of 3, the second-ranked first
    draft, and the second-ranked draft after the top-1 first; every prefix of a path is in the tree."""
    nodes = set()
    for path in spec.split(","):
        ranks = tuple(int(rank) for rank in path.split("."))
        if any(not 0 <= rank < TOP_RANKS for rank in ranks):
            raise ValueError(f"ranks in {path!r} must be in 0..{TOP_RANKS - 1}")
        nodes.update(ranks[:depth] for depth in range(1, len(ranks) + 1))
    return frozenset(nodes)


def _chain_round(item: Answer, i: int, max_drafts: int, threshold: float) -> tuple[int, int]:
    """(drafted, accepted) of the adapter's chain from answer position `i`: it stops after a draft below `threshold`
    or at `max_drafts`, and leaves the answer's last token to the base."""
    length, drafted = len(item.answer), 0
    while drafted < max_drafts and i + drafted < length - 1:
        drafted += 1
        if item.confidence[i + drafted - 1] < threshold:
            break
    accepted = 0
    while accepted < drafted and item.correct[i + accepted]:
        accepted += 1
    return drafted, accepted


def replay(
    answers: list[Answer],
    threshold: float,
    max_drafts: int,
    lookup_tokens: int,
    max_ngram: int,
    trust_ngram: int,
    lookup_max_tokens: int = 0,
    hit_rate_decay: float = 0.0,
    tree: frozenset[tuple[int, ...]] | None = None,
    tree_rounds: bool = False,
    tree_max_nodes: int = 16,
    second_choice_threshold: float = 1.0,
):
    """(tau, verification rows per round) of greedy Kangaroo decoding on `answers`.

    `tree_rounds` replays `tree_rounds=True` as `core/batched.py` drafts it: a trusted match, or a copy whose first
    token is the adapter's or beside an unsure adapter, is verified alone; otherwise the copy (at most
    `tree_max_nodes` minus the chain and the second choice) and the adapter's chain are both verified and the longer
    accepted one is kept, with the adapter's second-choice first token as a third one-token branch when its
    probability reaches `second_choice_threshold` (the most likely token other than the chain's and the copy's first).

    `hit_rate_decay` replays `lookup_hit_rate_decay`: a copy is also taken when the running rate of context matches
    whose first token was the answer's beats the adapter's confidence.

    With `tree` (`parse_tree`), rounds that do not copy verify that static draft tree instead of the adapter's chain:
    every node is drafted whatever its confidence. Along the base's answer the teacher-forced ranks are exact (a
    node's children are drafted after a token the base accepts), so the accepted length is exact; what a tree costs
    is not modelled: its depth in sequential drafting steps and its size in verification rows.
    """
    depth = max(map(len, tree)) if tree else 0
    second_choice = tree_rounds and second_choice_threshold < 1
    longest_copy = max(lookup_tokens, lookup_max_tokens)
    if tree_rounds:
        longest_copy = min(longest_copy, tree_max_nodes - max_drafts - second_choice)
    steps = tokens = rows = 0
    for item in answers:
        length = len(item.answer)
        steps, tokens, i = steps + 1, tokens + 1, 1  # the prefill gives the first token
        # The generator's own lookup rules, fresh for each answer as for each generate() call.
        rules = PromptLookup(lookup_tokens, max_ngram, lookup_max_tokens, trust_ngram, hit_rate_decay)
        while i < length:
            copy, size = rules.propose(torch.tensor(item.prompt + item.answer[:i])) if lookup_tokens else (None, 0)
            copy = [] if copy is None else copy.tolist()[: max(0, length - 1 - i)][:longest_copy]
            copied = 0  # copied tokens the base accepts (the last answer token is the base's own)
            while copied < len(copy) and copy[copied] == item.answer[i + copied]:
                copied += 1
            # Tree rounds verify the copy alone for a trusted match, or one starting with the adapter's token or
            # beside an unsure adapter; chain rounds ask the lookup's rules.
            if tree_rounds:
                take_copy = bool(copy) and (
                    rules.trusts(size) or copy[0] == item.top[i] or item.confidence[i] < threshold
                )
            else:
                take_copy = bool(copy) and (
                    rules.trusts(size) or rules.prefers_copy(copy[0], item.top[i], item.confidence[i], threshold)
                )
            if take_copy:
                drafted, accepted = len(copy), copied
            elif tree_rounds:  # branches in the loop's order: the copy, the chain, the second choice
                chain, chain_accepted = _chain_round(item, i, max_drafts, threshold)
                branches = ([(len(copy), copied)] if copy else []) + [(chain, chain_accepted)]
                runners_up = item.runners_up[i] if item.runners_up else []
                runner_up = next((pair for pair in runners_up if not copy or pair[0] != copy[0]), None)
                if second_choice and chain and runner_up is not None and runner_up[1] >= second_choice_threshold:
                    branches.append((1, int(runner_up[0] == item.answer[i])))
                kept = max(range(len(branches)), key=lambda index: (branches[index][1], -index))  # the first on a tie
                take_copy = bool(copy) and kept == 0  # the lookup learns from rounds that kept the copy
                drafted, accepted = sum(size for size, _ in branches), branches[kept][1]
            elif tree:
                path: tuple[int, ...] = ()
                while len(path) < depth and i + len(path) < length - 1 and path + (item.rank[i + len(path)],) in tree:
                    path += (item.rank[i + len(path)],)
                drafted, accepted = len(tree), len(path)
            else:
                drafted, accepted = _chain_round(item, i, max_drafts, threshold)
            if take_copy:  # the lookup learns from the copy alone (a tree round's other branches do not count)
                rules.record_round(copy[0] if copy else None, item.answer[i], True, len(copy), copied)
            else:
                rules.record_round(copy[0] if copy else None, item.answer[i], False, drafted, accepted)
            steps, tokens, rows, i = steps + 1, tokens + accepted + 1, rows + 1 + drafted, i + accepted + 1
    return tokens / steps, rows / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument(
        "--validation", type=int, default=0, help="replay the first N held-out self-distilled answers instead"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--adapter", default=None, help="adapter folder (default: the shipped one)")
    parser.add_argument("--threshold", type=float, default=None, help="default: the adapter's draft_threshold")
    parser.add_argument("--max-drafts", type=int, default=None, help="default: the adapter's max_draft_tokens")
    parser.add_argument("--lookup", type=int, default=None, help="default: the adapter's lookup_num_tokens")
    parser.add_argument(
        "--trust-ngram", type=int, default=None, help="default: the adapter's lookup_trust_ngram (0: off)"
    )
    parser.add_argument(
        "--lookup-max-tokens",
        type=int,
        default=None,
        help="default: the adapter's lookup_max_tokens (0: fixed length)",
    )
    parser.add_argument(
        "--hit-rate-decay",
        type=float,
        default=None,
        help="default: the adapter's lookup_hit_rate_decay (0: off)",
    )
    parser.add_argument(
        "--tree",
        default=None,
        help='replay a static draft tree instead of the chain: rank paths such as "0.0.0,1,0.1" (see parse_tree)',
    )
    parser.add_argument(
        "--tree-rounds", action="store_true", help="replay tree_rounds=True (the copy and the chain side by side)"
    )
    parser.add_argument("--tree-max-nodes", type=int, default=None, help="default: the adapter's tree_max_nodes")
    parser.add_argument(
        "--second-choice-threshold",
        type=float,
        default=None,
        help="with --tree-rounds; default: the adapter's tree_second_choice_threshold (1: off)",
    )
    args = parser.parse_args()

    model, tokenizer = load_default_model()
    if args.adapter:
        model = KangarooForCausalLM.from_pretrained(args.adapter, base_model=model.get_base_model()).eval()
    config = model.config
    settings = (
        config.draft_threshold if args.threshold is None else args.threshold,
        config.max_draft_tokens if args.max_drafts is None else args.max_drafts,
        config.lookup_num_tokens if args.lookup is None else args.lookup,
        config.lookup_max_ngram,
        config.lookup_trust_ngram if args.trust_ngram is None else args.trust_ngram,
        config.lookup_max_tokens if args.lookup_max_tokens is None else args.lookup_max_tokens,
        config.lookup_hit_rate_decay if args.hit_rate_decay is None else args.hit_rate_decay,
    )
    if args.validation:
        references = validation_answers(tokenizer, args.validation, args.max_new_tokens)
    else:
        references = reference_answers(model.get_base_model(), tokenizer, args.per_category, args.max_new_tokens)
    answers = teacher_forced(model, references)
    tree = parse_tree(args.tree) if args.tree else None
    if tree:
        print(f"static tree: {len(tree)} nodes, depth {max(map(len, tree))}")
    rounds = dict(
        tree=tree,
        tree_rounds=args.tree_rounds,
        tree_max_nodes=config.tree_max_nodes if args.tree_max_nodes is None else args.tree_max_nodes,
        second_choice_threshold=(
            config.tree_second_choice_threshold
            if args.second_choice_threshold is None
            else args.second_choice_threshold
        ),
    )
    tau, rows = replay(answers, *settings, **rounds)
    print(f"overall: tau {tau:.3f}, {rows:.2f} verification rows per round")
    for category in dict.fromkeys(item.category for item in answers):
        tau, rows = replay([item for item in answers if item.category == category], *settings, **rounds)
        print(f"{category:>16}: tau {tau:.2f}, {rows:.2f} rows")


if __name__ == "__main__":
    main()
