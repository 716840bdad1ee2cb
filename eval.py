"""Evaluation: the loop itself, with routing baselines side by side, scored by the official metric
(metric.py); and `score`, which scores a predictions file in the release's format.

  python eval.py score --dataset webqa --predictions results.jsonl
  python eval.py --config tiny.json [--checkpoint runs/train-tiny] --split test \
      --methods direct,single:text,single:image,single:table,random,oracle,policy

Every method runs greedy on the same questions; the policy always writes the plans and answers,
and a method only changes which expert each valid plan asks.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

import data
import more
import rollout
import world
from config import UserError, load_config, run_command
from experts import build_experts, write_jsonl
from metric import DATASET_GOLDS, golds_of, print_scores, score, score_file
from rollout import format_trace, image_path

# ----------------------------------------------------------------------------------------------
# Evaluating the loop: every method on the same questions, greedy, with its traces and diagnostics.
# The policy always writes the plans (sub-question, when to stop) and the answers; a method only
# decides which expert each valid plan asks, so the methods differ in routing and nothing else.

METHODS_HELP = "direct, single:<kind>, random, oracle, policy (kinds: the config's experts)"


def parse_methods(text: str, kinds: list[str]) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    known = ["direct", "random", "oracle", "policy"] + [f"single:{k}" for k in kinds]
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise UserError(f"unknown method(s) {unknown or text!r}; known: {', '.join(known)}")
    return methods


def make_router(method: str, kinds: list[str], seed: int, gold_sub_questions: bool):
    """The rollout.Router of a method; None for `policy` with its own sub-questions."""
    rng = random.Random(seed)

    def gold_hop(gold_hops, hop):
        return gold_hops[min(hop, len(gold_hops) - 1)]

    def choose(gold_hops, hop, chosen):
        if method.startswith("single:"):
            return [method.split(":", 1)[1]]
        if method == "random":
            return [rng.choice(kinds)]
        if method == "oracle":
            if not gold_hops:
                raise UserError("method 'oracle' needs gold plans with gold experts (the mini world has them)")
            labelled = [k for k in gold_hop(gold_hops, hop).gold_experts if k in kinds]
            return labelled[:1] or chosen  # no expert holds this hop's evidence: keep the policy's choice
        return chosen

    def route(gold_hops, hop, sub_question, chosen):
        if gold_sub_questions and gold_hops:
            sub_question = gold_hop(gold_hops, hop).sub_question
        return sub_question, choose(gold_hops, hop, chosen)
    return None if method == "policy" and not gold_sub_questions else route


def gold_reader_sampler(questions, image_root=None):
    """A scripted stand-in for the policy that isolates routing: it follows the gold plan (gold
    sub-questions, then None/None) and answers a sub-question with its gold sub-answer only when
    that string is in the passages shown, else "unknown"; the final answer is the gold one only
    when every sub-answer was found. So a trajectory is right exactly when routing found all the
    evidence. Its own expert choice is a placeholder: use it with a routing method, not `policy`.
    """
    by_question = {(image_path(q.image, image_root), q.question): q for q in questions}
    sub_answers = {(image_path(q.image, image_root), h.sub_question): h.sub_answer for q in questions for h in q.hops}
    plan = "<think>Follow the gold plan.</think><sub-question>{}</sub-question><ret>{}</ret>"

    def origin(user: str) -> str:
        return user.split("\n", 1)[0].removeprefix("Origin question: ")

    def answers_so_far(user: str) -> list[str]:
        return [line.split(": ", 1)[1] for line in user.split("\n") if re.match(r"Answer\d+: ", line)]

    def write(prompt, kind: str) -> str:
        if kind == "plan":
            question = by_question[(prompt.image, origin(prompt.user))]
            hop = len(answers_so_far(prompt.user))
            if hop >= len(question.hops):
                return plan.format("None", "None")
            return plan.format(question.hops[hop].sub_question, "Text Retriever")
        if kind == "answer":
            passages, _, sub_question = prompt.user.rpartition("Question: ")
            gold = sub_answers.get((prompt.image, sub_question))
            found = gold is not None and gold.lower() in passages.lower()
            return f"<think>Read the passages.</think><answer>{gold if found else 'unknown'}</answer>"
        question = by_question[(prompt.image, origin(prompt.user))]
        answered = answers_so_far(prompt.user)
        right = len(answered) == len(question.hops) and all(a == h.sub_answer for a, h in zip(answered, question.hops))
        return f"<think>Combine the answers.</think><answer>{question.answers[0] if right else 'unknown'}</answer>"

    def sample(prompts, kind):
        return [([], more.Completion(ids=[], logprobs=[], text=write(p, kind), truncated=False)) for p in prompts]
    return sample


def question_golds(question, prediction: str) -> list[str]:
    """The golds the official scorer uses for `prediction` (InfoSeek: answer_eval with its ranges)."""
    if question.answer_eval is None:
        return [str(a) for a in question.answers]
    return golds_of("infoseek", {"answer_eval": question.answer_eval}, question.qid, prediction)


def needs_several_experts(question) -> bool:
    """No single expert holds the evidence of every gold hop (gold-expert labels from data.py)."""
    labelled = [set(h.gold_experts) for h in question.hops]
    return bool(labelled) and all(labelled) and not set.intersection(*labelled)


def question_record(question, trajectory, method: str, show_k: int) -> dict:
    """One prediction with its score, routing and evidence diagnostics, and a compact trace."""
    plans = [s for s in trajectory.steps if s.kind == "plan" and s.valid and not s.stop]
    rounds = [s.experts for s in plans]
    shown = {i for s in plans for c in s.calls for i in c.hit_ids[:show_k]}
    hops = question.hops
    found = [bool(set(h.gold_docs) & shown) for h in hops]
    routed = rollout.routed_right(trajectory, hops)
    result = score(trajectory.final_answer, question_golds(question, trajectory.final_answer))
    return dict(dataset=question.dataset, qid=question.qid, kind=question.kind, method=method,
                question=question.question, golds=list(question.answers), prediction=trajectory.final_answer,
                **{k: getattr(result, k) for k in ("recall", "f1", "exact", "accuracy")},
                several_experts=needs_several_experts(question), rounds=rounds,
                expert_calls=sum(len(s.calls) for s in plans),
                call_ms=[c.ms for s in plans for c in s.calls],
                switches=sum(a != b for a, b in zip(rounds, rounds[1:])),
                routing=routed, evidence_recall=float(np.mean(found)) if hops else None,
                valid_steps=all(s.valid for s in trajectory.steps), trace=format_trace(trajectory))


def run_methods(cfg, questions, methods: list[str], checkpoint: str | None, gold_sub_questions: bool,
                out_dir: Path, image_root=None, gold_reader: bool = False) -> list[dict]:
    """Every method on every question (greedy, G=1); records written to predictions.jsonl.

    `gold_reader` replaces the policy with gold_reader_sampler (routing alone is measured).
    """
    experts = build_experts(cfg)
    if gold_reader:
        if "policy" in methods:
            raise UserError("method 'policy' needs the model: the gold reader has no routing of its own")
        sampler = gold_reader_sampler(questions, image_root)
    else:
        policy = more.load_policy(cfg, adapter_dir=checkpoint)
        policy.model.eval()
        sampler = rollout.policy_sampler(policy, dataclasses.replace(cfg, temperature=0.0))
    kinds = [e.kind for e in experts]
    out_dir.mkdir(parents=True, exist_ok=True)
    records, path = [], out_dir / "predictions.jsonl"
    write_jsonl(path, [])
    for method in methods:
        router = make_router(method, kinds, cfg.seed, gold_sub_questions)
        method_cfg = dataclasses.replace(cfg, max_steps=0) if method == "direct" else cfg
        batch = 8  # questions per batched rollout: one progress tick each
        for start in tqdm(range(0, len(questions), batch), desc=method, unit="batch"):
            chunk = questions[start:start + batch]
            trajectories = rollout.rollout(sampler, experts, chunk, method_cfg, image_root=image_root, router=router)
            chunk_records = [question_record(q, t, method, cfg.show_k) for q, t in zip(chunk, trajectories)]
            write_jsonl(path, chunk_records, append=True)
            records += chunk_records
    return records


def summarise(records: list[dict]) -> dict:
    """Per dataset and method: the metric, routing diagnostics, and the several-expert subset."""
    mean = lambda values: float(np.mean(values)) if values else None
    table = {}
    for (dataset, method) in dict.fromkeys((r["dataset"], r["method"]) for r in records):
        rows = [r for r in records if r["dataset"] == dataset and r["method"] == method]
        several = [r for r in rows if r["several_experts"]]
        usage = {}
        for r in rows:
            for index, kinds in enumerate(r["rounds"]):
                for kind in kinds:
                    usage.setdefault(index + 1, {}).setdefault(kind, 0)
                    usage[index + 1][kind] += 1
        switchable = [r for r in rows if len(r["rounds"]) > 1]
        table[f"{dataset}/{method}"] = dict(
            dataset=dataset, method=method, n=len(rows),
            **{k: 100 * mean([r[k] for r in rows]) for k in ("recall", "f1", "exact", "accuracy")},
            evidence_recall=_percent(mean([r["evidence_recall"] for r in rows if r["evidence_recall"] is not None])),
            routing_accuracy=_percent(mean([x for r in rows for x in r["routing"]])),
            steps_per_question=mean([len(r["rounds"]) for r in rows]),
            expert_calls_per_question=mean([r["expert_calls"] for r in rows]),
            expert_switch_rate=mean([r["switches"] / (len(r["rounds"]) - 1) for r in switchable]),
            expert_ms_per_call=mean([ms for r in rows for ms in r["call_ms"]]),
            usage_by_step=usage, valid_trajectories=mean([r["valid_steps"] for r in rows]),
            several_experts=dict(n=len(several), recall=_percent(mean([r["recall"] for r in several])),
                                 evidence_recall=_percent(mean([r["evidence_recall"] for r in several
                                                                if r["evidence_recall"] is not None]))))
    return table


def _percent(x):
    return None if x is None else 100 * x


def summary_markdown(table: dict, header: str) -> str:
    fmt = lambda x, spec=".1f": "–" if x is None else format(x, spec)
    lines = [header, "", "| dataset | method | n | F1-Recall | F1 | EM | Acc | evidence recall | routing acc | "
             "steps/q | calls/q | switch rate | ms/call | several-expert n | several-expert F1-Recall | "
             "several-expert evidence |", "|" + "---|" * 16]
    for row in table.values():
        several = row["several_experts"]
        lines.append(f"| {row['dataset']} | {row['method']} | {row['n']} | {fmt(row['recall'])} | {fmt(row['f1'])} | "
                     f"{fmt(row['exact'])} | {fmt(row['accuracy'])} | {fmt(row['evidence_recall'])} | "
                     f"{fmt(row['routing_accuracy'])} | {fmt(row['steps_per_question'], '.2f')} | "
                     f"{fmt(row['expert_calls_per_question'], '.2f')} | {fmt(row['expert_switch_rate'], '.2f')} | "
                     f"{fmt(row['expert_ms_per_call'], '.1f')} | {several['n']} | {fmt(several['recall'])} | "
                     f"{fmt(several['evidence_recall'])} |")
    lines += ["", "Expert usage by step index (calls):", ""]
    for row in table.values():
        usage = "; ".join(f"step {i}: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
                          for i, kinds in sorted(row["usage_by_step"].items()))
        lines.append(f"- {row['dataset']}/{row['method']}: {usage or 'no expert calls'}")
    return "\n".join(lines) + "\n"


def load_eval_questions(cfg, split: str, benchmark: str | None, questions_file: str | None, image_root: str | None,
                        limit: int | None):
    """The mini world's split (built on first use), or an official benchmark file."""
    if benchmark:
        if not questions_file:
            raise UserError("--benchmark needs --questions (the official .jsonl file)")
        questions, root = data.load_benchmark(benchmark, questions_file, image_root), None
    else:
        world.ensure_world(cfg)
        path = Path(cfg.world_dir) / f"questions_{split}.jsonl"
        if not path.exists():
            raise UserError(f"no split {split!r}: {path} does not exist (splits: train, validation, test)")
        questions, root = data.load_questions(path), cfg.world_dir
    return questions[:limit] if limit else questions, root


