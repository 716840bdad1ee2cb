"""Checkpoints: what a run folder holds, written so that nothing in it executes and a kill at any
moment leaves a whole checkpoint, and read only after every byte is verified.

A checkpoint is `out_dir/checkpoints/step-NNNNNN/` with the LoRA adapter (and the processor, so it
loads from anywhere), the optimiser, schedule and RNG states (tensors in safetensors, the rest in
JSON), the run's config, and `manifest.json` with each file's sha256. `checkpoints/latest` names
the newest. No pickle anywhere: `torch.load` is never called.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from config import Config, ConfigError, UserError, resume_differences

# ----------------------------------------------------------------------------------------------
# The manifest, and what `latest` may name: a corrupted or foreign file is refused before it is read.

MANIFEST = "manifest.json"
CHECKPOINT_NAME = re.compile(r"step-\d{6}")


class CheckpointError(UserError):
    """A checkpoint that cannot be trusted: the message names the file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """manifest.json: the sha256 of every other file in `folder`, by relative path."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    digests = {p.relative_to(folder).as_posix(): _sha256(p) for p in files}
    (folder / MANIFEST).write_text(json.dumps(digests, indent=1))


def verify_manifest(folder: Path) -> None:
    """Refuse `folder` unless its files are exactly those of its manifest, byte for byte."""
    try:
        digests = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{folder / MANIFEST}: missing or unreadable; not a checkpoint of this code") from None
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    for name in sorted(present | set(digests)):
        if name not in digests:
            raise CheckpointError(f"{folder / name}: not listed in the checkpoint's manifest (a foreign file)")
        if name not in present:
            raise CheckpointError(f"{folder / name}: listed in the checkpoint's manifest but missing")
        if _sha256(folder / name) != digests[name]:
            raise CheckpointError(f"{folder / name}: sha256 differs from the manifest (corrupted or changed)")


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint `out_dir/checkpoints/latest` names, refused unless it is a folder of that run."""
    root = Path(out_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.exists():
        return None
    name = pointer.read_text(errors="replace").strip()
    folder = root / name
    if not CHECKPOINT_NAME.fullmatch(name) or not folder.is_dir() or folder.resolve().parent != root.resolve():
        raise CheckpointError(f"{pointer}: names {name[:80]!r}, which is not a checkpoint folder inside {root}")
    return folder


# ----------------------------------------------------------------------------------------------
# Checkpoints hold no pickle: the adapter and every tensor of the optimiser and RNG states in
# safetensors, the rest (step, schedule, hyper-parameters, the config) in JSON, and a manifest with
# each file's sha256 (write_manifest), checked before anything is read. A checkpoint is
# written to a temporary folder and renamed into place; `latest` is replaced atomically after the
# rename, and only then are old checkpoints pruned. A process killed at any moment leaves the
# previous checkpoint or the new one, never half of one.

TRAIN_CONFIG = "train_config.json"  # not config.json, which names a Hugging Face model config


def save_checkpoint(out_dir: Path, policy, optimizer, scheduler, step: int, cfg) -> Path:
    root = out_dir / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.model.save_pretrained(tmp / "adapter", safe_serialization=True)
    policy.processor.save_pretrained(tmp / "adapter")  # so that the adapter loads from anywhere
    tensors, values = training_state(optimizer, scheduler, step)
    save_file(tensors, tmp / "training_state.safetensors")
    (tmp / "training_state.json").write_text(json.dumps(values))
    (tmp / TRAIN_CONFIG).write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    write_manifest(tmp)
    _fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    prune_checkpoints(root, cfg.keep_checkpoints)
    return final


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (0 keeps all), never the one `latest` names.

    A folder is renamed out of the step-N namespace before it is deleted, so a kill mid-delete
    leaves a *.trash folder (removed next time), never a half-deleted checkpoint.
    """
    for trash in root.glob("*.trash"):
        shutil.rmtree(trash, ignore_errors=True)
    if not keep:
        return
    latest = latest_checkpoint(root.parent)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name))
    for old in folders[:-keep]:
        if old != latest:
            trash = old.with_name(old.name + ".trash")
            os.replace(old, trash)
            shutil.rmtree(trash)


def training_state(optimizer, scheduler, step: int) -> tuple[dict, dict]:
    """The optimiser, scheduler and RNG states as (tensors for safetensors, values for JSON)."""
    saved = optimizer.state_dict()
    tensors, optimizer_values = {}, {}
    for index, entries in saved["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value.detach().contiguous()
            else:
                optimizer_values[f"{index}.{name}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    return tensors, {"step": step, "param_groups": saved["param_groups"], "optimizer": optimizer_values,
                     "scheduler": scheduler.state_dict(), "numpy_rng": [kind, position, has_gauss, gauss],
                     "python_rng": [version, list(internal), gauss_next]}


def read_training_state(checkpoint: Path, tensors: bool = True) -> tuple[dict, dict]:
    """(tensors, values) of a checkpoint whose manifest has been verified; refuses a malformed file.

    With `tensors=False` the safetensors header alone is read and checked (no tensor is loaded):
    enough to learn the step before anything else is done.
    """
    path = checkpoint / "training_state.safetensors"
    try:
        if tensors:
            loaded = load_file(path)
        else:
            with safe_open(path, "pt") as f:
                loaded = dict.fromkeys(f.keys())
    except Exception as err:  # safetensors raises its own error type for a bad header
        raise CheckpointError(f"{path}: not a valid safetensors file ({err})") from None
    try:
        values = json.loads((checkpoint / "training_state.json").read_text())
        values["step"], values["param_groups"], values["python_rng"]  # noqa: B018 - the keys must exist
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{checkpoint / 'training_state.json'}: unreadable ({err})") from None
    return loaded, values


def restore_training_state(checkpoint: Path, optimizer, scheduler, restore_optimizer: bool = True) -> int:
    """Load optimiser, schedule and RNG states; returns the step the checkpoint was saved after."""
    tensors, values = read_training_state(checkpoint)
    if restore_optimizer:
        state = defaultdict(dict)
        for key, tensor in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state[int(index)][name] = tensor
        for key, value in values["optimizer"].items():
            index, name = key.split(".", 1)
            state[int(index)][name] = value
        optimizer.load_state_dict({"state": dict(state), "param_groups": values["param_groups"]})
        scheduler.load_state_dict(values["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available() and "rng.cuda.0" in tensors:
        torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())])
    kind, position, has_gauss, gauss = values["numpy_rng"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = values["python_rng"]
    random.setstate((version, tuple(internal), gauss_next))
    return values["step"]


def checkpoint_to_resume(cfg: Config, out_dir: Path) -> Path | None:
    """The verified checkpoint a resumed run continues from, or None (killed before its first one).

    Refuses a config that differs from the checkpoint's in a field that changes the model, the
    data stream or the optimiser state (config.SAFE_ON_RESUME lists the others), naming each.
    """
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is None:
        print(f"--resume: no checkpoint in {out_dir / 'checkpoints'} yet; starting from update 0")
        return None
    verify_manifest(checkpoint)
    try:
        saved = json.loads((checkpoint / TRAIN_CONFIG).read_text())
    except ValueError:
        raise CheckpointError(f"{checkpoint / TRAIN_CONFIG}: not valid JSON") from None
    refused, allowed = resume_differences(saved, cfg)
    if refused:
        raise ConfigError(f"--resume from {checkpoint} refused; these fields differ from the checkpoint's: "
                          + "; ".join(refused))
    for line in allowed:
        print(f"--resume: {line} (allowed)")
    return checkpoint


def drop_rows_after(path: Path, last_step: int) -> int:
    """Keep the JSONL rows of steps ≤ last_step (a killed run's later rows would repeat); atomic.

    Returns how many rows were dropped; a torn last line from a kill is dropped too.
    """
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if _row_step(line) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(lines) - len(kept)


def _row_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
