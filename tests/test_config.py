"""Config: every field documented; bad keys, types and paths fail at start and say which."""
import json

import pytest

from config import Config, field_docs, load_config


def test_every_field_has_a_doc_line():
    import dataclasses
    docs = field_docs()
    assert {f.name for f in dataclasses.fields(Config)} == set(docs)
    assert all(docs.values())


def test_json_and_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lora_r": 4, "temperature": 1, "_comment": "ignored"}))
    cfg = load_config(str(path), ["--lora_r", "8", "--model-name", "tiny"])
    assert cfg.lora_r == 8 and cfg.temperature == 1.0 and isinstance(cfg.temperature, float)


def test_unknown_key_is_named_with_the_valid_keys(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lora_rank": 4}))
    with pytest.raises(ValueError, match=r"lora_rank.*valid keys:.*lora_r"):
        load_config(str(path))


def test_wrong_type_is_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"load_in_4bit": "yes"}))
    with pytest.raises(ValueError, match="load_in_4bit"):
        load_config(str(path))
    with pytest.raises(ValueError, match="lora_r"):
        load_config(None, ["--lora_r", "1.5"])


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="nowhere.json"):
        load_config(str(tmp_path / "nowhere.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_config(str(bad))


@pytest.mark.parametrize("name", ["tiny.json", "tiny-steps.json", "small.json", "reader.json"])
def test_shipped_configs_load(name):
    from conftest import ROOT
    load_config(str(ROOT / name))


def test_a_checkpoint_older_than_a_field_resumes_as_if_it_had_the_default():
    from dataclasses import asdict
    from config import resume_differences
    saved = {k: v for k, v in asdict(Config()).items() if k not in ("prompts", "world_seed")}
    assert resume_differences(saved, Config()) == ([], [])
    refused, _ = resume_differences(saved, Config(prompts="compact"))
    assert refused == ["prompts: checkpoint 'release', now 'compact'"]
