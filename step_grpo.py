"""Step-GRPO: group-relative advantages over stepwise rewards, the clipped loss with KL to the
reference, and a resumable training loop.

  python step_grpo.py --config tiny.json [--key value …] [--resume]

Read top to bottom: advantages → the loss → the update → the warm start → one update in each
mode → the loop → the command. The rewards are in rewards.py, checkpoints in checkpoint.py.
Formulas cite their sources; docs/PROTOCOL.md holds the released protocol.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import more
import protocol
import rollout
import world
from checkpoint import (checkpoint_to_resume, drop_rows_after, read_training_state, restore_training_state,
                        save_checkpoint)
from config import Config, UserError, command_config, run_command
from experts import EXPERT_KINDS, build_experts, write_jsonl
from metric import score
from rewards import SubQuestionSimilarity, official_step_reward, trajectory_rewards
from rollout import phase

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


def credit_slot(step) -> tuple:
    """The group a step's reward is normalised in: a plan or sub-answer step with the steps of its
    kind and round; every final answer of a question in one group, whatever its round."""
    return ("final",) if step.kind == "final" else (step.kind, step.hop)


def online_advantages(trajectories: list, step_rewards: list[list[float]], outcomes: list[float],
                      w_outcome: float) -> list[list[float]]:
    """Per-step advantages for the G trajectories of one question (our online mode).

        A_{i,s} = norm_slot(r_{i,s}) + w_outcome · norm_G(R_i)     for a plan or sub-answer step s
        A_{i,final} = norm_G(R_i)                                    for the final-answer step

    norm_slot normalises a step's reward among the samples of this group in the same slot
    (credit_slot): a plan step competes with the other plan steps of its round. norm_G(R_i) is
    GRPO's group-normalised outcome (final-answer reward) of trajectory i: every trajectory ends in
    one final step, so the final slot is the whole group, and a final answer competes with every
    other final answer, however many rounds led to it. The outcome enters each step once: the
    final step's own reward is the outcome. Every token of step s of trajectory i gets A_{i,s}.
    """
    outcome = group_advantages(torch.tensor(outcomes, dtype=torch.float64)).tolist()
    by_slot = defaultdict(list)
    for i, trajectory in enumerate(trajectories):
        for s, step in enumerate(trajectory.steps):
            by_slot[credit_slot(step)].append((i, s))
    advantages = [[0.0] * len(r) for r in step_rewards]
    for members in by_slot.values():
        normed = group_advantages(torch.tensor([step_rewards[i][s] for i, s in members], dtype=torch.float64))
        for (i, s), a in zip(members, normed.tolist()):
            advantages[i][s] = a
    return [[a + (w_outcome * outcome[i] if step.kind != "final" else 0.0) for a, step in zip(row, t.steps)]
            for i, (row, t) in enumerate(zip(advantages, trajectories))]


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
    """The Step-GRPO loss for a batch of completions; `advantages` is (B,) or (B, L).

    `ref_logp` None: no reference was computed (β = 0 and the KL not asked for); the KL term is
    then absent from the loss and reported as NaN, never measured against another policy.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    ratio = torch.exp(logp - old_logp)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    policy_term = torch.max(pg_loss1, pg_loss2)
    if ref_logp is None:
        kl = torch.full_like(logp, float("nan"))
        per_token = policy_term
    else:
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


