"""The run configuration: one flat dataclass, every field documented and range-checked.

A Config comes from a JSON file plus `--key value` / `--key=value` overrides. A bad key, type or
value fails at start, before anything is written, in one line naming the field, the value and
where it came from (the file, or the command line). Every module imports this one; it imports no
module of the project, so it sits at the bottom of the import graph.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import inspect
import json
import math
import os
import re
import sys
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path


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
    world_seed: int = 0
    """Seed of the mini world built in world_dir (its towns, people and questions); a built world must match it."""
    prompts: str = "release"
    """System prompts: 'release' (the authors' texts) or 'compact' (one line each, the same tags; for the tiny model)."""
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
    image_root: str = ""
    """Folder of a step file's images, each found by its file name (the release's files name absolute paths elsewhere); empty: as the file says."""
    skip_missing_images: bool = False
    """Steps mode: leave out the steps whose image is missing (and say how many) instead of refusing to start."""
    max_prompt_tokens: int = 0
    """Steps mode: cap a step prompt at this many tokens by dropping its last passages (0: no cap)."""
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
    log_kl: bool = False
    """Compute the KL to the reference for the metrics even when beta = 0 (one more forward per micro-batch); else it is NaN."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (the release: 1e-3)."""
    aggregation: str = "token"
    """Loss aggregation: 'token' (mean over all policy tokens) or 'sequence' (mean of per-sequence means)."""
    w_route: float = 0.5
    """Plan reward: weight of routing credit (exactly one expert, and it is in the hop's gold-expert set)."""
    w_subq: float = 0.5
    """Plan reward: weight of cosine similarity of the sub-question to the gold one."""
    answer_reward: str = "f1"
    """Reward of sub-answers and final answers: 'f1' (token F1, pays for the answer) or 'recall' (the release's, pays for length too)."""
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
    keep_checkpoints: int = 3
    """Checkpoints kept in out_dir/checkpoints (older ones are deleted); 0 keeps all."""


# ----------------------------------------------------------------------------------------------
# What a valid value is. Every numeric field has a rule; every choice field its set.

CHOICES = {
    "arch": ("tiny", "bench-standard", "qwen2.5-vl-3b", "qwen2.5-vl-7b"),  # presets.ARCH_PRESETS
    "mode": ("online", "steps"),
    "lr_schedule": ("constant", "cosine"),
    "aggregation": ("token", "sequence"),
    "optimizer": ("adamw", "paged_adamw_8bit"),
    "text_pooling": ("mean", "cls"),
    "answer_reward": ("f1", "recall"),
    "prompts": ("release", "compact"),  # protocol.PROMPT_STYLES
}
EXPERT_KINDS = ("text", "image", "table")


def _at_least(low):
    return lambda v: v >= low, f">= {low}"


def _above(low):
    return lambda v: v > low, f"> {low}"


def _within(low, high, low_open=False):
    if low_open:
        return lambda v: low < v <= high, f"in ({low}, {high}]"
    return lambda v: low <= v <= high, f"in [{low}, {high}]"


RULES = {
    "lora_r": _at_least(1), "lora_alpha": _at_least(1), "lora_dropout": _within(0.0, 0.9),
    "min_pixels": _at_least(784), "max_pixels": _at_least(784), "seed": _within(0, 2**32 - 1),
    "world_seed": _within(0, 2**32 - 1),
    "temperature": _within(0.0, 100.0), "top_p": _within(0.0, 1.0, low_open=True), "top_k": _at_least(0),
    "max_new_tokens_plan": _at_least(1), "max_new_tokens_answer": _at_least(1), "max_steps": _at_least(0),
    "group_size": _at_least(2), "retrieve_k": _at_least(1), "show_k": _at_least(1),
    "train_steps": _at_least(0), "questions_per_step": _at_least(1), "lr": _above(0.0),
    "weight_decay": _at_least(0.0), "warmup_steps": _at_least(0), "micro_batch": _at_least(1),
    "max_grad_norm": _above(0.0), "clip_eps": _within(0.0, 1.0, low_open=True), "beta": _at_least(0.0),
    "entropy_coef": _at_least(0.0), "w_route": _at_least(0.0), "w_subq": _at_least(0.0),
    "w_outcome": _at_least(0.0), "sft_steps": _at_least(0), "sft_lr": _above(0.0), "sft_batch": _at_least(1),
    "save_every": _at_least(1), "eval_every": _at_least(0), "eval_questions": _at_least(1),
    "traces_per_step": _at_least(0), "keep_checkpoints": _at_least(0), "max_prompt_tokens": _at_least(0),
}
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")

# Fields a resumed run may change: they touch neither the model, the data stream nor the optimiser
# state. Everything else must equal what the checkpoint was trained with.
SAFE_ON_RESUME = ("train_steps", "save_every", "eval_every", "eval_questions", "traces_per_step",
                  "keep_checkpoints", "out_dir", "model_cache")


class UserError(ValueError):
    """A mistake in what the user gave (a file, a value, a folder): commands print its message as
    one line and exit with status 2; a traceback is kept for bugs."""


def run_command(prog: str, body):
    """Run a command's `body()`; a user's mistake becomes one line on stderr and exit status 2.

    A UserError, or an OSError about a path the user gave (missing, a folder, unreadable), is for
    the user to fix: it is printed without a traceback, and nothing more runs. Anything else is a
    bug and keeps its traceback. MORE_TRACEBACK=1 shows the traceback of user errors too.
    """
    try:
        return body()
    except (UserError, OSError) as err:
        if os.environ.get("MORE_TRACEBACK"):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)


