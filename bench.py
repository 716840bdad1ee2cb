"""Benchmarks: figures printed together with the exact workload and the command that made them.

  python bench.py --config tiny.json [--random-init PRESET] [--checkpoint DIR] [--steps 5]
      where a training step's time and memory go, phase by phase, on the config's own work
  python bench.py --workload standard [--steps 5]
      a fixed tiny-VL GRPO step (fp32 and 4-bit) that other implementations can be timed on
  python bench.py experts [--data FOLDER_OF_BENCHMARK_FILES] [--queries 1000]
  python bench.py rollout [--config tiny.json] [--repeats 5]
  python bench.py gpu [--device cuda|cpu] [--steps 2]
      on one GPU: the 3B's memory, phases and decode speed against the bandwidth bound; the 7B's memory
  python bench.py weights --config small.json --random-init qwen2.5-vl-3b --device cpu
      the loaded policy's parameters and bytes by part, and the optimiser state they imply
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import data
import experts
import more
import protocol
import rewards
import rollout
import step_grpo as sg
import world
from config import Config, load_config, run_command
from experts import build_experts
from rollout import phase, timed

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
    cfg = load_config(config, ["--temperature", "0"])
    world.ensure_world(cfg)
    experts = build_experts(cfg)
    policy = more.load_policy(cfg)
    pool = data.load_questions(Path(cfg.world_dir) / "questions_test.jsonl")
    questions = [next(q for q in pool if q.kind == k) for k in world.QUESTION_KINDS] + pool[-1:]
    questions = questions[:n_questions]
    sampler = rollout.policy_sampler(policy, cfg)
    run = lambda qs: rollout.rollout(sampler, experts, qs, cfg, group_size, image_root=cfg.world_dir)
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


# ----------------------------------------------------------------------------------------------
# Weights: what the loaded policy holds, part by part, counted on the model load_policy returns
# (so NF4 packing, double quantisation, the tied head and peft's adapter dtype are what they are,
# not what we assume). Runs on CPU: the static half of the 24 GB plan needs no GPU.


def bench_config(config: str, overrides: list[str], random_init: str | None):
    """The config with its command-line overrides; `random_init` builds that arch preset with random weights."""
    return load_config(config, overrides + (["--random_init", "true", "--arch", random_init]
                                                      if random_init else []))


def tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def quant_state_bytes(weight) -> int:
    """What bitsandbytes keeps beside NF4 weights: block absmax, the code, and the nested state of
    double quantisation (absmax of the absmax)."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        return 0
    total = tensor_bytes(state.absmax) + tensor_bytes(state.code)
    if state.nested:
        total += tensor_bytes(state.state2.absmax) + tensor_bytes(state.state2.code) + tensor_bytes(state.offset)
    return total


def weight_part(name: str, param) -> str:
    if param.requires_grad:
        return "trainable (LoRA" + (", LM head copy)" if "modules_to_save" in name else ")")
    if hasattr(param, "quant_state"):
        return "language model linear layers, NF4"
    if ".visual." in name:
        return "vision tower, frozen"
    return "embeddings, head, norms, frozen"


def bench_weights(config: str, overrides: list[str], random_init: str | None) -> dict:
    """Parameters and bytes of the loaded policy by part, and the optimiser state its trainable part implies.

    `gpu_bytes` is what each part takes on a GPU, where load_policy computes in bf16: frozen
    full-precision weights are bf16 there (fp32 when loaded on a CPU); NF4 and the fp32 adapter are
    the same on both.
    """
    cfg = bench_config(config, overrides, random_init)
    start = time.perf_counter()
    policy = more.load_policy(cfg)
    load_s = time.perf_counter() - start
    parts: dict[str, dict] = {}
    for name, param in policy.model.named_parameters():
        part = parts.setdefault(weight_part(name, param), dict(params=0, bytes=0, gpu_bytes=0, dtypes=set()))
        # NF4 packs two 4-bit values in each uint8 element: the weight's true count is twice its numel.
        quantised = hasattr(param, "quant_state")
        stored = tensor_bytes(param) + quant_state_bytes(param)
        part["params"] += param.numel() * (2 if quantised else 1)
        part["bytes"] += stored
        part["gpu_bytes"] += stored if quantised or param.requires_grad else param.numel() * 2
        part["dtypes"].add("nf4" if quantised else str(param.dtype).replace("torch.", ""))
    trainable = sum(p["params"] for k, p in parts.items() if k.startswith("trainable"))
    optimizer_bytes = {"adamw": 8 * trainable, "paged_adamw_8bit": 2 * trainable}[cfg.optimizer]
    training_state = dict(gradients_fp32=4 * trainable, optimizer=optimizer_bytes)
    return dict(parts={k: dict(v, dtypes=sorted(v["dtypes"])) for k, v in parts.items()},
                training_state=training_state, load_s=load_s, memory=peak_memory(policy.device),
                config=dict(config=config, overrides=overrides, model=cfg.model_name, arch=cfg.arch,
                            random_init=random_init, lora_r=cfg.lora_r, optimizer=cfg.optimizer,
                            train_lm_head=cfg.train_lm_head, device=str(policy.device)))


