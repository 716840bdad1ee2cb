"""Benchmarks: figures printed together with the exact workload and the command that made them.

  python bench.py experts [--data ../shared/data/more] [--queries 1000]
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["experts"])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parent.parent / "shared/data/more"))
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    print("command: python bench.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    result = bench_experts(Path(args.data), args.queries)
    print_experts(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