class ConfigError(UserError):
    """A bad config: the message names the field, the value and its source."""


def field_docs() -> dict[str, str]:
    """Each field's one-line documentation: the string literal under it in the class body."""
    body = ast.parse(inspect.getsource(Config)).body[0].body
    return {node.target.id: follower.value.value for node, follower in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(follower, ast.Expr)
            and isinstance(follower.value, ast.Constant)}


def _coerce(name: str, value, kind, source: str):
    """`value` checked against the field's annotated type; ints are accepted where floats are."""
    origin = typing.get_origin(kind) or kind
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, origin) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{name} = {value!r} ({source}): must be of type {origin.__name__}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{name} = {value!r} ({source}): must be a finite number")
    return value


def _check_value(name: str, value, source: str) -> None:
    """Range, choice and shape rules of one field."""
    if name in RULES and not RULES[name][0](value):
        raise ConfigError(f"{name} = {value!r} ({source}): must be {RULES[name][1]}")
    if name in CHOICES and value not in CHOICES[name]:
        raise ConfigError(f"{name} = {value!r} ({source}): must be one of {', '.join(CHOICES[name])}")
    if name == "device" and not DEVICE_PATTERN.fullmatch(value):
        raise ConfigError(f"device = {value!r} ({source}): must be auto, cpu, cuda or cuda:N")
    if name == "experts" and (not value or not all(isinstance(kind, str) for kind in value)
                              or len(set(value)) != len(value) or not set(value) <= set(EXPERT_KINDS)):
        raise ConfigError(f"experts = {value!r} ({source}): must be a non-empty list of distinct kinds "
                          f"from {', '.join(EXPERT_KINDS)}")


def _check_together(cfg: Config, sources: dict) -> None:
    """Rules between fields."""
    where = lambda *names: ", ".join(sorted({sources.get(n, "default") for n in names}))
    if cfg.min_pixels > cfg.max_pixels:
        raise ConfigError(f"min_pixels = {cfg.min_pixels} > max_pixels = {cfg.max_pixels} "
                          f"({where('min_pixels', 'max_pixels')})")
    if cfg.show_k > cfg.retrieve_k:
        raise ConfigError(f"show_k = {cfg.show_k} > retrieve_k = {cfg.retrieve_k} "
                          f"({where('show_k', 'retrieve_k')}): only retrieved documents can be shown")


