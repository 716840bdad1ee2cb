"""The learning test: Step-GRPO teaches a tiny policy to route, from chance to ≥90%.

The task is the plan step's decision, made small: "Origin question: <town>, <cue>?" where the cue
says where the evidence lives (biographies in passages, what a picture shows in the image index,
populations in tables, as in the mini world). The policy writes a MoRE plan,
`<think>…</think><sub-question>the <cue></sub-question><ret>Expert</ret>`, and earns the real plan
reward (rewards.plan_reward: format gate, routing credit for exactly one expert from the hop's
gold-expert set, sub-question similarity). Real sampler (more.sample), real loss and optimiser
(step_grpo.policy_update, make_optimizer), 4-bit QLoRA tiny model, 2 CPU cores.

Why a warm start, and why two sets of cues (measured by hand with `python tests/test_learning.py --seed N`):
- A random tiny model does not read the sub-question when it writes the expert: after a warm start
  with random expert labels, P(expert | cue) is the same for every cue, and GRPO moves all cues
  together (in pure-RL probes every run collapsed onto one expert).
- So the warm start teaches the protocol, copying the cue, and routing BY READING on TAUGHT_CUES
  (two single-token cues per expert, true labels), in rounds of 100 updates until it routes them.
  The cues RL must learn (CUES) appear in it with random expert labels only: after it they are
  routed at chance.
- GRPO at lr 2e-4. At 1e-3 the fresh AdamW's first, sign-like step broke the format in one update
  for one seed (sampled reward 0.55 → 0.00: "<ret>" became "<sub-question>").
- Designs that did not reach 90% (0.70 at best): multi-token taught cues (" residents" is 7 tokens)
  and a long system prompt listing the experts; one cue's groups then stayed all wrong.

Seen (seeds 0-5, 2 CPU cores): 100-300 warm-start updates; CUES sampled accuracy 0.14-0.43 after
them (chance 1/3); greedy accuracy 1.00 after 10-50 GRPO updates; 40-84 s per seed. With the
advantages' sign flipped, or the loss mask moved 3 tokens early, seed 0 ends at 0.00 after 80 updates.
"""
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import more  # noqa: E402
import protocol
import rewards
import rollout  # noqa: E402
import step_grpo as sg  # noqa: E402
from config import Config, load_config  # noqa: E402

NAMES = ["Text Retriever", "Text Image Retriever", "Table Retriever"]
KINDS = ["text", "image", "table"]
# The cue decides the expert. Every cue is one token of the tiny tokenizer (with its leading space),
# so the decision rests on reading one token, not on a spelling.
CUES = {"born": 0, "image": 1, "population": 2}
TAUGHT_CUES = {"founded": 0, "person": 0, "picture": 1, "painting": 1, "area": 2, "height": 2}
TOWNS = "Arlen Bexley Corvo Dunmere Elsby Fenwick Galt Holm Istra Jorvik Kell Lumen".split()
# Short on purpose: the cue is then a larger share of what the decision position attends to.
SYSTEM = "Choose the retriever."
CHECK_EVERY = 10  # GRPO updates between greedy accuracy checks


def task(rng: random.Random, cues: dict, cue: str | None = None) -> tuple[str, int]:
    """A question and the index of its gold expert."""
    cue = cue or rng.choice(sorted(cues))
    return f"Origin question: {rng.choice(TOWNS)}, {cue}?", cues[cue]


def cue_of(question: str) -> str:
    return question.split()[-1].rstrip("?")


def completion(question: str, expert: int) -> str:
    """As in MoRE, the sub-question comes before the expert; here it is the question's cue."""
    return f"<think>t</think><sub-question>the {cue_of(question)}</sub-question><ret>{NAMES[expert]}</ret>"


def encode(policy, question: str):
    return more.encode_prompt(policy.processor, protocol.render_prompt(SYSTEM, question, False))


def routed_correctly(text: str, gold: int) -> bool:
    plan = protocol.parse_plan(text, NAMES)  # strict: a valid plan with exactly one expert, the right one
    return plan.valid and plan.experts == [NAMES[gold]]


def step_reward(text: str, question: str, gold: int, similarity, cfg) -> float:
    """The real plan reward; the gold hop's sub-question is the cue, its gold-expert set the gold expert."""
    step = rollout.plan_step(text, dict(zip(NAMES, KINDS)))
    hop = data.Hop("the " + cue_of(question), "", [], gold_experts=[KINDS[gold]])
    return rewards.plan_reward(step, hop, similarity, cfg)


def warm_start(policy, optimizer, cfg, updates: int, rng: random.Random):
    """Supervised: TAUGHT_CUES with their true experts, CUES with RANDOM experts (16 per update)."""
    tok = policy.tokenizer
    for _ in range(updates):
        batch = [task(rng, TAUGHT_CUES) if rng.random() < 0.5 else (task(rng, CUES)[0], rng.randrange(3))
                 for _ in range(16)]
        targets = [tok(completion(q, expert) + "<|im_end|>", add_special_tokens=False)["input_ids"]
                   for q, expert in batch]
        sg.supervised_update(policy, optimizer, [encode(policy, q).ids for q, _ in batch], targets,
                             [None] * len(batch), cfg)


def routing_accuracy(policy, cfg, cues: dict, greedy: bool, n: int = 60, seed: int = 123) -> float:
    """Share of n held-out questions routed correctly, decoding greedily or sampling at cfg.temperature."""
    rng = random.Random(seed)
    items = [task(rng, cues) for _ in range(n)]
    completions = more.sample(policy, [encode(policy, q) for q, _ in items], "plan", 40,
                              0.0 if greedy else cfg.temperature)
    return sum(routed_correctly(c.text, gold) for c, (_, gold) in zip(completions, items)) / n


