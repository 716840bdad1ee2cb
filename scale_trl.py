"""Step-GRPO beyond one GPU: the authors' steps mode on TRL's GRPOTrainer (accelerate, DeepSpeed, vLLM).

  python scale_trl.py --config small.json [--key value …]                       # one GPU
  accelerate launch --config_file configs/ddp.yaml scale_trl.py --config small.json  # N GPUs
  python scale_trl.py --config small.json --vllm colocate                       # vLLM generation

Steps mode is single-turn GRPO over step prompts, which is what GRPOTrainer does: each step prompt of
the step file is a dataset row, its G samples a group, and the reward is ours (rewards.py), imported,
never copied. The model, its 4-bit loading and the LoRA settings are ours too (more.py); only the
engine is TRL's. The adapter is written to `out_dir/adapter`, which more.load_policy and eval.py
load like any other. Needs requirements-scale.txt; the core does not.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch
from datasets import Dataset, Image
from trl import GRPOConfig, GRPOTrainer

import data
import more
import protocol
import world
from config import UserError, command_config, run_command
from experts import TextEncoder
from rewards import SubQuestionSimilarity, official_step_reward
from step_grpo import load_step_samples, require_steps_file

# Renders a conversation exactly as protocol.render_prompt does (the image ends the user turn), so
# that TRL's prompts are the core's prompts token for token, for the tiny and the real model alike.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
    "{%- for p in m['content'] if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}"
    "{%- for p in m['content'] if p['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{%- endfor -%}"
    "{%- endif -%}{{ '<|im_end|>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}")
LOSS_TYPE = {"token": "bnpo", "sequence": "grpo"}  # our aggregation -> TRL's loss with the same normaliser


def conversation(prompt: protocol.StepPrompt) -> list[dict]:
    user = [{"type": "text", "text": prompt.user}] + ([{"type": "image"}] if prompt.image else [])
    return [{"role": "system", "content": [{"type": "text", "text": prompt.system}]},
            {"role": "user", "content": user}]


def step_dataset(samples: list[data.StepSample], tokenizer, cfg) -> Dataset:
    """One row per step prompt (capped as the core caps it): the conversation, its image, and the
    gold columns the reward reads (`kind`, and `gold` as JSON, since its type depends on the kind)."""
    prompts = [data.step_prompt(s, tokenizer, cfg)[0] for s in samples]
    rows = {"prompt": [conversation(p) for p in prompts], "image": [p.image for p in prompts],
            "kind": [s.kind for s in samples], "gold": [json.dumps(s.gold) for s in samples]}
    dataset = Dataset.from_dict(rows)
    return dataset.cast_column("image", Image()) if any(rows["image"]) else dataset.remove_columns("image")


def step_reward(cfg, similarity):
    """Our step reward as a TRL reward function: TRL passes the dataset's columns by name."""
    def reward(completions, kind, gold, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [official_step_reward(data.StepSample(k, "", [], json.loads(g), -1), text, similarity, cfg)
                for text, k, g in zip(texts, kind, gold)]
    reward.__name__ = "step_reward"
    return reward


def grpo_config(cfg, device: torch.device, suppress_ids: list[int], processes: int = 1,
                vllm: str | None = None) -> GRPOConfig:
    """Our Config as TRL's: one optimiser step per batch of questions_per_step × G samples, run in
    micro-batches of `micro_batch` rows, as step_grpo.policy_update does."""
    rows = cfg.questions_per_step * cfg.group_size
    if rows % (cfg.micro_batch * processes):
        raise UserError(f"questions_per_step × group_size = {rows} must be a multiple of micro_batch × processes "
                        f"= {cfg.micro_batch * processes} for TRL's batches")
    steps = rows // (cfg.micro_batch * processes)
    return GRPOConfig(
        output_dir=cfg.out_dir, seed=cfg.seed, max_steps=cfg.train_steps, num_generations=cfg.group_size,
        per_device_train_batch_size=cfg.micro_batch, steps_per_generation=steps, gradient_accumulation_steps=steps,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        warmup_steps=cfg.warmup_steps, lr_scheduler_type="cosine" if cfg.lr_schedule == "cosine" else "constant_with_warmup",
        optim="paged_adamw_8bit" if cfg.optimizer == "paged_adamw_8bit" else "adamw_torch",
        beta=cfg.beta, epsilon=cfg.clip_eps, loss_type=LOSS_TYPE[cfg.aggregation], entropy_coef=cfg.entropy_coef,
        use_bias_correction_kl=False,  # TRL's default weights the KL by the ratio; ours (GRPO's k3) does not
        scale_rewards="group", temperature=cfg.temperature or 1.0, top_p=cfg.top_p, top_k=cfg.top_k,
        max_completion_length=max(cfg.max_new_tokens_plan, cfg.max_new_tokens_answer),
        generation_kwargs={"suppress_tokens": suppress_ids, "repetition_penalty": 1.0},
        gradient_checkpointing=cfg.gradient_checkpointing, bf16=device.type == "cuda", use_cpu=device.type == "cpu",
        use_vllm=vllm is not None, vllm_mode=vllm or "colocate", remove_unused_columns=False,
        save_strategy="steps", save_steps=cfg.save_every, logging_steps=1, report_to="none")


def make_trainer(cfg, vllm: str | None = None) -> GRPOTrainer:
    """The base model and LoRA settings of more.py, our data and reward, on TRL's engine."""
    if cfg.mode != "steps":
        raise UserError("scale_trl.py trains steps mode (the authors' method); add --mode steps. Online mode at "
                        "scale is not built yet (docs/SCALE.md)")
    if cfg.device.startswith("cuda") and "LOCAL_RANK" in os.environ:  # accelerate: one GPU per process
        cfg = dataclasses.replace(cfg, device=f"cuda:{os.environ['LOCAL_RANK']}")
    require_steps_file(cfg)
    world.ensure_world(cfg)
    samples = load_step_samples(cfg)
    model, processor, device = more.load_base_model(cfg)
    processor.chat_template = processor.tokenizer.chat_template = CHAT_TEMPLATE
    processor.tokenizer.padding_side = "left"
    suppress = [processor.tokenizer.convert_tokens_to_ids(t) for t in more.VISION_TOKENS]
    args = grpo_config(cfg, device, suppress, int(os.environ.get("WORLD_SIZE", 1)), vllm)
    similarity = SubQuestionSimilarity(TextEncoder(cfg.text_encoder, cfg.text_pooling))
    torch.manual_seed(cfg.seed)
    trainer = GRPOTrainer(model=model, reward_funcs=[step_reward(cfg, similarity)], args=args,
                          train_dataset=step_dataset(samples, processor.tokenizer, cfg), processing_class=processor,
                          peft_config=more.lora_config(cfg))
    keep_adapter_dtypes(trainer.model, next(model.lm_head.parameters()).dtype)
    return trainer


def keep_adapter_dtypes(model, compute_dtype: torch.dtype) -> None:
    """Undo TRL's cast of a 4-bit model's trainable weights to bf16: LoRA matrices stay fp32 and a
    trained head copy in the compute dtype, as in the core (bf16 would also break fp32 CPU runs)."""
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.float32 if "lora_" in name else compute_dtype)


def save_adapter(trainer: GRPOTrainer, out_dir: Path) -> Path:
    """The LoRA adapter and the processor, loadable by more.load_policy(cfg, adapter_dir=…)."""
    folder = out_dir / "adapter"
    trainer.model.save_pretrained(folder, safe_serialization=True)
    trainer.processing_class.save_pretrained(folder)
    return folder


def train(cfg, vllm: str | None = None) -> Path:
    trainer = make_trainer(cfg, vllm)
    trainer.train()
    folder = save_adapter(trainer, Path(cfg.out_dir))
    print(f"done: adapter in {folder}; python eval.py --config … --checkpoint {folder}")
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description="Step-GRPO (steps mode) on TRL's GRPOTrainer.",
                                     usage="%(prog)s --config FILE [--vllm colocate|server] [--KEY VALUE ...]",
                                     allow_abbrev=False)
    parser.add_argument("--config", required=True, help="a JSON config, e.g. small.json")
    parser.add_argument("--vllm", choices=["colocate", "server"], default=None,
                        help="generate with vLLM (GPU only; `trl vllm-serve` must run for 'server')")
    args, load = command_config(parser, argv)
    run_command("scale_trl.py", lambda: train(load(), args.vllm))


if __name__ == "__main__":
    main()
