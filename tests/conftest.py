"""Shared fixtures: the tiny Qwen2.5-VL is built once per test session into a temporary cache."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# A few dozen rows of each of the release's six benchmark files and ten trajectories of its step file
# (samples/README.md): the official formats are tested on any clone.
SAMPLES = ROOT / "samples" / "more"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture
def tiny_cfg(model_cache):
    from config import Config
    return Config(model_name="tiny", model_cache=model_cache, device="cpu")


@pytest.fixture(scope="session")
def shared_policy(model_cache):
    """One loaded tiny policy for tests that only read it (never train it)."""
    from more import load_policy
    from config import Config
    return load_policy(Config(model_name="tiny", model_cache=model_cache, device="cpu"))


def run_config(tmp_path, world, model_cache, name, **overrides) -> Path:
    """A config file for a short CPU run of the tiny model on the test world, in tmp_path/name."""
    cfg = {"model_name": "tiny", "model_cache": model_cache, "world_dir": str(world), "world_seed": 3, "device": "cpu",
           "sft_steps": 2, "train_steps": 2, "questions_per_step": 2, "group_size": 2, "sft_batch": 4,
           "max_new_tokens_plan": 20, "max_new_tokens_answer": 12, "save_every": 100, "eval_every": 2,
           "eval_questions": 2, "out_dir": str(tmp_path / name), "max_steps": 1, **overrides}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def nonzero_lora(policy, std: float = 0.05) -> None:
    """Draw every LoRA B from N(0, std) with one seeded generator: a fresh adapter's B is zero, which
    hides the branch (its output, and lora_A's gradient, would be zero)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std, generator=generator)


def random_image(seed: int, size=(56, 56)):
    from PIL import Image
    pixels = np.random.RandomState(seed).randint(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A small mini world with indexes, labels and step files (seed 3, 15 towns, 6 questions per kind)."""
    from world import build_world
    out = tmp_path_factory.mktemp("world")
    build_world(out, seed=3, n_towns=15, per_kind=6)
    return out


@pytest.fixture(scope="session")
def world_experts(world):
    from experts import Expert, TextEncoder
    encoder = TextEncoder("minilm")
    return [Expert.load(world / "indexes" / kind, text_encoder=encoder) for kind in ("text", "image", "table")]