def grpo_update(policy, optimizer, similarity, cfg, step: int, rng: random.Random) -> float:
    """One Step-GRPO update on a group of G samples per question; returns the mean sampled reward.

    The questions cycle through the cues, so every cue has groups in every update.
    """
    cues = sorted(CUES)
    items = [task(rng, CUES, cues[(step * cfg.questions_per_step + i) % len(cues)])
             for i in range(cfg.questions_per_step)]
    prompts = [encode(policy, q) for q, _ in items for _ in range(cfg.group_size)]
    policy.model.eval()
    completions = more.sample(policy, prompts, "plan", 40, cfg.temperature)
    samples, rewards = [], []
    for g, (question, gold) in enumerate(items):
        group = slice(g * cfg.group_size, (g + 1) * cfg.group_size)
        r = torch.tensor([step_reward(c.text, question, gold, similarity, cfg) for c in completions[group]],
                         dtype=torch.float64)
        for prompt, c, advantage in zip(prompts[group], completions[group], sg.group_advantages(r).tolist()):
            samples.append(sg.Sample(rollout.Step("plan", prompt.ids, c.ids, c.logprobs, c.text, True), None, advantage))
        rewards += r.tolist()
    sg.policy_update(policy, optimizer, samples, cfg)
    return sum(rewards) / len(rewards)


@dataclass
class Learning:
    warm_updates: int      # supervised warm-start updates run
    taught: float          # greedy accuracy on TAUGHT_CUES after the warm start (it reads the cue)
    chance: float          # sampled accuracy on CUES after the warm start (the policy's own odds)
    greedy_before: float   # greedy accuracy on CUES after the warm start
    greedy_after: float    # greedy accuracy on CUES when GRPO stopped
    updates: int           # GRPO updates run
    rewards: list          # mean sampled reward per update


def learn(model_cache: str, max_warm_updates: int = 600, max_updates: int = 80, target: float = 0.9,
          seed: int = 0, log=None, **overrides) -> Learning:
    """Warm start until the taught cues are routed (checked every 100 updates), then GRPO until greedy
    accuracy on CUES reaches `target` (checked every 10 updates)."""
    settings = dict(group_size=8, questions_per_step=8, lr=2e-4, sft_lr=3e-3, beta=0.0,
                    micro_batch=64)
    cfg = Config(model_name="tiny", model_cache=model_cache, device="cpu", train_lm_head=True, seed=seed,
                    **{**settings, **overrides})
    rng = random.Random(seed)
    policy = more.load_policy(cfg)
    torch.manual_seed(seed)
    optimizer, _ = sg.make_optimizer(policy, cfg, "sft")
    for warm_updates in range(100, max_warm_updates + 1, 100):
        warm_start(policy, optimizer, cfg, 100, rng)
        taught = routing_accuracy(policy, cfg, TAUGHT_CUES, greedy=True)
        if taught >= target:
            break
    chance = routing_accuracy(policy, cfg, CUES, greedy=False, n=90)
    greedy = before = routing_accuracy(policy, cfg, CUES, greedy=True)
    if log:
        log(f"after {warm_updates} warm-start updates: taught cues {taught:.2f} greedy; CUES {chance:.2f} sampled, {before:.2f} greedy")
    from experts import TextEncoder
    similarity = rewards.SubQuestionSimilarity(TextEncoder(cfg.text_encoder))
    optimizer, scheduler = sg.make_optimizer(policy, cfg, "grpo")
    sampled = []
    for step in range(max_updates):
        sampled.append(grpo_update(policy, optimizer, similarity, cfg, step, rng))
        scheduler.step()
        if (step + 1) % CHECK_EVERY == 0:
            greedy = routing_accuracy(policy, cfg, CUES, greedy=True)
            if log:
                log(f"update {step + 1}: sampled reward {sampled[-1]:.2f}, greedy accuracy {greedy:.2f}")
            if greedy >= target:
                break
    return Learning(warm_updates, taught, chance, before, greedy, len(sampled), sampled)


def test_step_grpo_learns_to_route_from_chance(model_cache):
    """From chance to ≥90% greedy routing accuracy in at most 80 updates (~1.5 min on 2 cores).

    It fails if the loss sign is flipped or the masks point at the wrong tokens: then the policy
    moves away from, or blindly past, the rewarded expert.
    """
    result = learn(model_cache)
    assert result.taught >= 0.9, f"the warm start did not teach reading the cue: {result}"
    assert result.chance <= 0.5, f"the policy did not start near chance (1/3): {result}"
    assert result.greedy_after >= 0.9, f"GRPO did not learn to route: {result}"


if __name__ == "__main__":
    import argparse
    import time
    parser = argparse.ArgumentParser(description="Run the learning test by hand, printing its progress.")
    parser.add_argument("--warm", type=int, default=600)
    parser.add_argument("--updates", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="runs/models")
    args, overrides = parser.parse_known_args()  # any Config field: --lr 1e-3 --group_size 16
    checked = load_config(None, overrides)
    changed = {name: getattr(checked, name) for name in (flag[2:].replace("-", "_") for flag in overrides[::2])}
    start = time.time()
    result = learn(args.cache, args.warm, args.updates, seed=args.seed, log=print, **changed)
    print(f"{result} in {time.time() - start:.0f} s")