def policy_update(policy, optimizer, samples: list[Sample], cfg) -> dict:
    """One optimiser step over all samples, accumulating gradients across micro-batches.

    Each micro-batch's loss is weighted by its share of the whole (tokens for 'token'
    aggregation, sequences for 'sequence'), so the sum equals the loss over the whole batch.
    With neither KL (β = 0) nor entropy bonus in the loss, every token of a zero-advantage sample
    has loss max(−0·ρ, −0·clip(ρ)) = 0: it adds nothing to the gradient, only its tokens to the
    denominator. Such samples are counted in the shares but not run through the model, which is
    exact and saves most of an update while a step kind has no reward signal (a zero-variance group).
    Micro-batches are cut from the samples sorted by prompt length, then prompt, then completion
    length: the sum is the same in any order, rows of like length waste little on padding (plan
    rows are about half as long as answer rows), and a group's copies of one prompt fall into one
    micro-batch, where the forward runs that prompt once (more.token_logprobs).
    """
    samples = [s for s in samples if s.step.completion_ids]
    if not samples:
        return {}
    weights = [len(s.step.completion_ids) if cfg.aggregation == "token" else 1 for s in samples]
    carries_gradient = sorted((i for i, s in enumerate(samples) if s.advantage != 0 or cfg.beta or cfg.entropy_coef),
                              key=lambda i: (len(samples[i].step.prompt_ids), samples[i].step.prompt_ids,
                                             len(samples[i].step.completion_ids)))
    policy.model.train()
    optimizer.zero_grad(set_to_none=True)
    parts = []
    for start in range(0, len(carries_gradient), cfg.micro_batch):
        rows = carries_gradient[start:start + cfg.micro_batch]
        share = sum(weights[i] for i in rows) / sum(weights)
        part = micro_batch_loss(policy, [samples[i] for i in rows], cfg)
        with phase("backward"):
            (part.loss * share).backward()
        parts.append((share, part))
    with phase("optimizer"):
        if not parts:  # every sample skipped: the gradient is exactly zero, and AdamW still steps
            for p in _trainable(policy):
                p.grad = torch.zeros_like(p)
        grad_norm = torch.nn.utils.clip_grad_norm_(_trainable(policy), cfg.max_grad_norm)
        optimizer.step()
    return dict(update_statistics(parts), grad_norm=float(grad_norm), samples_run=len(carries_gradient) / len(samples))


def micro_batch_loss(policy, chunk: list[Sample], cfg) -> LossParts:
    """The Step-GRPO loss of one micro-batch: teacher-forced log-probs of the recorded steps."""
    with phase("batch building"):
        inputs, mask = rollout.training_batch(policy, [s.step for s in chunk], [s.image for s in chunk])
        mask = mask.to(policy.device)
        old = _scatter_logprobs([s.step.logprobs for s in chunk], mask)
    with phase("reference forward"):
        ref = more.reference_logprobs(policy, inputs, mask, cfg.temperature) if cfg.beta or cfg.log_kl else None
    with phase("policy forward"):
        logp, entropy = more.token_logprobs(policy, inputs, mask, cfg.temperature, with_entropy=True,
                                            entropy_grad=bool(cfg.entropy_coef))
        advantages = torch.tensor([s.advantage for s in chunk], dtype=torch.float32, device=policy.device)
        return step_grpo_loss(logp, old, ref, advantages, mask, cfg.clip_eps, cfg.beta, entropy,
                              cfg.entropy_coef, cfg.aggregation)


def update_statistics(parts: list[tuple[float, LossParts]]) -> dict:
    """loss and pg are exact over the whole batch (a skipped sample adds 0 to both); KL, entropy and
    clip fraction are means over the samples that were run (NaN when none was)."""
    value = lambda x: float(x.detach()) if torch.is_tensor(x) else float(x)
    weighted = lambda name: sum(share * value(getattr(p, name)) for share, p in parts)
    run_share = sum(share for share, _ in parts) or float("nan")
    return dict(loss=weighted("loss"), pg=weighted("policy"), kl=weighted("kl") / run_share,
                entropy=weighted("entropy") / run_share, clip_fraction=weighted("clip_fraction") / run_share)


