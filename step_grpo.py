"""Step-GRPO: stepwise rewards, group-relative advantages, the clipped loss with KL to the reference,
and a resumable training loop.

  python step_grpo.py --config tiny.json [--key value …] [--resume]

Read top to bottom: config → rewards → advantages → the loss → the warm start → the loop →
checkpoints → the command. Formulas cite their sources; REFERENCE.md holds the released protocol.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
import typing
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------
# Config: one flat dataclass, every field documented, loaded from JSON and overridable on the
# command line (`--lr 1e-5`). Unknown keys and wrong types fail at start, naming the key.


@dataclass
class Config:
    # --- the policy (more.py)
    model_name: str = "tiny"
    """'tiny' (built offline from the `arch` preset) or a hub id / local path of a Qwen2.5-VL checkpoint."""
    random_init: bool = False
    """Build the `arch` preset with random weights instead of loading `model_name` (memory benchmarks)."""
    arch: str = "tiny"
    """Architecture preset for 'tiny' and random_init: tiny, bench-standard, qwen2.5-vl-3b, qwen2.5-vl-7b."""
    model_cache: str = "runs/models"
    """Where the tiny / random-init model is written before being reloaded in 4-bit."""
    load_in_4bit: bool = True
    """Quantise the language model to NF4 (QLoRA). The vision tower and LM head stay in full precision."""
    lora_r: int = 16
    """LoRA rank on the language model's attention and MLP projections."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch; 0 keeps sampling-time and training-time log-probs identical."""
    train_lm_head: bool = False
    """Also train the LM head (a random tiny model needs it; real checkpoints do not)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more time."""
    min_pixels: int = 3136
    """Smallest image area after resizing (56x56); one image token per 28x28 pixels."""
    max_pixels: int = 200704
    """Largest image area after resizing (448x448 = 256 image tokens); caps image memory."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', or 'cuda:N'."""
    seed: int = 0
    """Seed for model init, data order and sampling."""

    # --- sampling (more.py, rollout.py)
    temperature: float = 1.0
    """Sampling temperature; log-probs in the loss use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables it."""
    top_k: int = 0
    """Top-k sampling; 0 disables it (transformers would otherwise default to 50)."""
    max_new_tokens_plan: int = 96
    """Token budget of a plan step (<think>, <sub-question>, <ret>)."""
    max_new_tokens_answer: int = 96
    """Token budget of a sub-answer or final-answer step."""
    max_steps: int = 3
    """Retrieval rounds before the final answer (the release: 3)."""
    group_size: int = 4
    """G: trajectories (online) or samples of a step (steps mode) per group."""

    # --- retrieval experts (experts.py)
    experts: list = field(default_factory=lambda: ["text", "image", "table"])
    """Expert kinds the policy may call, in prompt order: any of text, image, table."""
    world_dir: str = "runs/world"
    """The embedded mini world (questions, corpora, indexes); built on first use when missing."""
    index_dir: str = ""
    """Folder with one built expert per kind (<index_dir>/text, …); empty means <world_dir>/indexes."""
    text_encoder: str = "minilm"
    """Text encoder: 'minilm' (offline, shipped in a wheel) or a transformers path/id such as BAAI/bge-m3."""
    text_pooling: str = "mean"
    """Pooling of the text encoder: 'mean' (MiniLM) or 'cls' (BGE)."""
    image_encoder: str = "pixels"
    """Image encoder: 'pixels' (offline, near-duplicate matching only) or a CLIP path/id."""
    retrieve_k: int = 10
    """Documents each expert retrieves per query (the release: 10)."""
    show_k: int = 5
    """Top documents shown to the policy in the sub-answer prompt (the release: 5)."""

    # --- training (this file)
    mode: str = "online"
    """'online': G live trajectories per question (ours); 'steps': G samples of teacher-forced step prompts (the release)."""
    steps_file: str = ""
    """Step file for 'steps' mode and the warm start; empty means <world_dir>/steps_train.jsonl."""
    train_steps: int = 100
    """Optimiser updates of the GRPO phase (after the warm start)."""
    questions_per_step: int = 4
    """B: questions (online) or step prompts (steps mode) per update; each yields a group of G."""
    lr: float = 1e-4
    """Peak learning rate of the LoRA parameters."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in updates."""
    lr_schedule: str = "constant"
    """After warm-up: 'constant' or 'cosine' (to 0 at the last update)."""
    optimizer: str = "adamw"
    """'adamw' (torch) or 'paged_adamw_8bit' (bitsandbytes; GPU only)."""
    micro_batch: int = 16
    """Sequences per forward/backward; gradients of a whole update are accumulated across them."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    clip_eps: float = 0.2
    """PPO clip range epsilon (the release: 0.2)."""
    beta: float = 0.04
    """Weight of the k3 KL to the reference (adapter disabled); the release computed it but used 0."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (the release: 1e-3)."""
    aggregation: str = "token"
    """Loss aggregation: 'token' (mean over all policy tokens) or 'sequence' (mean of per-sequence means)."""
    w_route: float = 0.5
    """Plan reward: weight of routing credit (exactly one expert, and it is in the hop's gold-expert set)."""
    w_subq: float = 0.5
    """Plan reward: weight of cosine similarity of the sub-question to the gold one."""
    w_outcome: float = 1.0
    """Online mode: weight of the normalised final-answer reward added to every step's advantage."""
    sft_steps: int = 0
    """Supervised warm-start updates on gold step completions before GRPO (for a policy that cannot yet write the protocol)."""
    sft_lr: float = 1e-3
    """Learning rate of the warm start."""
    sft_batch: int = 16
    """Gold step completions per warm-start update."""
    out_dir: str = "runs/train"
    """Where metrics.jsonl, traces.jsonl and checkpoints/ are written."""
    save_every: int = 25
    """Checkpoint every N updates (and at the end)."""
    eval_every: int = 25
    """Greedy evaluation on validation questions every N updates; 0 disables it."""
    eval_questions: int = 21
    """Validation questions per periodic evaluation."""
    traces_per_step: int = 2
    """Trajectories written to traces.jsonl per update."""

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Each field's one-line documentation, read from the docstring under it in this file."""
        source = Path(__file__).read_text().split("class Config")[1].split("\n\n\n")[0]
        return {name: doc for name, doc in re.findall(r'\n    (\w+): [^\n]+\n    """(.*?)"""', source)}