def print_weights(r: dict) -> None:
    c = r["config"]
    print(f"config: {c['config']} {' '.join(c['overrides'])}  model {c['model']} (arch {c['arch']}"
          f"{', random weights' if c['random_init'] else ''}), LoRA r={c['lora_r']}, loaded on {c['device']} "
          f"in {r['load_s']:.0f} s")
    gb = lambda b: f"{b / 2**30:.2f}"
    print("| part | parameters | dtypes | GiB as loaded | GiB on a GPU (bf16 compute) |\n|---|---|---|---|---|")
    for name, p in r["parts"].items():
        print(f"| {name} | {p['params'] / 1e6:,.1f} M | {', '.join(p['dtypes'])} | {gb(p['bytes'])} | {gb(p['gpu_bytes'])} |")
    s = r["training_state"]
    print(f"| gradients of the trainable part (fp32) | | | | {gb(s['gradients_fp32'])} |")
    print(f"| optimiser state ({c['optimizer']}) | | | | {gb(s['optimizer'])} |")
    total = sum(p["gpu_bytes"] for p in r["parts"].values()) + sum(s.values())
    print(f"| **weights and training state** | | | | **{gb(total)}** |")
    print(f"peak memory of this process: {r['memory']}")


# ----------------------------------------------------------------------------------------------
# Training steps: where the time and memory of one Step-GRPO update go, phase by phase. The phases
# are timed inside the real code (rollout.phase, rollout.timed): these are the same functions `train` runs.

PHASES = ["prompt encoding", "generation", "expert calls", "rewards", "batch building", "reference forward",
          "policy forward", "backward", "optimizer"]


def reset_peak_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> dict:
    """CUDA max allocated/reserved since the last reset; on CPU the process's peak RSS (whole life)."""
    if device.type == "cuda":
        return dict(cuda_max_allocated_gb=round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
                    cuda_max_reserved_gb=round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
                    gpu=torch.cuda.get_device_name(device))
    return dict(peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))


def timed_steps(one_step, steps: int, device) -> list[dict]:
    """A warm-up step (allocator, kernels, caches), then `steps` timed ones; `one_step()` runs one
    update and returns what it did (token and call counts). Phases are timed where the code marks
    them (rollout.phase)."""
    one_step()
    reset_peak_memory(device)
    rows = []
    for _ in tqdm(range(steps), desc="timed steps"):
        with timed(device) as clock:
            start = time.perf_counter()
            work = one_step()
            total = time.perf_counter() - start
        rows.append(dict(total=total, phases=dict(clock.seconds), **work))
    return rows


def summarise_steps(rows: list[dict], device) -> dict:
    """Medians over the timed steps: each phase, the total, and what no phase accounts for."""
    median = lambda values: float(np.median(values))
    phases = {name: median([r["phases"].get(name, 0.0) for r in rows]) for name in PHASES}
    total = median([r["total"] for r in rows])
    phases["other (parsing, bookkeeping)"] = median([r["total"] - sum(r["phases"].values()) for r in rows])
    generation = [r["phases"].get("generation", 0.0) for r in rows]
    return dict(steps=len(rows), step_s=total, phases=phases,
                sampled_tokens_per_s=median([r["sampled_tokens"] / max(g, 1e-9) for r, g in zip(rows, generation)]),
                expert_share_of_rollout=median([r["phases"].get("expert calls", 0.0) /
                                               max(1e-9, sum(r["phases"].get(n, 0.0) for n in
                                                             ("prompt encoding", "generation", "expert calls")))
                                               for r in rows]),
                memory=peak_memory(device), work=rows[-1]["work"])


