"""Dependable runs: 4-bit training on any CPU, checkpoints that execute nothing and refuse what they
did not save, resume that refuses a changed run, a config that fails fast, kills at any moment."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import more
import protocol
import rollout
import step_grpo as sg
from config import Config, UserError, field_docs, load_config
from conftest import ROOT, run_config
from world import ensure_world

# ------------------------------------------------------------------------ 4-bit on every kind of CPU


@pytest.mark.parametrize("avx512_bf16", [False, True], ids=["as-found", "as-on-avx512-bf16"])
def test_4bit_sampling_and_training_agree_on_any_cpu(avx512_bf16, model_cache, monkeypatch):
    """Sample → update → sample → update on the 4-bit tiny model: every round, the sampled log-probs
    equal the teacher-forced ones (≤ 1e-5), the update has a gradient, and the 4-bit layers compute
    what a policy loaded on any other CPU computes.

    `as-on-avx512-bf16` makes bitsandbytes believe the CPU has AVX-512 BF16 (on such a CPU both
    cases are that). Without more.keep_4bit_layers_trainable it fails: the first no-grad sampling
    call repacks every 4-bit layer into bitsandbytes' inference-only CPU layout. On a real
    AVX-512-BF16 CPU (an AMD EPYC, 2026-12-01) both cases then fail: sampled and recomputed
    log-probs differ by 4e-4, and the update raises "a view of a leaf Variable … in-place
    operation". On an AVX2 CPU the forced case fails, its log-probs differing by 0.4.
    """
    import bitsandbytes.nn.modules as bnb_modules
    cfg = Config(model_name="tiny", model_cache=model_cache, device="cpu", beta=0.0, lr=1e-2)
    reference = more.load_policy(cfg)
    if avx512_bf16:
        monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    policy = more.load_policy(cfg)
    monkeypatch.undo()
    optimizer, _ = sg.make_optimizer(policy, cfg, "grpo")
    prompt = more.encode_prompt(policy.processor, protocol.render_prompt("system", "Who founded Holbelmor?", False))
    for round_ in range(2):
        torch.manual_seed(round_)
        policy.model.eval()
        with torch.no_grad():
            completions = more.sample(policy, [prompt] * 4, "plan", 12)
        steps = [rollout.Step("plan", prompt.ids, c.ids, c.logprobs, c.text, True) for c in completions]
        inputs, mask = rollout.training_batch(policy, steps, [None] * 4)
        policy.model.train()
        with torch.no_grad():
            recomputed = more.token_logprobs(policy, inputs, mask)[mask]
        sampled = torch.tensor([x for c in completions for x in c.logprobs])
        assert (recomputed - sampled).abs().max() <= 1e-5
        stats = sg.policy_update(policy, optimizer, [sg.Sample(s, None, a) for s, a in zip(steps, [1, -1, .5, -.5])], cfg)
        assert stats["grad_norm"] > 0
    policy.model.eval()  # eval + no grad: the state in which bitsandbytes would repack
    assert (more.reference_logprobs(policy, inputs, mask) - more.reference_logprobs(reference, inputs, mask)
            ).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------- helpers


def refused(capsys, config, *args) -> str:
    """Run step_grpo.py's main, expect exit status 2, and return its one-line error."""
    with pytest.raises(SystemExit) as exit_:
        sg.main(["--config", str(config), *args])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def warm_run(tmp_path, world, model_cache):
    """A finished warm-start-only run (3 updates, a checkpoint after each): its config file."""
    config = run_config(tmp_path, world, model_cache, "run", sft_steps=3, train_steps=0, save_every=1)
    sg.main(["--config", str(config)])
    return config


# ----------------------------------------------------------------------- checkpoints execute nothing