def _scatter_logprobs(rows: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    flat = torch.tensor([x for row in rows for x in row], dtype=torch.float32, device=mask.device)
    return out.masked_scatter(mask, flat)


def _trainable(policy) -> list[torch.nn.Parameter]:
    return [p for p in policy.model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------
# Warm start: supervised steps on gold completions, for a policy that cannot yet write the protocol.


def sft_update(policy, optimizer, samples, cfg) -> float:
    """One supervised step on official steps (data.StepSample) and their gold completions."""
    tok = policy.tokenizer
    prompts = [data.step_prompt(sample, tok, cfg)[0] for sample in samples]
    encoded = [more.encode_prompt(policy.processor, protocol.render_prompt(p.system, p.user, p.image is not None), p.image)
               for p in prompts]
    targets = [tok(data.gold_completion(sample) + "<|im_end|>", add_special_tokens=False)["input_ids"] for sample in samples]
    return supervised_update(policy, optimizer, [e.ids for e in encoded], targets, [p.image for p in prompts], cfg)


def supervised_update(policy, optimizer, prompt_ids, target_ids, images, cfg) -> float:
    """Mean negative log-likelihood of the target tokens after their prompts; one optimiser step.

    Sequences are sorted by length into micro-batches of cfg.micro_batch, so that little of a
    forward is padding; each micro-batch's loss is weighted by its share of the target tokens, so
    the gradient is that of the whole batch's token mean.
    """
    steps = [rollout.Step("sft", p, t, [], "", True) for p, t in zip(prompt_ids, target_ids)]
    order = sorted(range(len(steps)), key=lambda i: len(steps[i].prompt_ids) + len(steps[i].completion_ids))
    total = sum(len(t) for t in target_ids)
    policy.model.train()
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for start in range(0, len(order), cfg.micro_batch):
        rows = order[start:start + cfg.micro_batch]
        inputs, mask = rollout.training_batch(policy, [steps[i] for i in rows], [images[i] for i in rows])
        logp = more.token_logprobs(policy, inputs, mask)
        loss = -(logp * mask.to(logp.device)).sum() / total
        loss.backward()
        loss_sum += loss.item()
    torch.nn.utils.clip_grad_norm_(_trainable(policy), cfg.max_grad_norm)
    optimizer.step()
    return loss_sum


# ----------------------------------------------------------------------------------------------
# One GRPO update in each mode.


def online_step(policy, experts, questions, similarity, cfg, rng_seed: int):
    """G live trajectories per question → stepwise rewards → advantages (the samples of one update)."""
    torch.manual_seed(rng_seed)
    policy.model.eval()
    trajectories = rollout.rollout(rollout.policy_sampler(policy, cfg), experts, questions, cfg, cfg.group_size,
                                   image_root=cfg.world_dir)
    samples, rewards_by_kind, zero_std, groups = [], defaultdict(list), 0, 0
    for qi, question in enumerate(questions):
        group = trajectories[qi * cfg.group_size:(qi + 1) * cfg.group_size]
        with phase("rewards"):
            scored = [trajectory_rewards(t, question.hops, similarity, cfg) for t in group]
        step_rewards = [r for r, _ in scored]
        outcomes = [o for _, o in scored]
        advantages = online_advantages(group, step_rewards, outcomes, cfg.w_outcome)
        groups += 1
        zero_std += float(np.std(outcomes) == 0)
        for t, rs, adv in zip(group, step_rewards, advantages):
            for step, r, a in zip(t.steps, rs, adv):
                rewards_by_kind[step.kind].append(r)
                samples.append(Sample(step, t.image, a))
    return trajectories, samples, rewards_by_kind, zero_std / max(groups, 1)


def steps_mode_step(policy, step_samples, similarity, cfg, rng_seed: int):
    """The release's method: G samples of each teacher-forced step prompt, rewarded against its gold."""
    torch.manual_seed(rng_seed)
    policy.model.eval()
    G = cfg.group_size
    capped = [data.step_prompt(s, policy.tokenizer, cfg) for s in step_samples]
    prompts = [prompt for prompt, _ in capped for _ in range(G)]
    samples, rewards_by_kind, zero_std = [], defaultdict(list), 0
    by_kind = defaultdict(list)
    for i, p in enumerate(prompts):
        by_kind[step_samples[i // G].kind].append(i)
    results = [None] * len(prompts)
    sampler = rollout.policy_sampler(policy, cfg)
    for kind, rows in by_kind.items():
        for row, out in zip(rows, sampler([prompts[r] for r in rows], kind)):
            results[row] = out
    for gi, gold in enumerate(step_samples):
        group, image = results[gi * G:(gi + 1) * G], prompts[gi * G].image
        with phase("rewards"):
            rewards = [official_step_reward(gold, completion.text, similarity, cfg) for _, completion in group]
        advantages = group_advantages(torch.tensor(rewards, dtype=torch.float64)).tolist()
        zero_std += float(np.std(rewards) == 0)
        rewards_by_kind[gold.kind] += rewards
        samples += [Sample(rollout.Step(gold.kind, ids, c.ids, c.logprobs, c.text, True), image, a)
                    for (ids, c), a in zip(group, advantages)]
    return samples, rewards_by_kind, zero_std / max(len(step_samples), 1), sum(cut for _, cut in capped)


def grpo_step(policy, optimizer, experts, similarity, questions, step_samples, cfg, rng, seed: int):
    """One GRPO update in the configured mode: draw a batch with `rng`, sample and score, update.

    Returns (trajectories, samples, rewards by step kind, zero-std fraction, update statistics);
    trajectories is empty in steps mode. `train` and bench.py both run this.
    """
    if cfg.mode == "online":
        batch = rng.sample(questions, min(cfg.questions_per_step, len(questions)))
        trajectories, samples, rewards, zero_std = online_step(policy, experts, batch, similarity, cfg, seed)
    else:
        batch = rng.sample(step_samples, min(cfg.questions_per_step, len(step_samples)))
        samples, rewards, zero_std, cut = steps_mode_step(policy, batch, similarity, cfg, seed)
        return [], samples, rewards, zero_std, {**policy_update(policy, optimizer, samples, cfg),
                                                "passages_cut": cut}
    return trajectories, samples, rewards, zero_std, policy_update(policy, optimizer, samples, cfg)


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
        return warmup_cosine(step, cfg.train_steps, cfg.warmup_steps, cosine=cfg.lr_schedule == "cosine")
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_cosine(step: int, total: int, warmup: int, cosine: bool = True) -> float:
    """The learning-rate factor at `step`: linear warm-up over `warmup` steps, then a half cosine
    that reaches 0 at `total` (or constant 1 when not `cosine`)."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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
        out.update(routing_stats(trajectories, hops_by_id))
    else:  # steps mode: the sampled plan completions, read as the rollout reads them
        plans = [rollout.plan_step(s.step.text, EXPERT_KINDS) for s in samples if s.step.kind == "plan"]
    usage = Counter(k for s in plans for k in s.experts)
    out.update({f"expert_{k}": usage[k] / max(len(plans), 1) for k in ("text", "image", "table")})
    calls = np.array([n for n in usage.values() if n], dtype=float) / max(sum(usage.values()), 1)
    out["expert_entropy"] = float(-(calls * np.log(calls)).sum())  # nats; collapse onto one expert: 0
    out["valid_plan_fraction"] = float(np.mean([s.valid for s in plans])) if plans else 0.0
    return out


def routing_stats(trajectories, hops_by_id: dict) -> dict:
    """Over plans that retrieve while a gold hop is left: `routing_accuracy`, the share whose single
    expert is in the hop's gold-expert set (what plan_reward credits; hops no expert can answer are
    left out, as in eval.py), and `evidence_found`, the share whose expert's top-k for the policy's own
    sub-question held the evidence (the live probe)."""
    routed, found, by_round = [], [], defaultdict(list)
    for t in trajectories:
        hops = hops_by_id[t.question_id]
        judged = [s for s in rollout.retrieving_plans(t, hops) if hops[s.hop].gold_experts]
        for step, right in zip(judged, rollout.routed_right(t, hops)):
            routed.append(right)
            by_round[step.hop].append(right)
        found += [len(s.experts) == 1 and s.probe.get(s.experts[0], False) for s in rollout.retrieving_plans(t, hops)]
    return {"routing_accuracy": float(np.mean(routed)) if routed else 0.0,
            "evidence_found": float(np.mean(found)) if found else 0.0,
            **{f"routing_accuracy_round{r + 1}": float(np.mean(v)) for r, v in sorted(by_round.items())}}


def evaluate(policy, experts, questions, cfg) -> dict:
    """Greedy rollouts on held-out questions: answer recall, routing accuracy, evidence found, valid plans."""
    greedy = dataclasses.replace(cfg, temperature=0.0)
    policy.model.eval()
    trajectories = rollout.rollout(rollout.policy_sampler(policy, greedy), experts, questions, cfg,
                                   image_root=cfg.world_dir)
    plans = [s for t in trajectories for s in t.steps if s.kind == "plan"]
    routing = routing_stats(trajectories, {q.qid: q.hops for q in questions})
    return {"eval_recall": float(np.mean([score(t.final_answer, t.golds).recall for t in trajectories])),
            **{f"eval_{name}": value for name, value in routing.items()},
            "eval_valid_plans": float(np.mean([s.valid for s in plans])) if plans else 0.0}


@dataclass
class Run:
    """What one training run works with, loaded once."""
    cfg: Config
    out_dir: Path
    policy: more.Policy
    experts: list
    similarity: SubQuestionSimilarity
    step_samples: list  # data.StepSample: the warm start's and steps mode's prompts
    questions: list  # data.Question: online mode's training questions
    held_out: list  # data.Question: the periodic evaluation's validation questions
    hops_by_id: dict  # question id -> its gold hops, for the routing metrics


def prepare_run(cfg: Config, resume: bool) -> tuple[Path | None, int]:
    """Check the run folder before anything is written: (checkpoint to resume from, first step).

    A missing steps_file stops it first. A new run refuses a folder that holds one; a resumed run
    drops the metric and trace rows written after its checkpoint (a killed run wrote some), or
    starts over when it has none.
    """
    out_dir = Path(cfg.out_dir)
    require_steps_file(cfg)
    holds_run = (out_dir / "metrics.jsonl").exists() or (out_dir / "checkpoints").exists()
    if holds_run and not resume:
        raise UserError(f"{out_dir} already holds a run: add --resume to continue it, or choose another out_dir")
    if resume and not holds_run:
        raise UserError(f"--resume: {out_dir} holds no run to resume")
    checkpoint = checkpoint_to_resume(cfg, out_dir) if resume else None
    start = read_training_state(checkpoint, tensors=False)[1]["step"] + 1 if checkpoint else 0
    for name in ("metrics.jsonl", "traces.jsonl"):
        dropped = drop_rows_after(out_dir / name, start - 1)
        if dropped:
            print(f"--resume: dropped {dropped} rows of {name} written after the checkpoint")
    return checkpoint, start


def require_steps_file(cfg: Config) -> None:
    if cfg.steps_file and not Path(cfg.steps_file).is_file():
        raise UserError(f"steps_file {cfg.steps_file} not found: place the authors' step file there (docs/PROTOCOL.md), "
                        f"or train offline on the mini world: python step_grpo.py --config tiny.json")


def load_step_samples(cfg: Config) -> list:
    """The step file's steps (the warm start's and steps mode's prompts), images checked first."""
    path = cfg.steps_file or str(Path(cfg.world_dir) / "steps_train.jsonl")
    return data.step_images_present(data.load_step_file(path, cfg.image_root or None), path, cfg.skip_missing_images)


def load_run(cfg: Config, checkpoint: Path | None) -> Run:
    """The world (built on first use), the policy (from the checkpoint's adapter), experts and data."""
    world.ensure_world(cfg)
    step_samples = load_step_samples(cfg)  # before anything is written: a missing image stops here
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    policy = more.load_policy(cfg, adapter_dir=str(checkpoint / "adapter") if checkpoint else None)
    experts = build_experts(cfg)
    folder = Path(cfg.world_dir)
    questions = data.load_questions(folder / "questions_train.jsonl")
    return Run(cfg, out_dir, policy, experts, SubQuestionSimilarity(experts[0].text_encoder), step_samples,
               questions, data.load_questions(folder / "questions_validation.jsonl")[:cfg.eval_questions],
               {q.qid: q.hops for q in questions})


def update_row(run: Run, optimizer, step: int) -> dict:
    """One update (warm start or GRPO) at `step`, and its metrics row."""
    cfg, rng = run.cfg, random.Random(run.cfg.seed * 1_000_003 + step)
    if step < cfg.sft_steps:
        batch = rng.sample(run.step_samples, min(cfg.sft_batch, len(run.step_samples)))
        return {"phase": "sft", "sft_loss": sft_update(run.policy, optimizer, batch, cfg)}
    with rollout.timed(run.policy.device) as clock:
        trajectories, samples, rewards, zero_std, update = grpo_step(
            run.policy, optimizer, run.experts, run.similarity, run.questions, run.step_samples, cfg, rng,
            cfg.seed + step)
    if trajectories and cfg.traces_per_step:
        rollout.write_traces(run.out_dir / "traces.jsonl", trajectories[:cfg.traces_per_step], step)
    return {"phase": "grpo", **update,
            **step_metrics(rewards, samples, trajectories, run.hops_by_id, zero_std, clock.seconds["generation"],
                           run.policy),
            **{f"seconds_{name.replace(' ', '_')}": t for name, t in clock.seconds.items()}}


def train(cfg: Config, resume: bool = False, stop_after: int | None = None) -> Path:
    """Warm start, then GRPO; `stop_after` ends (with a checkpoint) after that many updates in all."""
    checkpoint, start = prepare_run(cfg, resume)
    run = load_run(cfg, checkpoint)
    total = cfg.sft_steps + cfg.train_steps
    phase = "sft" if start < cfg.sft_steps else "grpo"
    optimizer, scheduler = make_optimizer(run.policy, cfg, phase)
    if checkpoint:  # at the warm-start/GRPO boundary the saved optimiser is the warm start's: not restored
        saved_phase = "sft" if start - 1 < cfg.sft_steps else "grpo"
        restore_training_state(checkpoint, optimizer, scheduler, restore_optimizer=saved_phase == phase)
    bar = tqdm(range(start, total), desc="train", initial=start, total=total)
    for step in bar:
        if step == cfg.sft_steps and cfg.sft_steps and step != start:  # warm start over: a fresh optimiser
            optimizer, scheduler = make_optimizer(run.policy, cfg, "grpo")
        t0 = time.perf_counter()
        row = update_row(run, optimizer, step)
        scheduler.step()
        row.update(step=step, lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - t0)
        grpo_number = step - cfg.sft_steps + 1
        if cfg.eval_every and step >= cfg.sft_steps and (grpo_number % cfg.eval_every == 0 or step == total - 1):
            row.update(evaluate(run.policy, run.experts, run.held_out, cfg))
        write_jsonl(run.out_dir / "metrics.jsonl", [row], append=True)
        bar.set_postfix({k: f"{row[k]:.3f}" for k in ("sft_loss", "reward_final", "reward_plan", "kl") if k in row})
        stopping = stop_after is not None and step + 1 >= stop_after
        if (step + 1) % cfg.save_every == 0 or step == total - 1 or stopping:
            save_checkpoint(run.out_dir, run.policy, optimizer, scheduler, step, cfg)
        if stopping:
            break
    return run.out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train MoRE with Step-GRPO. Every config key below can be "
                                     "given on the command line (`--key value` or `--key=value`).",
                                     usage="%(prog)s --config FILE [--resume] [--stop-after N] [--KEY VALUE ...]",
                                     allow_abbrev=False)
    parser.add_argument("--config", required=True, help="a JSON config: tiny.json (CPU) or small.json (GPU)")
    parser.add_argument("--resume", action="store_true", help="continue from out_dir's latest checkpoint")
    parser.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after N updates in all")
    args, load = command_config(parser, argv)
    out = run_command("step_grpo.py", lambda: train(load(), resume=args.resume, stop_after=args.stop_after))
    print(f"done: metrics in {out / 'metrics.jsonl'}, checkpoints in {out / 'checkpoints'}")


if __name__ == "__main__":
    main(sys.argv[1:])
