"""bench.py: the phase breakdown accounts for the whole update, and the standard workload is exact."""
import json

import bench
from config import load_config


def test_training_breakdown_accounts_for_the_update(world, model_cache, tmp_path, capsys):
    """The phases, timed inside the real code, cover the update: what no phase accounts for is a
    small remainder. Fails if a phase goes untimed (say generation: half the update) or if a phase is
    timed twice (the remainder turns negative)."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model_name": "tiny", "model_cache": model_cache, "device": "cpu",
                                  "world_dir": str(world), "world_seed": 3, "questions_per_step": 2, "group_size": 2, "max_steps": 1,
                                  "max_new_tokens_plan": 16, "max_new_tokens_answer": 8, "beta": 0.04}))
    out = tmp_path / "bench.json"
    bench.main(["--config", str(config), "--steps", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    phases = result["phases"]
    assert set(bench.PHASES) <= set(phases)
    for name in ("generation", "reference forward", "policy forward", "backward", "optimizer"):
        assert phases[name] > 0, name
    assert 0 <= phases["other (parsing, bookkeeping)"] < 0.2 * result["step_s"]  # measured: under 1%
    assert result["work"]["sequences"] >= 2 * 2 * 2  # a plan and a final step per trajectory at least
    assert result["memory"]["peak_rss_gb"] > 0
    printed = capsys.readouterr().out
    assert "| generation |" in printed and "work per update: B=2 x G=2" in printed


def test_standard_workload_is_the_fixed_work(model_cache):
    result = bench.bench_standard(steps=1, load_in_4bit=True, model_cache=model_cache)
    work = result["work"]
    assert work["sequences"] == 16 and work["sequences_with_image"] == 16
    assert work["completion_tokens_mean"] == 32 and work["completion_tokens_max"] == 32  # exactly 32, no early stop
    assert work["image_tokens_per_image"] == [4]  # 56x56 pixels = 2x2 patches of 28 after the merge
    assert result["phases"]["reference forward"] > 0  # beta = 0.04: the reference is computed
    assert result["config"]["lora_r"] == 8


def test_weight_count_matches_the_unquantised_architecture(model_cache, tmp_path, capsys):
    """NF4 packs two values per byte: the counted parameters must still be the architecture's own."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    import more
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model_name": "tiny", "model_cache": model_cache, "device": "cpu",
                                  "load_in_4bit": True, "lora_r": 4, "train_lm_head": False}))
    result = bench.bench_weights(str(config), [], None)
    path = more.resolve_model_path(load_config(str(config)))
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    linear = [m for name, m in plain.named_modules()
              if isinstance(m, torch.nn.Linear) and "language_model" in name and name.split(".")[-1] in
              ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
    parts = result["parts"]
    nf4 = parts["language model linear layers, NF4"]
    assert nf4["params"] == sum(m.weight.numel() for m in linear)
    assert nf4["bytes"] > nf4["params"] / 2  # the packed values, plus the quantisation state
    lora = parts["trainable (LoRA)"]
    assert lora["params"] == sum(4 * (m.in_features + m.out_features) for m in linear)
    assert sum(p["params"] for p in parts.values()) == sum(p.numel() for p in plain.parameters()) + lora["params"]
    assert result["training_state"] == dict(gradients_fp32=4 * lora["params"], optimizer=8 * lora["params"])
    bench.print_weights(result)
    assert "| language model linear layers, NF4 |" in capsys.readouterr().out


def test_the_gpu_command_runs_end_to_end_on_a_cpu(world, model_cache, tmp_path, capsys):
    """`bench.py gpu` takes the tiny preset on a CPU through the path a GPU takes with the 3B and 7B:
    steps mode on the release's sample step file, an update's memory and phases, decode speed and
    its bandwidth bound, and the larger preset's memory."""
    out = tmp_path / "gpu.json"
    bench.main(["gpu", "--device", "cpu", "--steps", "1", "--model_cache", model_cache, "--world_dir", str(world), "--world_seed", "3",
                "--questions_per_step", "2", "--group_size", "2", "--max_new_tokens_plan", "8",
                "--max_new_tokens_answer", "8", "--beta", "0.04", "--json", str(out)])
    result = json.loads(out.read_text())
    small = result["small"]
    assert small["config"]["mode"] == "steps" and small["work"]["sequences"] == 4
    assert small["phases"]["generation"] > 0 and small["phases"]["reference forward"] > 0
    assert small["decode_bytes"] > 0 and result["bandwidth_gb_s"] > 0
    assert result["decode_bound_tokens_s"] > small["sampled_tokens_per_s"] > 0
    assert result["large"]["peak_rss_gb"] > 0
    assert "tokens/s sampled; bound" in capsys.readouterr().out