def test_a_pickle_payload_in_the_state_file_is_refused_and_runs_nothing(warm_run, tmp_path, capsys):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    folder = checkpoint.latest_checkpoint(tmp_path / "run")
    state = folder / "training_state.safetensors"
    state.write_bytes(pickle.dumps(Payload()))
    assert "training_state.safetensors" in refused(capsys, warm_run, "--resume", "--train_steps", "1")
    checkpoint.write_manifest(folder)  # a forger who also rewrites the manifest
    assert "training_state.safetensors" in refused(capsys, warm_run, "--resume", "--train_steps", "1")
    (folder / "state.pt").write_bytes(pickle.dumps(Payload()))  # the old format, dropped beside it
    assert "state.pt" in refused(capsys, warm_run, "--resume", "--train_steps", "1")
    assert not marker.exists()


def test_a_flipped_byte_in_the_adapter_is_detected(warm_run, tmp_path, capsys):
    adapter = checkpoint.latest_checkpoint(tmp_path / "run") / "adapter" / "adapter_model.safetensors"
    blob = bytearray(adapter.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    adapter.write_bytes(bytes(blob))
    assert "adapter_model.safetensors" in refused(capsys, warm_run, "--resume", "--train_steps", "1")
    with pytest.raises(checkpoint.CheckpointError, match="adapter_model.safetensors"):
        more.find_adapter(tmp_path / "run")  # eval.py and more.py --checkpoint go through here


def test_latest_must_name_a_checkpoint_inside_the_run(warm_run, tmp_path, capsys):
    latest = tmp_path / "run" / "checkpoints" / "latest"
    outside = tmp_path / "elsewhere" / "step-000009"
    outside.mkdir(parents=True)
    for target in ("../../elsewhere/step-000009", str(outside), "step-000009"):
        if target == "step-000009":  # a link inside the run that leads out of it
            (latest.parent / target).symlink_to(outside)
        latest.write_text(target)
        assert "latest" in refused(capsys, warm_run, "--resume", "--train_steps", "1")


def test_the_adapter_loads_from_any_directory(warm_run, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    adapter = checkpoint.latest_checkpoint(tmp_path / "run") / "adapter"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.isabs(base)
    model = PeftModel.from_pretrained(Qwen2_5_VLForConditionalGeneration.from_pretrained(base), str(adapter))
    assert AutoTokenizer.from_pretrained(str(adapter)).convert_tokens_to_ids("<|im_end|>") is not None
    assert more.load_processor(str(adapter), 3136, 3136).tokenizer is not None
    assert any("lora_A" in name for name, _ in model.named_parameters())


# ------------------------------------------------------------------ resume refuses what it did not save


def comparable(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    timing = {"seconds", "tokens_per_s", "peak_memory_mb"}
    return [{k: v for k, v in row.items() if k not in timing and not k.startswith("seconds_")} for row in rows]


def adapter_tensors(run):
    from safetensors.torch import load_file
    return load_file(checkpoint.latest_checkpoint(run) / "adapter" / "adapter_model.safetensors")


def test_four_updates_equal_two_then_a_resume_with_more_train_steps(tmp_path, world, model_cache, capsys):
    """Stop after 2 of 3 updates, resume with train_steps raised so that 4 are run: the adapter and
    every metric equal a straight 4-update run's, so nothing of the first half was lost or redone."""
    straight = run_config(tmp_path, world, model_cache, "straight")
    sg.main(["--config", str(straight)])
    halves = run_config(tmp_path, world, model_cache, "halves")
    sg.main(["--config", str(halves), "--stop-after", "2", "--train_steps", "1"])
    assert len((tmp_path / "halves" / "metrics.jsonl").read_text().splitlines()) == 2
    sg.main(["--config", str(halves), "--resume"])
    assert "train_steps: checkpoint 1, now 2 (allowed)" in capsys.readouterr().out
    a, b = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "halves")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert comparable(tmp_path / "straight" / "metrics.jsonl") == comparable(tmp_path / "halves" / "metrics.jsonl")
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # the updates did change it


@pytest.mark.parametrize("change, named", [(["--seed", "1"], "seed: checkpoint 0, now 1"),
                                           (["--lora_r", "4"], "lora_r: checkpoint 16, now 4"),
                                           (["--lr_schedule", "cosine", "--train_steps", "5"], "lr_schedule")])
def test_resume_refuses_a_changed_run_naming_the_field(warm_run, tmp_path, capsys, change, named):
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert named in refused(capsys, warm_run, "--resume", *change)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_a_new_run_refuses_a_folder_that_holds_one_and_resume_needs_a_run(warm_run, tmp_path, world, model_cache,
                                                                          capsys):
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "already holds a run" in refused(capsys, warm_run)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    empty = run_config(tmp_path, world, model_cache, "empty")
    assert "holds no run" in refused(capsys, empty, "--resume")
    assert not (tmp_path / "empty").exists()


# ---------------------------------------------------------------------------- a config that fails fast

BAD_VALUES = [["--save_every", "0"], ["--micro_batch", "0"], ["--group_size", "0"], ["--lr", "NaN"],
              ["--device", "tpu"], ["--arch", "huge"], ["--train_steps", "-3"], ["--lora_r", "true"],
              ["--lora_rank", "4"], ["--lr=abc"], ["--experts", '["text","foo"]'], ["--show_k", "20"],
              ["--temperature", "-1"], ["--top_p", "0"], ["--clip_eps", "0"], ["--seed", "-1"]]


@pytest.mark.parametrize("bad", BAD_VALUES, ids=lambda bad: "".join(bad))
def test_a_bad_value_fails_at_start_naming_field_value_and_source(tmp_path, world, model_cache, capsys, bad):
    config = run_config(tmp_path, world, model_cache, "bad", world_dir=str(tmp_path / "world"))
    err = refused(capsys, config, *bad)
    assert bad[0].split("=")[0].lstrip("-") in err and "command line" in err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "world").exists()  # nothing written


def test_a_bad_value_in_the_file_names_the_file(tmp_path, world, model_cache, capsys):
    config = run_config(tmp_path, world, model_cache, "bad", lora_rank=4)
    assert "lora_rank" in refused(capsys, config) and "bad.json" in refused(capsys, config)
    config = run_config(tmp_path, world, model_cache, "bad", micro_batch=0)
    assert "micro_batch = 0 (in " in refused(capsys, config)


def test_the_command_prints_no_traceback_on_a_bad_value(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "step_grpo.py"), "--config", str(ROOT / "tiny.json"),
                          "--save_every", "0", "--out_dir", str(tmp_path / "x")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "step_grpo.py: error: save_every = 0 (command line): must be >= 1"
    assert list(tmp_path.iterdir()) == []


def test_help_lists_every_key_with_its_doc_and_default(capsys):
    with pytest.raises(SystemExit):
        sg.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, doc in field_docs().items():
        assert f"--{name}" in text and " ".join(doc.split()[:4]) in text
    assert '(default: "online")' in text and "(default: 0.0001)" in text


def test_both_override_spellings_work():
    cfg = load_config(None, ["--lr=0.001", "--lora-r", "8", "--model_name=tiny", "--experts", '["text"]'])
    assert (cfg.lr, cfg.lora_r, cfg.model_name, cfg.experts) == (0.001, 8, "tiny", ["text"])


# ------------------------------------------------------------------------------- kills at any moment


def test_keep_checkpoints_prunes_older_ones(tmp_path, world, model_cache):
    for keep, expected in ((2, ["step-000003", "step-000004"]), (0, [f"step-00000{i}" for i in range(5)])):
        config = run_config(tmp_path, world, model_cache, f"keep{keep}", sft_steps=5, train_steps=0, save_every=1,
                            keep_checkpoints=keep)
        sg.main(["--config", str(config)])
        folders = sorted(p.name for p in (tmp_path / f"keep{keep}" / "checkpoints").iterdir() if p.is_dir())
        assert folders == expected


KILLER = """
import os, random, signal, sys, time
sys.path.insert(0, {root!r})
import step_grpo
# Resolve the lazy imports once, computing nothing (OpenMP threads must not exist before a fork).
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (AutoTokenizer, BitsAndBytesConfig, GenerationConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil)
config, kills, seed, log = {config!r}, {kills}, {seed}, {log!r}
out = os.path.join(os.path.dirname(config), "killed")
rng = random.Random(seed)

def child():
    resume = os.path.exists(out + "/metrics.jsonl") or os.path.exists(out + "/checkpoints")
    pid = os.fork()
    if pid == 0:
        sys.stdout = sys.stderr = open(log, "a", buffering=1)
        try:
            step_grpo.main(["--config", config] + (["--resume"] if resume else []))
        except SystemExit as exit_:
            os._exit(exit_.code or 0)
        os._exit(0)
    return pid

for i in range(kills):
    pid = child()
    time.sleep(rng.uniform(0.3, 2.0))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    rows = len(open(out + "/metrics.jsonl").readlines()) if os.path.exists(out + "/metrics.jsonl") else 0
    print("killed" if os.WIFSIGNALED(status) else f"finished {{os.WEXITSTATUS(status)}}", rows, flush=True)
_, status = os.waitpid(child(), 0)
print("final", os.WEXITSTATUS(status), flush=True)
"""


def test_kill_9_at_20_random_points_never_breaks_a_run(tmp_path, world, model_cache):
    """20 SIGKILLs at random moments (start-up, updates, checkpoint writes, pruning), each followed by
    --resume: every resume works, no metric row is duplicated or lost, and the final adapter equals
    an uninterrupted run's. Children are forked from one process that imported everything once."""
    settings = dict(sft_steps=30, train_steps=2, save_every=1, keep_checkpoints=2)
    straight = run_config(tmp_path, world, model_cache, "straight", **settings)
    sg.main(["--config", str(straight)])
    killed = run_config(tmp_path, world, model_cache, "killed", **settings)
    script = KILLER.format(root=str(ROOT), config=str(killed), kills=20, seed=0, log=str(tmp_path / "log"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "final 0" in out.stdout, out.stdout + out.stderr[-3000:]
    mid_run = [line for line in out.stdout.splitlines() if line.startswith("killed") and int(line.split()[1]) < 32]
    assert len(mid_run) >= 15, out.stdout  # the kills landed while the run was going on
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(32))
    a, b = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert comparable(tmp_path / "straight" / "metrics.jsonl") == comparable(tmp_path / "killed" / "metrics.jsonl")


def test_a_killed_world_build_is_rebuilt_on_the_next_run(tmp_path):
    folder = tmp_path / "world"
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import world; from config import Config; "
              f"world.ensure_world(Config(world_dir={str(folder)!r}))")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "world.tmp" / "indexes").exists() and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert (tmp_path / "world.tmp").exists() and not folder.exists()
    ensure_world(Config(world_dir=str(folder)))
    assert all((folder / "indexes" / kind / "expert.json").exists() for kind in ("text", "image", "table"))
    assert not (tmp_path / "world.tmp").exists()