def evaluate_command(args, overrides) -> None:
    cfg = load_config(args.config, overrides)
    gold_reader = args.policy == "gold-reader"
    default = "direct,single:text,single:image,single:table,random,oracle" + ("" if gold_reader else ",policy")
    methods = parse_methods(args.methods or default, list(cfg.experts))
    questions, root = load_eval_questions(cfg, args.split, args.benchmark, args.questions, args.image_root, args.limit)
    out_dir = Path(args.out)
    records = run_methods(cfg, questions, methods, args.checkpoint, args.gold_sub_questions, out_dir, root,
                          gold_reader)
    table = summarise(records)
    who = ("the gold reader (gold plan; a sub-answer only when the passages shown contain it)" if gold_reader else
           f"the policy, checkpoint {args.checkpoint or 'none (untrained)'}, greedy, sub-questions from "
           f"{'the gold plan' if args.gold_sub_questions else 'the policy'}")
    header = f"`python eval.py {' '.join(args.argv)}`: {len(questions)} questions; steps written by {who}"
    markdown = summary_markdown(table, header)
    (out_dir / "summary.md").write_text(markdown)
    (out_dir / "summary.json").write_text(json.dumps(table, indent=1))
    print(markdown)
    print(f"predictions and traces: {out_dir / 'predictions.jsonl'}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["score"]:
        scoring = argparse.ArgumentParser(prog="eval.py score", description="score an official-format predictions file")
        scoring.add_argument("--dataset", required=True, help=", ".join(DATASET_GOLDS))
        scoring.add_argument("--predictions", required=True)
        scoring.add_argument("--subset", action="store_true", help="score fewer questions than the release's file on purpose")
        args = scoring.parse_args(argv[1:])
        run_command("eval.py score", lambda: print_scores(score_file(args.dataset, args.predictions, args.subset)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a JSON config, e.g. tiny.json")
    parser.add_argument("--checkpoint", default=None, help="a trained adapter: run folder, checkpoint or adapter")
    parser.add_argument("--split", default="test", help="mini-world split: train, validation or test")
    parser.add_argument("--methods", default=None,
                        help=METHODS_HELP + "; default: all of them (all but policy with the gold reader)")
    parser.add_argument("--gold-sub-questions", action="store_true",
                        help="ask the experts the gold plan's sub-questions: isolates routing from the policy's writing")
    parser.add_argument("--policy", choices=["model", "gold-reader"], default="model",
                        help="gold-reader: a scripted gold plan and string-matching reader, to measure routing alone")
    parser.add_argument("--limit", type=int, default=None, help="the first N questions only")
    parser.add_argument("--benchmark", default=None, help="an official dataset name instead of the mini world")
    parser.add_argument("--questions", default=None, help="the official .jsonl file for --benchmark")
    parser.add_argument("--image-root", default=None, help="folder of <image_id>.jpg for --benchmark")
    parser.add_argument("--out", default="runs/eval", help="where predictions.jsonl and summary.{md,json} go")
    args, overrides = parser.parse_known_args(argv)
    args.argv = argv
    run_command("eval.py", lambda: evaluate_command(args, overrides))


if __name__ == "__main__":
    main()