def describe_work(samples, trajectories, image_token_id: int) -> dict:
    """The exact work of one update, so that another implementation can be timed on the same."""
    prompts = [len(s.step.prompt_ids) for s in samples]
    completions = [len(s.step.completion_ids) for s in samples]
    image_tokens = [s.step.prompt_ids.count(image_token_id) for s in samples if s.image is not None]
    calls = [c for t in trajectories for s in t.steps for c in s.calls]
    return dict(sequences=len(samples), prompt_tokens_mean=round(float(np.mean(prompts)), 1),
                prompt_tokens_max=max(prompts), completion_tokens_mean=round(float(np.mean(completions)), 1),
                completion_tokens_max=max(completions), image_tokens_per_image=sorted(set(image_tokens)),
                sequences_with_image=len(image_tokens), expert_queries=len(calls),
                steps_by_kind=dict(Counter(s.step.kind for s in samples)))


def bench_training(config: str, overrides: list[str], steps: int, random_init: str | None,
                   checkpoint: str | None) -> dict:
    """Time `steps` real updates of the config (its mode, B, G, budgets, experts) after a warm-up."""
    cfg = bench_config(config, overrides, random_init)
    world.ensure_world(cfg)
    experts = build_experts(cfg)
    policy = more.load_policy(cfg, adapter_dir=checkpoint)
    similarity = rewards.SubQuestionSimilarity(experts[0].text_encoder)
    optimizer, _ = sg.make_optimizer(policy, cfg, "grpo")
    questions = data.load_questions(Path(cfg.world_dir) / "questions_train.jsonl")
    step_samples = sg.load_step_samples(cfg)
    image_token_id = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    rng = random.Random(cfg.seed)

    def one_step():
        trajectories, samples, _, _, _ = sg.grpo_step(policy, optimizer, experts, similarity, questions, step_samples,
                                                      cfg, rng, rng.randrange(2**31))
        return dict(sampled_tokens=sum(len(s.step.completion_ids) for s in samples),
                    work=describe_work(samples, trajectories, image_token_id))

    result = summarise_steps(timed_steps(one_step, steps, policy.device), policy.device)
    result["decode_bytes"] = decode_bytes(policy)
    result["config"] = dict(config=config, overrides=overrides, model=cfg.model_name, arch=cfg.arch,
                            random_init=random_init, checkpoint=checkpoint, mode=cfg.mode,
                            questions_per_step=cfg.questions_per_step, group_size=cfg.group_size,
                            max_steps=cfg.max_steps, max_new_tokens=[cfg.max_new_tokens_plan, cfg.max_new_tokens_answer],
                            load_in_4bit=cfg.load_in_4bit, lora_r=cfg.lora_r, beta=cfg.beta,
                            micro_batch=cfg.micro_batch, gradient_checkpointing=cfg.gradient_checkpointing,
                            max_pixels=cfg.max_pixels, device=str(policy.device), threads=_threads())
    return result


def decode_bytes(policy) -> int:
    """Bytes every decode step must read: the language model's layers (NF4 with its quantisation
    state, or full precision), the LoRA matrices, and the LM head; not the vision tower nor the
    embedding table (one row per token)."""
    core = more._core(policy.model)
    params = dict(core.model.language_model.layers.named_parameters())
    params.update({f"head.{n}": p for n, p in core.lm_head.named_parameters()})
    params.update({f"norm.{n}": p for n, p in core.model.language_model.norm.named_parameters()})
    return sum(tensor_bytes(p) + quant_state_bytes(p) for p in params.values())


def _threads() -> int:
    return torch.get_num_threads()