# ----------------------------------------------------------------------------------------------
# Loading: a JSON file, then command-line overrides.


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One `--key` option per field (`--key value` and `--key=value`), with its doc and default."""
    group = parser.add_argument_group("config keys (override the --config file)")
    docs = field_docs()
    for f in fields(Config):
        default = f.default_factory() if f.default is MISSING else f.default
        group.add_argument(f"--{f.name}", dest=f.name, default=argparse.SUPPRESS, metavar="V",
                           help=f"{docs[f.name]} (default: {json.dumps(default)})".replace("%", "%%"))
    return parser


def command_config(parser: argparse.ArgumentParser, argv: list[str] | None):
    """Parse a command whose config keys are options too: (its own arguments, a `load()` that
    refuses an unknown option, then loads `--config` with the keys given; call it inside run_command)."""
    own = {action.dest for action in parser._actions}
    add_config_arguments(parser)
    args, unknown = parser.parse_known_args(underscored(list(sys.argv[1:] if argv is None else argv)))
    overrides = {k: v for k, v in vars(args).items() if k not in own}

    def load() -> Config:
        if unknown:
            raise unknown_option(unknown[0])
        return load_config(args.config, overrides)
    return args, load


def underscored(args: list[str]) -> list[str]:
    """`--model-name` → `--model_name` for config keys, so that either spelling works."""
    names = {f.name for f in fields(Config)}

    def fix(match):
        key = match.group(1).replace("-", "_")
        return "--" + (key if key in names else match.group(1))
    return [re.sub(r"^--([\w-]+)", fix, a) for a in args]


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`--key value` / `--key=value` pairs into raw strings per key."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_config_arguments(parser)
    known, unknown = parser.parse_known_args(underscored(args))
    if unknown:
        raise unknown_option(unknown[0])
    return vars(known)


def unknown_option(arg: str) -> ConfigError:
    """The error for a command-line option that is no config key, with the closest keys."""
    names = [f.name for f in fields(Config)]
    close = difflib.get_close_matches(arg.lstrip("-").split("=")[0], names, n=3)
    hint = f"did you mean {', '.join('--' + c for c in close)}?" if close else f"valid keys: {', '.join(names)}"
    return ConfigError(f"unknown option {arg!r} (command line); {hint}")


def _cli_value(name: str, text: str, kind):
    """A command-line value as the field's type: strings stay strings, the rest is read as JSON."""
    if kind is str:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ConfigError(f"{name} = {text!r} (command line): not a valid value for a "
                          f"{getattr(typing.get_origin(kind) or kind, '__name__', kind)}") from None


def _read_file(path: str) -> dict:
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return {k: v for k, v in values.items() if not k.startswith("_")}  # "_comment" keys


def load_config(path: str | None, overrides: list[str] | dict | None = None) -> Config:
    """A checked Config from a JSON file plus overrides (a list of CLI strings, or parsed ones)."""
    hints = typing.get_type_hints(Config)
    values = _read_file(path) if path is not None else {}
    sources = {name: f"in {path}" for name in values}
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} in {path}; valid keys: {', '.join(hints)}")
    raw = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides or []))
    for name, text in raw.items():
        values[name] = _cli_value(name, text, hints[name]) if isinstance(text, str) else text
        sources[name] = "command line"
    for name, value in values.items():
        values[name] = _coerce(name, value, hints[name], sources[name])
        _check_value(name, values[name], sources[name])
    cfg = Config(**values)
    _check_together(cfg, sources)
    cfg.index_dir = cfg.index_dir or str(Path(cfg.world_dir) / "indexes")
    return cfg


# ----------------------------------------------------------------------------------------------
# Resuming: which differences from a checkpoint's config are refused.


def resume_differences(saved: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """(refused, allowed) differences between a checkpoint's config and this run's, one line each.

    `train_steps` is refused under a cosine schedule, whose learning rate depends on it. A field
    added after the checkpoint was written counts as its default there (what the code then did).
    """
    refused, allowed = [], []
    current, defaults = asdict(cfg), asdict(Config())
    saved = {**{name: value for name, value in defaults.items() if name not in saved}, **saved}
    for name in sorted(set(saved) | set(current)):
        if saved.get(name) == current.get(name):
            continue
        line = f"{name}: checkpoint {saved.get(name)!r}, now {current.get(name)!r}"
        safe = name in SAFE_ON_RESUME and not (name == "train_steps" and cfg.lr_schedule == "cosine")
        (allowed if safe else refused).append(line)
    return refused, allowed
