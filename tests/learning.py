"""A small routing task for the (not yet passing) learning test: choose the expert that holds the evidence.

Not collected by pytest: no setting found so far reaches the ≥90% the test must assert, so it is a
harness to run by hand (tiny model, 2 CPU cores; warm start ~0.15 s and GRPO ~1.1 s per update):
  python tests/learning.py --sft 300 --steps 150 [--lr 1e-3 --entropy 0 --group 8 --prompts 8]

What stands in the way (measured by teacher-forcing the three plans and comparing P(expert | cue)):
- A random tiny model does not read the sub-question when it writes the expert. After a warm start
  with random expert labels, P(expert | cue) is the same to two decimals for all three cues, and
  GRPO moves all three together (toward whichever expert is right for one of them).
- Even copying the cue into the sub-question is a phase transition: greedy copy accuracy stays at
  chance (0.33-0.38) for 200 warm-start updates, then 0.65 at 250 and 1.00 at 300.
- Hence the current warm start: 300 updates, half on TAUGHT_CUES with their true routing (so the
  policy learns to route by the sub-question), half on CUES with random labels.

Seen so far (one seed each, greedy accuracy on 60 held-out prompts, chance = 0.27-0.33):
- taught cues + 300 warm-start updates, plan_reward, lr 1e-3, G=8 x 8 prompts: 0.52 after the warm
  start, 0.70 from GRPO step 40 to 130 (sampled reward up to 1.00 on a batch), 0.35 at step 140,
  0.70 at the end (341 s). One cue stays wrong: its groups are all wrong, so they carry no signal.
- cue-last prompts, random-label warm start of 300, lr 1e-3: P(expert | cue) identical across cues
  for 30 updates; lr 2e-4 and 5e-5 for 10 updates: no change.
- earlier prompt form (cue first), strict 0/1 reward: founder/pictured/population, lr 1e-3: 0.27 →
  0.80 by step 40, then 0.68-0.80; born/image/population: unstable, a format collapse to 0. With the
  strict reward a wrong expert and a broken format both earn 0, so GRPO may as well break the format.
"""
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import more  # noqa: E402
import rollout  # noqa: E402
import step_grpo as sg  # noqa: E402

EXPERTS = [("Text Retriever", "passages"), ("Text Image Retriever", "pictures"), ("Table Retriever", "tables")]
NAMES = [n for n, _ in EXPERTS]
# Where the evidence lives decides the right expert, as in the mini world: biographies in passages,
# what an image shows in the image index, populations in tables. Each cue is one token of the tiny
# tokenizer (with its leading space), so the decision rests on one token, not on a spelling.
CUES = {"born": 0, "image": 1, "population": 2}
# A random tiny model does not look at the sub-question when it writes the expert; a pretrained one
# does. The warm start builds that reading on other cues, whose routing it shows; the routing of
# CUES it never shows (random labels), so only RL can learn it, starting from chance.
TAUGHT_CUES = {"founder": 0, "picture": 1, "residents": 2}
TOWNS = "Arlen Bexley Corvo Dunmere Elsby Fenwick Galt Holm Istra Jorvik Kell Lumen".split()
SYSTEM = "Choose the retriever that holds the evidence: " + ", ".join(NAMES) + "."


def task(rng: random.Random, cues=CUES):
    cue = rng.choice(sorted(cues))
    return f"Origin question: {rng.choice(TOWNS)}, {cue}?", cues[cue]


def cue_of(user: str) -> str:
    return user.split()[-1].rstrip("?")


def completion(user: str, expert: int) -> str:
    """As in MoRE, the sub-question comes before the expert; here it is the question's cue word."""
    cue = cue_of(user)
    return f"<think>t</think><sub-question>the {cue}</sub-question><ret>{NAMES[expert]}</ret>"


def routed_correctly(text: str, gold: int) -> float:
    plan = more.parse_plan(text, NAMES)  # strict: exactly one expert, the right one
    return float(plan.valid and plan.experts == [NAMES[gold]])


def step_reward(text: str, user: str, gold: int, similarity, cfg) -> float:
    """The real plan reward (step_grpo.plan_reward): format gate, routing credit, sub-question similarity.

    The probe says only the gold expert holds the evidence; the gold sub-question is the cue.
    """
    plan = more.parse_plan(text, NAMES)
    kinds = ["text", "image", "table"]
    step = rollout.Step("plan", [], [], [], text, plan.valid, plan.reason, plan.sub_question,
                        [kinds[NAMES.index(n)] for n in plan.experts], plan.stop,
                        probe={k: i == gold for i, k in enumerate(kinds)})
    return sg.plan_reward(step, "the " + cue_of(user), similarity, cfg)


