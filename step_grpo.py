"""Step-GRPO: configuration now; stepwise rewards, advantages, the loss and the loop come next.

`python step_grpo.py --config tiny.json [--key value …]`
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

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

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Each field's one-line documentation, read from the docstring under it in this file."""
        source = Path(__file__).read_text().split("class Config")[1]
        return {name: doc for name, doc in re.findall(r'\n    (\w+): [^\n]+\n    """(.*?)"""', source)}



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
    cfg = Config(**checked)
    cfg.index_dir = cfg.index_dir or str(Path(cfg.world_dir) / "indexes")
    return cfg


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description="Train MoRE with Step-GRPO.")
    parser.add_argument("--config", required=True, help="a JSON config: tiny.json (CPU) or small.json (GPU)")
    args, overrides = parser.parse_known_args(argv)
    load_config(args.config, overrides)  # fail early on a bad config, even before training exists
    sys.exit("step_grpo.py: the config is valid, but the training loop is not written yet "
             "(rewards, advantages, loss and loop are the next piece of work).")


if __name__ == "__main__":
    main(sys.argv[1:])
