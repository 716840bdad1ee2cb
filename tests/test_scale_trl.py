"""The TRL bridge (scale_trl.py): our loss equals TRL's own, and one real GRPOTrainer step runs on our
data and reward. Needs requirements-scale.txt (CI installs it)."""
import json
import math

import pytest
import torch

pytest.importorskip("trl", reason="the scale path needs requirements-scale.txt")

import data  # noqa: E402
import more  # noqa: E402
import protocol  # noqa: E402
import rewards  # noqa: E402
import scale_trl  # noqa: E402
import step_grpo as sg  # noqa: E402
from config import Config  # noqa: E402


def steps_cfg(model_cache, world, tmp_path, **overrides) -> Config:
    return Config(model_name="tiny", model_cache=model_cache, device="cpu", mode="steps", world_dir=str(world), world_seed=3,
                  out_dir=str(tmp_path / "trl"), questions_per_step=2, group_size=2, micro_batch=4,
                  max_new_tokens_plan=12, max_new_tokens_answer=12, train_steps=1, save_every=100,
                  lora_dropout=0.0, **overrides)


def test_trl_sees_exactly_the_core_prompts(model_cache, world, tmp_path):
    """The chat template handed to TRL renders each step as protocol.render_prompt does."""
    cfg = steps_cfg(model_cache, world, tmp_path)
    processor = more.load_policy(cfg).processor
    samples = sg.load_step_samples(cfg)
    with_image = [s for s in samples if any(p["type"] == "image" for p in s.parts)][:2]
    for sample in with_image + samples[:3]:
        prompt = data.step_prompt(sample)[0]
        rendered = processor.apply_chat_template(scale_trl.conversation(prompt), chat_template=scale_trl.CHAT_TEMPLATE,
                                                 tokenize=False, add_generation_prompt=True)
        assert rendered == protocol.render_prompt(prompt.system, prompt.user, prompt.image is not None)
    assert with_image


def loss_batch(trainer, cfg):
    """An image row and two text rows of the step file with random completions of different lengths."""
    tok = trainer.processing_class.tokenizer
    samples = sg.load_step_samples(cfg)
    chosen = [next(s for s in samples if any(p["type"] == "image" for p in s.parts)), samples[0], samples[1]]
    prompts = [data.step_prompt(s, tok, cfg)[0] for s in chosen]
    encoded = [more.encode_prompt(trainer.processing_class, protocol.render_prompt(p.system, p.user, p.image is not None),
                                  p.image) for p in prompts]
    rng = torch.Generator().manual_seed(0)
    completions = [torch.randint(10, 1500, (n,), generator=rng).tolist() for n in (5, 9, 7)]
    return encoded, completions


def trl_inputs(encoded, completions, pad_id, image_id, old, ref, advantages) -> dict:
    """The batch as TRL's _compute_loss reads it: prompts left-padded, completions right-padded."""
    width_p, width_c = max(len(e.ids) for e in encoded), max(len(c) for c in completions)
    rows = len(encoded)
    prompt_ids = torch.full((rows, width_p), pad_id)
    completion_ids = torch.full((rows, width_c), pad_id)
    prompt_mask, completion_mask = torch.zeros_like(prompt_ids), torch.zeros_like(completion_ids)
    for i, (e, c) in enumerate(zip(encoded, completions)):
        prompt_ids[i, width_p - len(e.ids):], prompt_mask[i, width_p - len(e.ids):] = torch.tensor(e.ids), 1
        completion_ids[i, :len(c)], completion_mask[i, :len(c)] = torch.tensor(c), 1
    right = lambda x: torch.stack([torch.nn.functional.pad(row[m], (0, width_c - int(m.sum())))
                                   for row, m in zip(x[0], x[1])])
    with_image = [e for e in encoded if e.pixel_values is not None]
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, advantages=advantages, old_per_token_logps=right(old),
                ref_per_token_logps=right(ref), pixel_values=torch.cat([e.pixel_values for e in with_image]),
                image_grid_thw=torch.cat([e.image_grid_thw for e in with_image]),
                num_images=[int(e.pixel_values is not None) for e in encoded],
                mm_token_type_ids=torch.cat([(prompt_ids == image_id).long(), torch.zeros_like(completion_ids)], 1))


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_our_loss_equals_trls_own_loss(model_cache, world, tmp_path, aggregation):
    """step_grpo_loss on our log-probs == GRPOTrainer._compute_loss (TRL's code, TRL's forward) on the
    same model and batch, with the ratio away from 1 (clipping active) and a non-zero KL."""
    cfg = steps_cfg(model_cache, world, tmp_path, beta=0.04, clip_eps=0.2, temperature=0.9, aggregation=aggregation)
    trainer = scale_trl.make_trainer(cfg)
    model = trainer.model.eval()
    with torch.no_grad():  # a trained adapter: the policy now differs from the reference (adapter off)
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    # TRL's log-probs have no suppressed tokens; with none suppressed ours are the same quantity.
    policy = more.Policy(model, trainer.processing_class, torch.device("cpu"), suppress_ids=[])
    tok = policy.tokenizer
    encoded, completions = loss_batch(trainer, cfg)
    inputs, mask = more.collate(encoded, completions, tok.pad_token_id, tok.convert_tokens_to_ids("<|image_pad|>"))
    logp = more.token_logprobs(policy, inputs, mask, cfg.temperature)
    ref = more.reference_logprobs(policy, inputs, mask, cfg.temperature)
    noise = (torch.rand(mask.shape, generator=torch.Generator().manual_seed(2)) - 0.5) * 0.8
    old = (logp.detach() + noise) * mask
    advantages = torch.tensor([1.0, -0.5, 0.7])
    ours = lambda **kw: sg.step_grpo_loss(logp, old, ref, advantages, mask, **{
        "clip_eps": cfg.clip_eps, "beta": cfg.beta, "aggregation": aggregation, **kw})
    theirs = trainer._compute_loss(model, trl_inputs(encoded, completions, tok.pad_token_id,
                                                     tok.convert_tokens_to_ids("<|image_pad|>"),
                                                     (old, mask), (ref, mask), advantages))
    parts = ours()
    assert parts.clip_fraction > 0.2 and parts.kl > 1e-3  # both terms are really exercised
    assert abs(parts.loss.item() - theirs.item()) <= 1e-5
    assert abs(ours(clip_eps=0.3).loss.item() - theirs.item()) > 1e-4  # a changed clip is seen
    assert abs(ours(beta=-cfg.beta).loss.item() - theirs.item()) > 1e-4  # a flipped KL sign is seen