def print_training(r: dict) -> None:
    c, w = r["config"], r["work"]
    print(f"config: {c['config']} {' '.join(c['overrides'])}  model {c['model']} (arch {c['arch']}"
          f"{', random weights' if c['random_init'] else ''}), {'4-bit' if c['load_in_4bit'] else 'full precision'}, "
          f"LoRA r={c['lora_r']}, beta={c['beta']}, mode {c['mode']}, device {c['device']} ({c['threads']} threads)")
    print(f"work per update: B={c['questions_per_step']} x G={c['group_size']}, {w['sequences']} sequences "
          f"{w['steps_by_kind']}, prompt tokens mean {w['prompt_tokens_mean']} / max {w['prompt_tokens_max']}, "
          f"completion tokens mean {w['completion_tokens_mean']} / max {w['completion_tokens_max']}, "
          f"{w['sequences_with_image']} sequences with an image of {w['image_tokens_per_image']} image tokens, "
          f"{w['expert_queries']} expert queries (work of the last timed update)")
    print(f"| phase (median of {r['steps']} updates after a warm-up) | seconds | share |\n|---|---|---|")
    for name, seconds in r["phases"].items():
        print(f"| {name} | {seconds:.3f} | {100 * seconds / r['step_s']:.1f}% |")
    print(f"| **update** | **{r['step_s']:.3f}** | |")
    print(f"sampled tokens/s (generation phase): {r['sampled_tokens_per_s']:.0f}   "
          f"expert calls: {100 * r['expert_share_of_rollout']:.1f}% of rollout time   memory: {r['memory']}")


# ----------------------------------------------------------------------------------------------
# One command for a GPU: small.json's 3B with random weights (memory over an update, phases, decode
# speed against the bandwidth bound) and the 7B's peak memory. On a CPU the same path runs the tiny
# preset, so that it is tested before it meets a GPU.

GPU_RUNS = {"cuda": ("small.json", "qwen2.5-vl-3b", "qwen2.5-vl-7b"), "cpu": ("tiny.json", "tiny", "tiny")}