CHOICES = {"mode": ("online", "steps"), "lr_schedule": ("constant", "cosine"), "aggregation": ("token", "sequence"),
           "optimizer": ("adamw", "paged_adamw_8bit"), "text_pooling": ("mean", "cls")}


def _coerce(name: str, value, kind):
    """Check `value` against the field's annotated type; ints are accepted where floats are."""
    origin = typing.get_origin(kind)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (list, dict):
        if not isinstance(value, origin):
            raise ValueError(f"config key {name!r} must be a {origin.__name__}, got {value!r}")
        return value
    if kind is bool and not isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"config key {name!r} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _parse_cli_value(text: str):
    """A command-line value: JSON when it parses (numbers, true/false, lists), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    """A Config from a JSON file plus `--key value` overrides; fails naming any bad key or path."""
    values = {}
    if path is not None:
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"config file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a JSON object")
        values = {k: v for k, v in values.items() if not k.startswith("_")}  # "_comment" keys
    overrides = list(overrides or [])
    if len(overrides) % 2:
        raise ValueError(f"overrides come in pairs `--key value`, got {overrides}")
    for flag, text in zip(overrides[::2], overrides[1::2]):
        if not flag.startswith("--"):
            raise ValueError(f"expected `--key`, got {flag!r}")
        values[flag[2:].replace("-", "_")] = _parse_cli_value(text)
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} in {path or 'overrides'}; "
                         f"valid keys: {', '.join(sorted(hints))}")
    checked = {name: _coerce(name, value, hints[name]) for name, value in values.items()}
    for name, allowed in CHOICES.items():
        if name in checked and checked[name] not in allowed:
            raise ValueError(f"config key {name!r} must be one of {allowed}, got {checked[name]!r}")
    cfg = Config(**checked)
    cfg.index_dir = cfg.index_dir or str(Path(cfg.world_dir) / "indexes")
    return cfg


# ----------------------------------------------------------------------------------------------
# Rewards, step by step (REFERENCE.md, "Rewards"). Missing tags give 0.


def answer_reward(prediction: str, golds: list[str]) -> float:
    """Token recall against the golds (the official F1-Recall); all-or-nothing for short answers.

    One gold of at most 5 words, or several golds: 1 when recall is 1, else 0 (the release).
    A single longer gold: the recall itself.
    """
    from eval import score
    if not prediction or not golds:
        return 0.0
    recall = score(prediction, [str(g) for g in golds]).recall
    if len(golds) > 1 or len(str(golds[0]).split()) <= 5:
        return float(recall == 1.0)
    return recall


def plan_reward(step, gold_hop, similarity, cfg) -> float:
    """w_route · [exactly one expert, and it is in the hop's gold-expert set] + w_subq · cos(sub-q, gold sub-q).

    `gold_hop` is the data.Hop this plan should retrieve for, or None when no gold hop is left.
    The release credits the one expert its teacher chose; the gold-expert set here is every expert
    whose top-k for the gold sub-question holds the evidence (data.label_gold_experts, the
    all-expert probe). Routing is credited apart from the sub-question's wording, which the
    similarity term scores; whether the policy's own sub-question found the evidence is the
    `evidence_found` metric. Stopping (None/None) earns 1 when no gold hop is left, 0 when one is.
    """
    if not step.valid:
        return 0.0
    if step.stop:
        return float(gold_hop is None)
    if gold_hop is None:
        return 0.0  # retrieving when the gold plan says stop
    routed = gold_hop.routed_by(step.experts)
    return cfg.w_route * float(routed) + cfg.w_subq * max(0.0, similarity(step.sub_question, gold_hop.sub_question))


class SubQuestionSimilarity:
    """cos(emb(a), emb(b)) with the configured text encoder (the release: BGE-M3).

    Through the encoder's query memory: the experts have just encoded the policy's sub-questions.
    """

    def __init__(self, encoder):
        self.encoder = encoder

    def __call__(self, a: str, b: str) -> float:
        vectors = self.encoder.encode_queries([a, b])
        return float(np.dot(vectors[0], vectors[1]))


def trajectory_rewards(trajectory, gold_hops, similarity, cfg) -> tuple[list[float], float]:
    """The reward of every step of a trajectory, and its outcome (final-answer) reward."""
    rewards = []
    for step in trajectory.steps:
        if step.kind == "plan":
            rewards.append(plan_reward(step, gold_hops[step.hop] if step.hop < len(gold_hops) else None,
                                       similarity, cfg))
        elif step.kind == "answer":
            gold = [gold_hops[step.hop].sub_answer] if step.hop < len(gold_hops) else []
            rewards.append(answer_reward(step.answer, gold) if step.valid else 0.0)
        else:
            rewards.append(answer_reward(trajectory.final_answer, trajectory.golds) if step.valid else 0.0)
    return rewards, rewards[-1]


# ----------------------------------------------------------------------------------------------
# Group-relative advantages. GRPO (Shao et al. 2024, DeepSeekMath, §4.1.2, outcome supervision):
#   A_i = (r_i − mean(r)) / (std(r) + eps), the same for every token of sample i.

ADVANTAGE_EPS = 1e-6  # the release's epsilon


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(r − mean) / (std + 1e-6) within one group; NaN rewards get 0 and are left out of the stats.

    A zero-variance group gives all zeros: no signal, and nothing poisoned. std is the unbiased one
    (torch.std), as in common GRPO implementations; a group with one finite reward gives 0.
    """
    finite = torch.isfinite(rewards)
    advantages = torch.zeros_like(rewards)
    if finite.sum() < 2:
        return advantages
    kept = rewards[finite]
    advantages[finite] = (kept - kept.mean()) / (kept.std() + ADVANTAGE_EPS)
    return advantages


def online_advantages(step_rewards: list[list[float]], slots: list[list[tuple]], outcomes: list[float],
                      w_outcome: float) -> list[list[float]]:
    """Per-step advantages for the G trajectories of one question (our online mode).

        A_{i,s} = norm_slot(r_{i,s}) + w_outcome · norm_G(R_i)

    norm_slot normalises a step's reward among the samples that reached the same slot (step kind and
    round) in this group, so a plan step competes with the other plan steps of its round;
    norm_G(R_i) is GRPO's group-normalised outcome (final-answer reward) of trajectory i, which
    every step of the trajectory shares. Every token of step s of trajectory i gets A_{i,s}.
    """
    outcome = group_advantages(torch.tensor(outcomes, dtype=torch.float64))
    by_slot = defaultdict(list)
    for i, trajectory_slots in enumerate(slots):
        for s, slot in enumerate(trajectory_slots):
            by_slot[slot].append((i, s))
    advantages = [[0.0] * len(r) for r in step_rewards]
    for members in by_slot.values():
        normed = group_advantages(torch.tensor([step_rewards[i][s] for i, s in members], dtype=torch.float64))
        for (i, s), a in zip(members, normed.tolist()):
            advantages[i][s] = a
    return [[a + w_outcome * float(outcome[i]) for a in row] for i, row in enumerate(advantages)]


# ----------------------------------------------------------------------------------------------
# The loss. Per token t of a sampled completion, with ρ_t = exp(log π(y_t) − log π_old(y_t)):
#   policy term  −min(ρ_t A, clip(ρ_t, 1−ε, 1+ε) A)        PPO-clip, Schulman et al. 2017, eq. (7)
#   KL term      β (exp(ref_t − logp_t) − (ref_t − logp_t) − 1)   the k3 estimator of KL(π‖π_ref),
#                Schulman 2020 "Approximating KL Divergence", as in GRPO (Shao et al. 2024, eq. 4)
#   entropy      −c H_t                                      the release's entropy bonus
# aggregated over policy tokens only (the loss mask: 0 on prompts, expert text and padding).


@dataclass
class LossParts:
    loss: torch.Tensor
    policy: float
    kl: float
    entropy: float
    clip_fraction: float


def masked_mean(x: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """'token': mean over every masked token; 'sequence': mean over rows of each row's token mean."""
    mask = mask.to(x.dtype)
    if aggregation == "token":
        return (x * mask).sum() / mask.sum().clamp(min=1)
    per_row = (x * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_row[mask.sum(1) > 0].mean() if (mask.sum(1) > 0).any() else per_row.sum() * 0


def step_grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps: float, beta: float,
                   entropy=None, entropy_coef: float = 0.0, aggregation: str = "token") -> LossParts:
    """The Step-GRPO loss for a batch of completions; `advantages` is (B,) or (B, L)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    ratio = torch.exp(logp - old_logp)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    policy_term = torch.max(pg_loss1, pg_loss2)
    ref_minus_logp = ref_logp - logp
    kl = torch.exp(ref_minus_logp) - ref_minus_logp - 1
    per_token = policy_term + beta * kl
    if entropy is not None and entropy_coef:
        per_token = per_token - entropy_coef * entropy
    loss = masked_mean(per_token, mask, aggregation)
    clipped = ((ratio - 1).abs() > clip_eps).float()
    with torch.no_grad():
        stats = [masked_mean(t.detach(), mask, "token").item() for t in (policy_term, kl, clipped)]
        ent = masked_mean(entropy.detach(), mask, "token").item() if entropy is not None else float("nan")
    return LossParts(loss, stats[0], stats[1], ent, stats[2])


# ----------------------------------------------------------------------------------------------
# Turning recorded steps into gradient: micro-batches of teacher-forced forwards.


@dataclass
class Sample:
    """One scored completion: a recorded step, its image, and the advantage of its tokens."""
    step: object  # rollout.Step
    image: str | None
    advantage: float


def policy_update(policy, optimizer, samples: list[Sample], cfg, clock=None) -> dict:
    """One optimiser step over all samples, accumulating gradients across micro-batches.

    Each micro-batch's loss is weighted by its share of the whole (tokens for 'token'
    aggregation, sequences for 'sequence'), so the sum equals the loss over the whole batch.
    With neither KL (β = 0) nor entropy bonus in the loss, every token of a zero-advantage sample
    has loss max(−0·ρ, −0·clip(ρ)) = 0: it adds nothing to the gradient, only its tokens to the
    denominator. Such samples are counted in the shares but not run through the model, which is
    exact and saves most of an update while a step kind has no reward signal (a zero-variance group).
    `clock` (a rollout.PhaseClock) is charged with each phase's time.
    """
    import more
    import rollout
    clock = clock or rollout.PhaseClock()
    samples = [s for s in samples if s.step.completion_ids]
    if not samples:
        return {}
    weights = [len(s.step.completion_ids) if cfg.aggregation == "token" else 1 for s in samples]
    total, parts = sum(weights), []
    carries_gradient = [i for i, s in enumerate(samples) if s.advantage != 0 or cfg.beta or cfg.entropy_coef]
    policy.model.train()
    optimizer.zero_grad(set_to_none=True)
    for start in range(0, len(carries_gradient), cfg.micro_batch):
        rows = carries_gradient[start:start + cfg.micro_batch]
        chunk = [samples[i] for i in rows]
        with clock("batch building"):
            inputs, mask = rollout.training_batch(policy, [s.step for s in chunk], [s.image for s in chunk])
            mask = mask.to(policy.device)
            old = _scatter_logprobs([s.step.logprobs for s in chunk], mask)
        with clock("reference forward"):
            ref = more.reference_logprobs(policy, inputs, mask, cfg.temperature) if cfg.beta else old
        with clock("policy forward"):
            logp, entropy = more.token_logprobs(policy, inputs, mask, cfg.temperature, with_entropy=True,
                                                entropy_grad=bool(cfg.entropy_coef))
            advantages = torch.tensor([s.advantage for s in chunk], dtype=torch.float32, device=policy.device)
            part = step_grpo_loss(logp, old, ref, advantages, mask, cfg.clip_eps, cfg.beta, entropy,
                                  cfg.entropy_coef, cfg.aggregation)
            share = sum(weights[i] for i in rows) / total
        with clock("backward"):
            (part.loss * share).backward()
        parts.append((share, part))
    with clock("optimizer"):
        if not parts:  # every sample skipped: the gradient is exactly zero, and AdamW still steps
            for p in _trainable(policy):
                p.grad = torch.zeros_like(p)
        grad_norm = torch.nn.utils.clip_grad_norm_(_trainable(policy), cfg.max_grad_norm)
        optimizer.step()
    # loss and pg are exact over the whole batch (a skipped sample adds 0 to both); KL, entropy
    # and clip fraction are means over the samples that were run (NaN when none was).
    weighted = lambda name: sum(share * float(getattr(p, name)) for share, p in parts)
    run_share = sum(share for share, _ in parts) or float("nan")
    return dict(loss=weighted("loss"), pg=weighted("policy"), kl=weighted("kl") / run_share,
                entropy=weighted("entropy") / run_share, clip_fraction=weighted("clip_fraction") / run_share,
                grad_norm=float(grad_norm), samples_run=len(carries_gradient) / len(samples))


def _scatter_logprobs(rows: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    flat = torch.tensor([x for row in rows for x in row], dtype=torch.float32, device=mask.device)
    return out.masked_scatter(mask, flat)


def _trainable(policy) -> list[torch.nn.Parameter]:
    return [p for p in policy.model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------
# Warm start: supervised steps on gold completions, for a policy that cannot yet write the protocol.


def gold_completion(sample) -> str:
    """The text a teacher would write for an official step (data.StepSample).

    Step files hold no thoughts, so the <think> part is a short constant: the warm start then
    spends its updates on what the protocol needs (tags, the sub-question, the expert's name).
    """
    if sample.kind == "plan":
        query, experts = sample.gold["query"], sample.gold["retriever"]
        if str(query).lower() == "none":
            return "<think>Enough.</think><sub-question>None</sub-question><ret>None</ret>"
        name = " ".join(w.capitalize() for w in str(experts[0]).split())
        return f"<think>Next hop.</think><sub-question>{query}</sub-question><ret>{name}</ret>"
    answer = sample.gold if sample.kind == "answer" else sample.gold[0]
    return f"<think>Read.</think><answer>{answer}</answer>"


def step_prompt(sample):
    """(system, user text, image) of an official step; its image, if any, goes first."""
    from rollout import StepPrompt
    text = "".join(p["text"] for p in sample.parts if p["type"] == "text")
    images = [p["image"] for p in sample.parts if p["type"] == "image"]
    return StepPrompt(sample.system, text, images[0] if images else None)


def sft_update(policy, optimizer, samples, cfg) -> float:
    """One supervised step on official steps (data.StepSample) and their gold completions."""
    import more
    tok = policy.tokenizer
    prompts = [step_prompt(sample) for sample in samples]
    encoded = [more.encode_prompt(policy.processor, more.render_prompt(p.system, p.user, p.image is not None), p.image)
               for p in prompts]
    targets = [tok(gold_completion(sample) + "<|im_end|>", add_special_tokens=False)["input_ids"] for sample in samples]
    return supervised_update(policy, optimizer, [e.ids for e in encoded], targets, [p.image for p in prompts], cfg)


def supervised_update(policy, optimizer, prompt_ids, target_ids, images, cfg) -> float:
    """Mean negative log-likelihood of the target tokens after their prompts; one optimiser step."""
    import more
    import rollout
    steps = [rollout.Step("sft", p, t, [], "", True) for p, t in zip(prompt_ids, target_ids)]
    policy.model.train()
    optimizer.zero_grad(set_to_none=True)
    inputs, mask = rollout.training_batch(policy, steps, images)
    logp = more.token_logprobs(policy, inputs, mask)
    loss = -masked_mean(logp, mask.to(logp.device), "token")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(_trainable(policy), cfg.max_grad_norm)
    optimizer.step()
    return loss.item()


# ----------------------------------------------------------------------------------------------
# One GRPO update in each mode.


def online_step(policy, experts, questions, similarity, cfg, rng_seed: int, clock=None):
    """G live trajectories per question → stepwise rewards → advantages (the samples of one update)."""
    import rollout
    clock = clock or rollout.PhaseClock()
    torch.manual_seed(rng_seed)
    policy.model.eval()
    trajectories = rollout.rollout(rollout.policy_sampler(policy, cfg, clock), experts, questions, cfg.group_size,
                                   cfg.max_steps, cfg.retrieve_k, cfg.show_k, image_root=cfg.world_dir, clock=clock)
    samples, rewards_by_kind, zero_std, groups = [], defaultdict(list), 0, 0
    for qi, question in enumerate(questions):
        group = trajectories[qi * cfg.group_size:(qi + 1) * cfg.group_size]
        with clock("rewards"):
            scored = [trajectory_rewards(t, question.hops, similarity, cfg) for t in group]
        step_rewards = [r for r, _ in scored]
        outcomes = [o for _, o in scored]
        slots = [[(s.kind, s.hop) for s in t.steps] for t in group]
        advantages = online_advantages(step_rewards, slots, outcomes, cfg.w_outcome)
        groups += 1
        zero_std += float(np.std(outcomes) == 0)
        for t, rs, adv in zip(group, step_rewards, advantages):
            for step, r, a in zip(t.steps, rs, adv):
                rewards_by_kind[step.kind].append(r)
                samples.append(Sample(step, t.image, a))
    return trajectories, samples, rewards_by_kind, zero_std / max(groups, 1)


def steps_mode_step(policy, step_samples, similarity, cfg, rng_seed: int, clock=None):
    """The release's method: G samples of each teacher-forced step prompt, rewarded against its gold."""
    import rollout
    clock = clock or rollout.PhaseClock()
    torch.manual_seed(rng_seed)
    policy.model.eval()
    G = cfg.group_size
    prompts = [step_prompt(s) for s in step_samples for _ in range(G)]
    samples, rewards_by_kind, zero_std = [], defaultdict(list), 0
    by_kind = defaultdict(list)
    for i, p in enumerate(prompts):
        by_kind[step_samples[i // G].kind].append(i)
    results = [None] * len(prompts)
    sampler = rollout.policy_sampler(policy, cfg, clock)
    for kind, rows in by_kind.items():
        for row, out in zip(rows, sampler([prompts[r] for r in rows], kind)):
            results[row] = out
    for gi, gold in enumerate(step_samples):
        group, image = results[gi * G:(gi + 1) * G], prompts[gi * G].image
        with clock("rewards"):
            rewards = [official_step_reward(gold, completion.text, similarity, cfg) for _, completion in group]
        advantages = group_advantages(torch.tensor(rewards, dtype=torch.float64)).tolist()
        zero_std += float(np.std(rewards) == 0)
        rewards_by_kind[gold.kind] += rewards
        samples += [Sample(rollout.Step(gold.kind, ids, c.ids, c.logprobs, c.text, True), image, a)
                    for (ids, c), a in zip(group, advantages)]
    return samples, rewards_by_kind, zero_std / max(len(step_samples), 1)


def grpo_step(policy, optimizer, experts, similarity, questions, step_samples, cfg, rng, seed: int, clock=None):
    """One GRPO update in the configured mode: draw a batch with `rng`, sample and score, update.

    Returns (trajectories, samples, rewards by step kind, zero-std fraction, update statistics);
    trajectories is empty in steps mode. `train` and bench.py both run this.
    """
    if cfg.mode == "online":
        batch = rng.sample(questions, min(cfg.questions_per_step, len(questions)))
        trajectories, samples, rewards, zero_std = online_step(policy, experts, batch, similarity, cfg, seed, clock)
    else:
        batch = rng.sample(step_samples, min(cfg.questions_per_step, len(step_samples)))
        samples, rewards, zero_std = steps_mode_step(policy, batch, similarity, cfg, seed, clock)
        trajectories = []
    return trajectories, samples, rewards, zero_std, policy_update(policy, optimizer, samples, cfg, clock)


def official_step_reward(gold, text: str, similarity, cfg) -> float:
    """The release's step rewards against a step file's gold: the plan's expert must be one of the
    gold names (a set, when data.py labelled it by asking every expert); the sub-question is scored
    by cosine similarity to the gold one."""
    import more
    from experts import EXPERT_NAMES
    if gold.kind == "plan":
        plan = more.parse_plan(text, list(EXPERT_NAMES.values()))
        if not plan.valid:
            return 0.0
        gold_names = {str(n).lower() for n in gold.gold["retriever"]}
        if plan.stop:
            return float(gold_names == {"none"})
        if gold_names == {"none"}:
            return 0.0
        routed = len(plan.experts) == 1 and plan.experts[0].lower() in gold_names
        return cfg.w_route * float(routed) + cfg.w_subq * max(0.0, similarity(plan.sub_question, str(gold.gold["query"])))
    parsed = more.parse_answer(text)
    golds = [gold.gold] if gold.kind == "answer" else list(gold.gold)
    return answer_reward(parsed.answer, golds) if parsed.valid else 0.0


# ----------------------------------------------------------------------------------------------
# Checkpoints: adapter (safetensors) + optimizer + scheduler + RNG states + step + config, written to
# a temporary folder and renamed into place; `latest` is replaced atomically after the rename.
# A process killed at any moment leaves either the previous checkpoint or the new one, never half.


def save_checkpoint(out_dir: Path, policy, optimizer, scheduler, step: int, cfg) -> Path:
    root = out_dir / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.model.save_pretrained(tmp / "adapter", safe_serialization=True)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}},
               tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    _fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    return final


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = out_dir / "checkpoints" / "latest"
    return out_dir / "checkpoints" / pointer.read_text().strip() if pointer.exists() else None


def load_training_state(checkpoint: Path, optimizer, scheduler, restore_optimizer: bool = True) -> int:
    state = torch.load(checkpoint / "state.pt", weights_only=False)  # our own file: RNG states are numpy objects
    if restore_optimizer:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return state["step"]


# ----------------------------------------------------------------------------------------------
# The loop. Step counter: warm-start updates first (0 … sft_steps−1), then GRPO updates.


def make_optimizer(policy, cfg, phase: str):
    """AdamW (or paged 8-bit AdamW) and its schedule; the warm start runs at a constant sft_lr."""
    params = _trainable(policy)
    lr = cfg.sft_lr if phase == "sft" else cfg.lr
    if cfg.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb
        optimizer = bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if phase == "sft":
            return 1.0
        total = cfg.train_steps
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def step_metrics(rewards_by_kind, samples, trajectories, hops_by_id, zero_std, generation_seconds, policy) -> dict:
    out = {f"reward_{kind}": float(np.mean(r)) for kind, r in rewards_by_kind.items()}
    out.update({f"reward_{kind}_std": float(np.std(r)) for kind, r in rewards_by_kind.items()})
    tokens = sum(len(s.step.completion_ids) for s in samples)
    out.update(zero_std_groups=zero_std, sampled_tokens=tokens, tokens_per_s=tokens / max(generation_seconds, 1e-9),
               mean_completion_len=tokens / max(len(samples), 1), peak_memory_mb=peak_memory_mb(policy.device))
    if trajectories:
        plans = [s for t in trajectories for s in t.steps if s.kind == "plan"]
        usage = Counter(k for s in plans for k in s.experts)
        out.update({f"expert_{k}": usage[k] / max(len(plans), 1) for k in ("text", "image", "table")})
        out["valid_plan_fraction"] = float(np.mean([s.valid for s in plans])) if plans else 0.0
        out.update(routing_stats(trajectories, hops_by_id))
    return out


def routing_stats(trajectories, hops_by_id: dict) -> dict:
    """Over plans that retrieve while a gold hop is left: `routing_accuracy`, the share whose single
    expert is in the hop's gold-expert set (what plan_reward credits; hops no expert can answer are
    left out, as in eval.py), and `evidence_found`, the share whose expert's top-k for the policy's own
    sub-question held the evidence (the live probe)."""
    routed, found = [], []
    for t in trajectories:
        hops = hops_by_id[t.question_id]
        for s in t.steps:
            if s.kind == "plan" and s.valid and not s.stop and s.hop < len(hops):
                if hops[s.hop].gold_experts:
                    routed.append(hops[s.hop].routed_by(s.experts))
                found.append(len(s.experts) == 1 and s.probe.get(s.experts[0], False))
    return {"routing_accuracy": float(np.mean(routed)) if routed else 0.0,
            "evidence_found": float(np.mean(found)) if found else 0.0}


def evaluate(policy, experts, questions, cfg) -> dict:
    """Greedy rollouts on held-out questions: answer recall, routing accuracy, evidence found, valid plans."""
    import rollout
    from eval import score
    greedy = dataclasses.replace(cfg, temperature=0.0)
    policy.model.eval()
    trajectories = rollout.rollout(rollout.policy_sampler(policy, greedy), experts, questions, 1, cfg.max_steps,
                                   cfg.retrieve_k, cfg.show_k, image_root=cfg.world_dir)
    plans = [s for t in trajectories for s in t.steps if s.kind == "plan"]
    routing = routing_stats(trajectories, {q.qid: q.hops for q in questions})
    return {"eval_recall": float(np.mean([score(t.final_answer, t.golds).recall for t in trajectories])),
            **{f"eval_{name}": value for name, value in routing.items()},
            "eval_valid_plans": float(np.mean([s.valid for s in plans])) if plans else 0.0}


def train(cfg: Config, resume: bool = False, stop_after: int | None = None) -> Path:
    """Warm start, then GRPO; `stop_after` ends (with a checkpoint) after that many updates in all."""
    import data
    import more
    import rollout
    from experts import build_experts
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data.ensure_world(cfg)
    checkpoint = latest_checkpoint(out_dir) if resume else None
    if resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out_dir / 'checkpoints'}")
    if not resume and (out_dir / "metrics.jsonl").exists():
        raise FileExistsError(f"{out_dir} already holds a run; use --resume or another out_dir")
    torch.manual_seed(cfg.seed)
    policy = more.load_policy(cfg, adapter_dir=str(checkpoint / "adapter") if checkpoint else None)
    experts = build_experts(cfg)
    similarity = SubQuestionSimilarity(experts[0].text_encoder)
    total = cfg.sft_steps + cfg.train_steps
    step_file = cfg.steps_file or str(Path(cfg.world_dir) / "steps_train.jsonl")
    step_samples = data.load_step_file(step_file)
    questions = data.load_questions(Path(cfg.world_dir) / "questions_train.jsonl")
    held_out = data.load_questions(Path(cfg.world_dir) / "questions_validation.jsonl")[:cfg.eval_questions]
    hops_by_id = {q.qid: q.hops for q in questions}
    start = torch.load(checkpoint / "state.pt", weights_only=False)["step"] + 1 if checkpoint else 0
    phase = "sft" if start < cfg.sft_steps else "grpo"
    optimizer, scheduler = make_optimizer(policy, cfg, phase)
    if checkpoint:  # at the warm-start/GRPO boundary the saved optimiser is the warm start's: not restored
        saved_phase = "sft" if start - 1 < cfg.sft_steps else "grpo"
        load_training_state(checkpoint, optimizer, scheduler, restore_optimizer=saved_phase == phase)
    bar = tqdm(range(start, total), desc="train", initial=start, total=total)
    for step in bar:
        if step == cfg.sft_steps and cfg.sft_steps and step != start:  # warm start over: a fresh optimiser
            optimizer, scheduler = make_optimizer(policy, cfg, "grpo")
        began, rng = time.perf_counter(), random.Random(cfg.seed * 1_000_003 + step)
        if step < cfg.sft_steps:
            loss = sft_update(policy, optimizer, rng.sample(step_samples, min(cfg.sft_batch, len(step_samples))), cfg)
            row, trajectories = {"phase": "sft", "sft_loss": loss}, []
        else:
            clock = rollout.PhaseClock(policy.device)
            trajectories, samples, rewards, zero_std, update = grpo_step(
                policy, optimizer, experts, similarity, questions, step_samples, cfg, rng, cfg.seed + step, clock)
            row = {"phase": "grpo", **update, **step_metrics(rewards, samples, trajectories, hops_by_id, zero_std,
                                                             clock.seconds["generation"], policy),
                   **{f"seconds_{name.replace(' ', '_')}": t for name, t in clock.seconds.items()}}
            if trajectories and cfg.traces_per_step:
                rollout.write_traces(out_dir / "traces.jsonl", trajectories[:cfg.traces_per_step])
        scheduler.step()
        row.update(step=step, lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - began)
        grpo_number = step - cfg.sft_steps + 1
        if cfg.eval_every and step >= cfg.sft_steps and (grpo_number % cfg.eval_every == 0 or step == total - 1):
            row.update(evaluate(policy, experts, held_out, cfg))
        with open(out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        bar.set_postfix({k: f"{row[k]:.3f}" for k in ("sft_loss", "reward_final", "reward_plan", "kl") if k in row})
        stopping = stop_after is not None and step + 1 >= stop_after
        if (step + 1) % cfg.save_every == 0 or step == total - 1 or stopping:
            save_checkpoint(out_dir, policy, optimizer, scheduler, step, cfg)
        if stopping:
            break
    return out_dir


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description="Train MoRE with Step-GRPO.")
    parser.add_argument("--config", required=True, help="a JSON config: tiny.json (CPU) or small.json (GPU)")
    parser.add_argument("--resume", action="store_true", help="continue from out_dir's latest checkpoint")
    parser.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after N updates in all")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ValueError as err:
        sys.exit(f"step_grpo.py: {err}")
    out = train(cfg, resume=args.resume, stop_after=args.stop_after)
    print(f"done: metrics in {out / 'metrics.jsonl'}, checkpoints in {out / 'checkpoints'}")


if __name__ == "__main__":
    main(sys.argv[1:])