def test_one_grpo_trainer_step_on_our_data_and_reward(model_cache, world, tmp_path):
    """A real GRPOTrainer step: the reward function gets the gold columns and returns the core's
    reward for every completion; the loss is finite; the adapter loads in more.load_policy."""
    cfg = steps_cfg(model_cache, world, tmp_path, lr=1e-2, warmup_steps=0)
    trainer = scale_trl.make_trainer(cfg)
    calls, reward = [], trainer.reward_funcs[0]

    def recorded(**kwargs):
        out = reward(**kwargs)
        calls.append((kwargs, out))
        return out
    trainer.reward_funcs[0] = recorded
    trainer.train()
    samples = {(s.kind, json.dumps(s.gold)): s for s in sg.load_step_samples(cfg)}
    similarity = rewards.SubQuestionSimilarity(scale_trl.TextEncoder(cfg.text_encoder))
    (kwargs, out), = calls
    assert len(out) == cfg.questions_per_step * cfg.group_size
    for completion, kind, gold, value in zip(kwargs["completions"], kwargs["kind"], kwargs["gold"], out):
        text = completion[-1]["content"]
        assert value == rewards.official_step_reward(samples[(kind, gold)], text, similarity, cfg)
    assert math.isfinite(trainer.state.log_history[0]["loss"])
    folder = scale_trl.save_adapter(trainer, tmp_path / "out")
    loaded = dict(more.load_policy(cfg, adapter_dir=str(folder)).model.named_parameters())
    trained = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all(torch.equal(loaded[n].float(), p.detach().float()) for n, p in trained.items())


def test_the_reward_function_scores_gold_and_broken_completions_as_the_core_does(model_cache, world, tmp_path):
    """Called as TRL calls it, on the gold completions (rewards above 0) and on broken ones."""
    cfg = steps_cfg(model_cache, world, tmp_path)
    similarity = rewards.SubQuestionSimilarity(scale_trl.TextEncoder(cfg.text_encoder))
    samples = sg.load_step_samples(cfg)[:12]
    reward = scale_trl.step_reward(cfg, similarity)
    texts = [data.gold_completion(s) for s in samples] + ["<answer>no think</answer>"] * len(samples)
    rows = samples + samples
    got = reward(prompts=[None] * len(rows), completions=[[{"role": "assistant", "content": t}] for t in texts],
                 kind=[s.kind for s in rows], gold=[json.dumps(s.gold) for s in rows])
    assert got == [rewards.official_step_reward(s, t, similarity, cfg) for s, t in zip(rows, texts)]
    assert min(got[:len(samples)]) > 0 and max(got[len(samples):]) == 0


def test_config_maps_onto_grpo_config_and_launch_files_parse(tmp_path):
    """One optimiser step per questions_per_step × G samples on any number of processes, our loss
    options, and accelerate config files that accelerate itself reads."""
    from accelerate.commands.config.config_args import load_config_from_file
    cfg = Config(questions_per_step=4, group_size=5, micro_batch=5, beta=0.04, clip_eps=0.2, aggregation="sequence",
                 out_dir=str(tmp_path))
    args = scale_trl.grpo_config(cfg, torch.device("cpu"), [5], processes=2)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * 2 == 20
    assert args.steps_per_generation == args.gradient_accumulation_steps == 2
    assert (args.num_generations, args.beta, args.epsilon, args.loss_type) == (5, 0.04, 0.2, "grpo")
    assert not args.use_bias_correction_kl and args.generation_kwargs["suppress_tokens"] == [5]
    with pytest.raises(ValueError, match="multiple of micro_batch"):
        scale_trl.grpo_config(Config(questions_per_step=3, group_size=5, micro_batch=4), torch.device("cpu"), [])
    kinds = {name: load_config_from_file(str(scale_trl.Path(__file__).parents[1] / "configs" / f"{name}.yaml"))
             for name in ("ddp", "zero2", "zero3")}
    assert kinds["ddp"].distributed_type == "MULTI_GPU"
    assert [kinds[n].deepspeed_config["zero_stage"] for n in ("zero2", "zero3")] == [2, 3]