def memory_bandwidth(device: torch.device, gib: float = 1.0) -> float:
    """Bytes/s of a large on-device copy (read + write), the median of 5: what decoding is bound by."""
    src = torch.empty(int(gib * 2**28), dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * tensor_bytes(src) / float(np.median(times[1:]))


def step_sample_overrides(folder: Path) -> list[str]:
    """Steps mode on the release's step-file rows in samples/ (real prompt lengths), with stand-in
    pictures under their file names: no data to download."""
    step_file = Path(__file__).resolve().parent / "samples" / "more" / "grpo_dataset_valid_new.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    for row in experts.read_jsonl(step_file):
        for i, image in enumerate(row.get("images", [])):
            if not (folder / Path(image).name).exists():
                Image.fromarray(np.random.RandomState(i).randint(0, 256, (224, 224, 3), dtype=np.uint8)).save(
                    folder / Path(image).name)
    return ["--mode", "steps", "--steps_file", str(step_file), "--image_root", str(folder), "--sft_steps", "0"]


def bench_gpu(device: str, overrides: list[str], steps: int) -> dict:
    config, small, large = GPU_RUNS[torch.device(device).type]
    cache = load_config(config, overrides).model_cache
    common = step_sample_overrides(Path(cache) / "step-sample-images") + ["--device", device] + overrides
    result = dict(small=bench_training(config, common, steps, small, None))
    result["bandwidth_gb_s"] = memory_bandwidth(torch.device(device)) / 1e9
    rows = result["small"]["config"]["questions_per_step"] * result["small"]["config"]["group_size"]
    result["decode_bound_tokens_s"] = rows * result["bandwidth_gb_s"] * 1e9 / result["small"]["decode_bytes"]
    result["large"] = bench_training(config, common, 1, large, None)["memory"]
    return result


def print_gpu(r: dict) -> None:
    small = r["small"]
    print_training(small)
    print(f"decode: {small['sampled_tokens_per_s']:.0f} tokens/s sampled; bound {r['decode_bound_tokens_s']:.0f} "
          f"tokens/s = rows x {r['bandwidth_gb_s']:.0f} GB/s (measured copy) / "
          f"{small['decode_bytes'] / 2**30:.2f} GiB read per step")
    print(f"{small['config']['arch']} memory over the updates: {small['memory']}")
    print(f"larger preset, memory over one update: {r['large']}")


# ----------------------------------------------------------------------------------------------
# The standard workload: one fixed GRPO step that any implementation can run (TRL's GRPOTrainer
# does the same work in one step with these settings), in fp32 and with the 4-bit base.

STANDARD = dict(arch="bench-standard", prompts=4, group_size=4, new_tokens=32, image_side=56, lora_r=8, beta=0.04)


def standard_images(folder: Path) -> list[str]:
    """Four fixed 56x56 pictures (seeded noise): 4 image tokens each after the 2x2 merge."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    paths = []
    for i in range(STANDARD["prompts"]):
        path = folder / f"standard-{i}.png"
        side = STANDARD["image_side"]
        Image.fromarray(rng.randint(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def distinct_token_reward(ids: list[int]) -> float:
    """The trivial deterministic reward of the standard workload: the share of distinct tokens."""
    return len(set(ids)) / max(len(ids), 1)


def bench_standard(steps: int, load_in_4bit: bool, model_cache: str) -> dict:
    side, G = STANDARD["image_side"], STANDARD["group_size"]
    cfg = Config(model_name="tiny", arch=STANDARD["arch"], model_cache=model_cache, device="cpu",
                    load_in_4bit=load_in_4bit, lora_r=STANDARD["lora_r"], lora_alpha=2 * STANDARD["lora_r"],
                    beta=STANDARD["beta"], group_size=G, micro_batch=STANDARD["prompts"] * G,
                    min_pixels=side * side, max_pixels=side * side, lr=1e-5)
    torch.manual_seed(0)
    policy = more.load_policy(cfg)
    optimizer, _ = sg.make_optimizer(policy, cfg, "grpo")
    images = standard_images(Path(model_cache) / "standard-images")
    texts = [protocol.render_prompt("You are a helpful assistant.", f"Question {i}: what does this picture show?", True)
             for i in range(len(images))]
    image_token_id = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def one_step():
        with phase("prompt encoding"):
            encoded = [more.encode_prompt(policy.processor, text, image) for text, image in zip(texts, images)]
        policy.model.eval()
        with phase("generation"):
            completions = more.sample(policy, [e for e in encoded for _ in range(G)], None, STANDARD["new_tokens"])
        with phase("rewards"):
            rewards = torch.tensor([distinct_token_reward(c.ids) for c in completions], dtype=torch.float64)
            advantages = torch.cat([sg.group_advantages(group) for group in rewards.split(G)]).tolist()
        samples = [sg.Sample(rollout.Step("plan", encoded[i // G].ids, c.ids, c.logprobs, c.text, True), images[i // G], a)
                   for i, (c, a) in enumerate(zip(completions, advantages))]
        sg.policy_update(policy, optimizer, samples, cfg)
        return dict(sampled_tokens=sum(len(c.ids) for c in completions),
                    work=describe_work(samples, [], image_token_id))

    result = summarise_steps(timed_steps(one_step, steps, policy.device), policy.device)
    result["config"] = dict(config="--workload standard", overrides=[], model="random", arch=STANDARD["arch"],
                            random_init="bench-standard", checkpoint=None, mode="standard",
                            questions_per_step=STANDARD["prompts"], group_size=G, load_in_4bit=load_in_4bit,
                            lora_r=cfg.lora_r, beta=cfg.beta, device="cpu", threads=_threads(),
                            new_tokens=STANDARD["new_tokens"])
    return result


# ----------------------------------------------------------------------------------------------
# Answer rewards: what the gold answer scores, and what answers that game the reward score.


def reward_cases(step_file: str | None, world_dir: str) -> dict[str, list[tuple[str, list]]]:
    """(prediction, golds) pairs by case: golds beside pasted passages, pasted history, 'A or B'."""
    cases = {}
    for name, path in (("official", step_file), ("mini world", str(Path(world_dir) / "steps_train.jsonl"))):
        if not path or not Path(path).exists():
            continue
        samples = data.load_step_file(path)
        answers = [s for s in samples if s.kind == "answer" and str(s.gold).strip()]
        finals = [s for s in samples if s.kind == "final"]
        cases[f"{name} sub-answers: the gold"] = [(s.gold, [s.gold]) for s in answers]
        cases[f"{name} sub-answers: the prompt (passages) pasted"] = [(data.step_prompt(s)[0].user, [s.gold]) for s in answers]
        cases[f"{name} final answers: the first gold"] = [(s.gold[0], s.gold) for s in finals]
        cases[f"{name} final answers: the prompt (history) pasted"] = [(data.step_prompt(s)[0].user, s.gold) for s in finals]
    questions = [q for split in ("train", "validation", "test")
                 for q in data.load_questions(Path(world_dir) / f"questions_{split}.jsonl") if q.kind == "compare"]
    cases["mini world comparisons: the gold"] = [(q.answers[0], q.answers) for q in questions]
    cases["mini world comparisons: 'A or B'"] = [(q.question.split(", ", 1)[1].rstrip("?"), q.answers) for q in questions]
    return cases


def bench_rewards(step_file: str | None, world_dir: str) -> dict:
    """Mean reward of each case under each answer_reward rule (rewards.answer_reward)."""
    world.ensure_world(Config(world_dir=world_dir))
    rules = ("recall", "f1")
    return {case: dict(n=len(pairs), **{rule: float(np.mean([rewards.answer_reward(p, g, rule) for p, g in pairs]))
                                        for rule in rules})
            for case, pairs in reward_cases(step_file, world_dir).items()}


def print_rewards(result: dict) -> None:
    print("| answer | n | recall (the release) | f1 |\n|---|---|---|---|")
    for case, row in result.items():
        print(f"| {case} | {row['n']} | {row['recall']:.3f} | {row['f1']:.3f} |")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    # The sub-command is a first word, not an argparse positional: a config override such as
    # `--mode steps` would otherwise have its value taken for the sub-command.
    what = argv[0] if argv[:1] in (["experts"], ["rollout"], ["weights"], ["rewards"], ["gpu"]) else "train"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent / "tiny.json"))
    parser.add_argument("--workload", choices=["config", "standard"], default="config",
                        help="standard: the fixed tiny-VL GRPO step, fp32 and 4-bit (the config is not used)")
    parser.add_argument("--random-init", default=None, metavar="PRESET",
                        help="build this arch preset with random weights (qwen2.5-vl-3b, qwen2.5-vl-7b, ...)")
    parser.add_argument("--checkpoint", default=None, help="a trained adapter: run folder, checkpoint or adapter")
    parser.add_argument("--steps", type=int, default=5, help="timed updates after one warm-up update")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parent / "samples" / "more"),
                        help="experts: a folder of the release's benchmark files (the samples by default)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--steps-file", default=None, help="rewards: an official step file to score as well")
    parser.add_argument("--world", default="runs/world", help="rewards: the mini world (built when missing)")
    parser.add_argument("--device", default="cuda", help="gpu: cuda (the 3B and 7B) or cpu (the tiny preset)")
    args, overrides = parser.parse_known_args(argv[1:] if what != "train" else argv)
    if overrides and (what in ("experts", "rollout", "rewards") or args.workload == "standard"):
        parser.error(f"unrecognised arguments: {' '.join(overrides)}")
    print("command: python bench.py " + " ".join(argv))
    result = run_command("bench.py", lambda: run_benchmark(what, args, overrides))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def run_benchmark(what: str, args, overrides: list[str]) -> dict:
    """Run and print one benchmark; returns its figures."""
    if what == "gpu":
        result = bench_gpu(args.device, overrides, args.steps)
        print_gpu(result)
    elif what == "rewards":
        result = bench_rewards(args.steps_file, args.world)
        print_rewards(result)
    elif what == "experts":
        result = bench_experts(Path(args.data), args.queries)
        print_experts(result)
    elif what == "rollout":
        result = bench_rollout(args.config, args.repeats)
        print_rollout(result)
    elif what == "weights":
        result = bench_weights(args.config, overrides, args.random_init)
        print_weights(result)
    elif args.workload == "standard":
        cache = Config().model_cache
        result = {}
        for name, four_bit in (("fp32", False), ("4-bit", True)):
            result[name] = bench_standard(args.steps, four_bit, cache)
            print(f"\n## standard workload, {name} base")
            print_training(result[name])
    else:
        result = bench_training(args.config, overrides, args.steps, args.random_init, args.checkpoint)
        print_training(result)
    return result


if __name__ == "__main__":
    main()