def test_a_world_built_otherwise_than_the_config_says_is_refused(world):
    ensure_world(Config(world_dir=str(world), world_seed=3))  # as built: accepted
    with pytest.raises(ValueError, match="world_seed 3"):
        ensure_world(Config(world_dir=str(world), world_seed=0))
    online = Config(world_dir=str(world), world_seed=3, mode="online", sft_steps=0, prompts="compact", show_k=2)
    ensure_world(online)  # its step files are not read: their prompts and passages do not matter
    for change, named in [(dict(prompts="compact"), "prompts 'release'"), (dict(show_k=2), "show_k 5")]:
        with pytest.raises(ValueError, match=named):
            ensure_world(Config(world_dir=str(world), world_seed=3, mode="steps", **change))


def test_plot_draws_a_run_and_says_in_one_line_when_matplotlib_is_missing(tmp_path, world, model_cache, monkeypatch,
                                                                          capsys):
    import plot
    sg.main(["--config", str(run_config(tmp_path, world, model_cache, "plotted", sft_steps=1, train_steps=2))])
    run = tmp_path / "plotted"
    warm_start_only = tmp_path / "warm-start-only"
    warm_start_only.mkdir()
    (warm_start_only / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(UserError, match="no GRPO update"):
        plot.plot_run(warm_start_only)
    out = plot.plot_run(run, tmp_path / "run.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails, as where it is not installed
    with pytest.raises(SystemExit):
        plot.main([str(run)])
    assert "pip install -r requirements-plot.txt" in capsys.readouterr().err