def encode(policy, user: str):
    return more.encode_prompt(policy.processor, more.render_prompt(SYSTEM, user, False))


def warm_start(policy, cfg, steps: int, rng: random.Random):
    """Teach the format, the copied cue, and the routing of TAUGHT_CUES; CUES get RANDOM expert labels.

    So after it the policy reads the sub-question to route, but routes CUES at chance: that is left to RL.
    """
    optimizer, _ = sg.make_optimizer(policy, cfg, "sft")
    tok = policy.tokenizer
    for _ in range(steps):
        batch = [task(rng, TAUGHT_CUES) if rng.random() < 0.5 else (task(rng)[0], rng.randrange(3)) for _ in range(16)]
        targets = [tok(completion(u, expert) + "<|im_end|>", add_special_tokens=False)["input_ids"]
                   for u, expert in batch]
        sg.supervised_update(policy, optimizer, [encode(policy, u).ids for u, _ in batch], targets, [None] * 16, cfg)


def accuracy(policy, cfg, n: int = 60, seed: int = 123, greedy: bool = True) -> float:
    rng = random.Random(seed)
    items = [task(rng) for _ in range(n)]
    completions = more.sample(policy, [encode(policy, u) for u, _ in items], "plan", 40,
                              0.0 if greedy else cfg.temperature)
    return sum(routed_correctly(c.text, g) for c, (_, g) in zip(completions, items)) / n


def grpo(policy, cfg, steps: int, rng: random.Random, log=None):
    """Real sampler, real Step-GRPO loss and optimiser; reward 1 for the single right expert."""
    optimizer, scheduler = sg.make_optimizer(policy, cfg, "grpo")
    from experts import TextEncoder
    similarity = sg.SubQuestionSimilarity(TextEncoder(cfg.text_encoder))
    history = []
    for step in range(steps):
        items = [task(rng) for _ in range(cfg.questions_per_step)]
        prompts = [encode(policy, u) for u, _ in items for _ in range(cfg.group_size)]
        policy.model.eval()
        completions = more.sample(policy, prompts, "plan", 40, cfg.temperature)
        samples, rewards = [], []
        for g, (_, gold) in enumerate(items):
            group = completions[g * cfg.group_size:(g + 1) * cfg.group_size]
            user = items[g][0]
            r = torch.tensor([step_reward(c.text, user, gold, similarity, cfg) for c in group], dtype=torch.float64)
            for p, c, a in zip(prompts[g * cfg.group_size:], group, sg.group_advantages(r).tolist()):
                samples.append(sg.Sample(rollout.Step("plan", p.ids, c.ids, c.logprobs, c.text, True), None, a))
            rewards += r.tolist()
        sg.policy_update(policy, optimizer, samples, cfg)
        scheduler.step()
        history.append(sum(rewards) / len(rewards))
        if log and step % 10 == 0:
            log(f"step {step}: sampled reward {history[-1]:.2f}, greedy accuracy {accuracy(policy, cfg):.2f}")
    return history


def run(model_cache: str, sft_steps: int, grpo_steps: int, seed: int = 0, log=None, **overrides):
    settings = dict(group_size=8, questions_per_step=8, lr=1e-3, sft_lr=3e-3, beta=0.0, micro_batch=64)
    cfg = sg.Config(model_name="tiny", model_cache=model_cache, device="cpu", train_lm_head=True, seed=seed,
                    **{**settings, **overrides})
    torch.manual_seed(seed)
    rng = random.Random(seed)
    policy = more.load_policy(cfg)
    warm_start(policy, cfg, sft_steps, rng)
    before = accuracy(policy, cfg)
    history = grpo(policy, cfg, grpo_steps, rng, log)
    return before, accuracy(policy, cfg), history


if __name__ == "__main__":
    import argparse
    import time
    parser = argparse.ArgumentParser()
    parser.add_argument("--sft", type=int, default=80)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--entropy", type=float, default=0.0)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--cache", default="/tmp/mc")
    parser.add_argument("--schedule", default="constant")
    parser.add_argument("--aggregation", default="token")
    args = parser.parse_args()
    start = time.time()
    before, after, _ = run(args.cache, args.sft, args.steps, args.seed, log=print, lr=args.lr,
                             entropy_coef=args.entropy, group_size=args.group, questions_per_step=args.prompts,
                             lr_schedule=args.schedule, train_steps=args.steps, aggregation=args.aggregation)
    print(f"greedy accuracy {before:.2f} -> {after:.2f} in {time.time() - start:.0f} s")
