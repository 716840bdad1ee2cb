"""Benchmarks: figures printed together with the exact workload and the command that made them.

  python bench.py experts [--data ../shared/data/more] [--queries 1000]
  python bench.py rollout [--config tiny.json] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import experts

# ----------------------------------------------------------------------------------------------
# Experts: build time, queries/s and recall@10 of hnswlib against exact search, on real embeddings.


def benchmark_corpus(data_dir: Path, n_queries: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Every distinct question and answer string of the MoRE benchmark files, minus held-out queries."""
    texts = []
    for path in sorted(data_dir.glob("*_val.jsonl")) + sorted(data_dir.glob("DynVQA*.jsonl")):
        for row in experts.read_jsonl(path):
            answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
            texts += [row["question"]] + [a for a in answers if isinstance(a, str)]
    texts = list(dict.fromkeys(t.strip() for t in texts if t.strip()))
    order = np.random.RandomState(seed).permutation(len(texts))
    queries = [texts[i] for i in order[:n_queries]]
    corpus = [texts[i] for i in order[n_queries:]]
    return corpus, queries


def bench_experts(data_dir: Path, n_queries: int) -> dict:
    corpus, queries = benchmark_corpus(data_dir, n_queries)
    encoder = experts.TextEncoder("minilm")
    start = time.perf_counter()
    vectors = encoder.encode(corpus, progress="encoding corpus")
    encode_s = time.perf_counter() - start
    query_vectors = encoder.encode(queries)
    start = time.perf_counter()
    index = experts.HnswIndex(encoder.dim)
    index.add(vectors)
    build_s = time.perf_counter() - start
    truth = experts.exact_search(vectors, query_vectors, 10)
    result = dict(documents=len(corpus), queries=len(queries), dim=encoder.dim, encoder="all-MiniLM-L6-v2",
                  encode_s=round(encode_s, 1), build_s=round(build_s, 2), M=index.M,
                  ef_construction=index.ef_construction, by_ef={})
    for ef in (10, 50, 100, 200):
        index.ef = ef
        times = []
        for _ in range(5):
            start = time.perf_counter()
            labels, _ = index.search(query_vectors, 10)
            times.append(time.perf_counter() - start)
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(labels, truth)]))
        result["by_ef"][ef] = dict(recall_at_10=round(recall, 4),
                                   queries_per_s=round(len(queries) / float(np.median(times))))
    return result


def print_experts(result: dict) -> None:
    print(f"workload: {result['documents']} documents, {result['queries']} held-out queries, "
          f"{result['encoder']} ({result['dim']}-d), hnswlib M={result['M']} "
          f"ef_construction={result['ef_construction']}")
    print(f"encode corpus: {result['encode_s']} s   build index: {result['build_s']} s")
    print("| ef | recall@10 vs exact | queries/s (median of 5, batched) |\n|---|---|---|")
    for ef, row in result["by_ef"].items():
        print(f"| {ef} | {row['recall_at_10']:.4f} | {row['queries_per_s']} |")


# ----------------------------------------------------------------------------------------------
# Rollout: batched generation over all active trajectories vs one question at a time, same work.


def bench_rollout(config: str, repeats: int, n_questions: int = 8, group_size: int = 4) -> dict:
    """Greedy decoding, so both ways produce the same trajectories (tests check it) and the same work."""
    import data
    import more
    import rollout
    import torch
    from experts import build_experts
    from step_grpo import load_config
    cfg = load_config(config, ["--temperature", "0"])
    data.ensure_world(cfg)
    experts = build_experts(cfg)
    policy = more.load_policy(cfg)
    pool = data.load_questions(Path(cfg.world_dir) / "questions_test.jsonl")
    questions = [next(q for q in pool if q.kind == k) for k in data.QUESTION_KINDS] + pool[-1:]
    questions = questions[:n_questions]
    sampler = rollout.policy_sampler(policy, cfg)
    run = lambda qs: rollout.rollout(sampler, experts, qs, group_size, cfg.max_steps, cfg.retrieve_k,
                                     cfg.show_k, image_root=cfg.world_dir)
    run(questions[:1])  # warm-up
    batched, single, tokens = [], [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        trajectories = run(questions)
        batched.append(time.perf_counter() - start)
        start = time.perf_counter()
        for q in questions:
            run([q])
        single.append(time.perf_counter() - start)
    tokens = sum(len(s.completion_ids) for t in trajectories for s in t.steps)
    expert_ms = sum(c.ms for t in trajectories for s in t.steps for c in s.calls)
    return dict(questions=len(questions), group_size=group_size, threads=torch.get_num_threads(),
                sampled_tokens=tokens, batched_s=float(np.median(batched)), single_s=float(np.median(single)),
                speedup=float(np.median(single) / np.median(batched)), expert_calls_s=expert_ms / 1000,
                model=cfg.arch, max_new_tokens=[cfg.max_new_tokens_plan, cfg.max_new_tokens_answer])


def print_rollout(r: dict) -> None:
    print(f"workload: {r['questions']} questions x G={r['group_size']} greedy trajectories, model {r['model']}, "
          f"max_new_tokens plan/answer {r['max_new_tokens']}, {r['sampled_tokens']} tokens sampled, "
          f"{r['threads']} CPU threads")
    print(f"batched: {r['batched_s']:.2f} s   one question at a time: {r['single_s']:.2f} s   "
          f"speed-up: {r['speedup']:.1f}x (medians)")
    print(f"expert calls inside the batched rollout: {r['expert_calls_s']:.3f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["experts", "rollout"])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent / "tiny.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parent.parent / "shared/data/more"))
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    print("command: python bench.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.what == "experts":
        result = bench_experts(Path(args.data), args.queries)
        print_experts(result)
    else:
        result = bench_rollout(args.config, args.repeats)
        print_rollout(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
