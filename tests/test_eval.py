"""The official F1-Recall metric, rule by rule, on hand-worked cases; and the scoring command."""
import json

import pytest

import eval as ev
import metric
from conftest import SAMPLES



def test_newlines_tabs_and_case():
    assert metric.tokens("  Paris\n\tFrance ") == ("paris", "france")


def test_punctuation_replaced_by_space_when_never_next_to_a_space():
    assert metric.normalise("new-york") == "new york"
    assert metric.normalise("a/b") == "a b"


def test_punctuation_deleted_everywhere_when_one_occurrence_touches_a_space():
    # "- " occurs once, so every "-" is deleted, the unspaced one in "x-y" too.
    assert metric.normalise("x-y - z") == "xy z"


def test_digit_comma_digit_anywhere_deletes_all_punctuation():
    # "1,000" is digit,digit: so "(" and ")" are deleted, not spaced, even though never near a space.
    assert metric.normalise("1,000(approx)") == "1000approx"
    assert metric.normalise("a,b(c)") == "a b c"


def test_periods_deleted_unless_before_a_digit_and_at_most_32():
    assert metric.normalise("St. Louis 3.5") == "st louis 3.5"
    text = "." * 40
    assert metric.strip_punctuation(text) == "." * 8  # 32 deleted, 8 left


def test_articles_an_and_the_dropped_but_not_a():
    assert metric.normalise("The cat an owl a dog") == "cat owl a dog"


def test_number_words_become_digits():
    assert metric.normalise("Three or none or ten") == "3 or 0 or 10"


def test_contractions_expanded():
    assert metric.normalise("dont") == "don't"
    assert metric.normalise("Whats up") == "what's up"


def test_tokens_drop_punctuation_only_tokens():
    assert metric.tokens("yes: it's 'ok'") == ("yes", "it", "'s", "ok")


def test_recall_precision_f1_multiset():
    s = metric.score("paris paris france", ["paris"])
    assert s.recall == 1.0 and s.f1 == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))


def test_best_f1_gold_is_kept_and_its_recall_reported():
    # Gold 1: pred {red car} vs {red} → P .5 R 1 F1 .667. Gold 2: {red, car, big} → P 1 R .667 F1 .8.
    s = metric.score("red car", ["red", "big red car"])
    assert s.f1 == pytest.approx(0.8) and s.recall == pytest.approx(2 / 3)


def test_ties_keep_the_first_gold():
    # Both golds give F1 2/3; the first (recall 1) is kept, not the second (recall 0.5).
    s = metric.score("a b", ["a", "a b c d"])
    assert s.f1 == pytest.approx(2 / 3) and s.recall == 1.0


def test_empty_prediction_scores_zero():
    assert metric.score("", ["x"]).recall == 0 and metric.score("   ", ["x"]).f1 == 0
    assert metric.score("the", ["the"]).recall == 0  # normalises to nothing


def test_exact_match_and_accuracy():
    s = metric.score("The Eiffel Tower", ["eiffel tower"])
    assert s.exact == 1 and s.accuracy == 1
    s = metric.score("Eiffel Tower in Paris", ["eiffel tower"])
    assert s.exact == 0 and s.accuracy == 1 and s.recall == 1


def test_infoseek_range_grid_and_integers():
    golds = metric.infoseek_range_golds(6.5, 7.0)  # span < 1: step 0.001
    assert golds[:3] == ["6.5", "6.501", "6.502"] and "7.0" in golds and "6" in golds and "7" in golds
    wide = metric.infoseek_range_golds(112.0, 158.0)  # span 46 >= 5: step 0.1
    assert "135.3" in wide and "140" in wide
    assert metric.infoseek_range_golds(0, 100)[:2] == ["0", "1"]  # span >= 50: step 1
    row = {"answer_eval": [{"wikidata": 6.75, "range": [6.5, 7.0]}]}
    assert metric.score("about 6.75 days", metric.golds_of("infoseek", row)).recall == 1.0


@pytest.mark.parametrize("dataset,file,expected", [
    ("2wikimultihopqa", "2wikimultihopqa_val.jsonl", 100.0), ("dyn_vqa", "DynVQA_en.202412.jsonl", 100.0),
    ("openwikitqa", "openwikitqa_val.jsonl", 100.0), ("tabfact", "tabfact_val.jsonl", 100.0),
    ("webqa", "webqa_val.jsonl", 100.0), ("infoseek", "infoseek_val.jsonl", 100.0)])
def test_gold_answers_score_themselves(dataset, file, expected, tmp_path, capsys):
    rows = [json.loads(line) for line in open(SAMPLES / file)]
    for row in rows:
        answer = row["answer"][0] if isinstance(row["answer"], list) else row["answer"]
        row["llm_answer"] = {"answer": str(answer)}
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev.main(["score", "--dataset", dataset, "--predictions", str(path), "--subset"])
    assert capsys.readouterr().out.splitlines()[0] == f"F1-Recall: {expected:.2f}"


def test_scoring_errors_name_the_line(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a", "llm_answer": "a"}) + "\n" +
                    json.dumps({"question": "r", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: missing field 'llm_answer'"):
        metric.score_file("tabfact", path, subset=True)
    with pytest.raises(ValueError, match="unknown dataset 'vqa2'"):
        metric.score_file("vqa2", path)
    path.write_text("")
    with pytest.raises(ValueError, match="empty"):
        metric.score_file("tabfact", path)
    path.write_text(json.dumps({"question": "q", "llm_answer": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: missing field 'answer'"):
        metric.score_file("webqa", path, subset=True)
    with pytest.raises(SystemExit):
        ev.main(["score", "--dataset", "webqa", "--predictions", str(path), "--subset"])
    assert "eval.py score: error: " in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The loop evaluated: routing methods side by side on the mini world.

import data  # noqa: E402
from config import Config  # noqa: E402


def world_config(world, model_cache, **overrides):
    return Config(model_name="tiny", model_cache=model_cache, device="cpu", world_dir=str(world), world_seed=3,
                  index_dir=str(world / "indexes"), **overrides)


def test_routers_replace_only_the_choice_they_own(world):
    question = next(q for q in data.load_questions(world / "questions_train.jsonl") if q.kind == "bridge")
    kinds = ["text", "image", "table"]
    hops = question.hops
    assert ev.make_router("policy", kinds, 0, gold_sub_questions=False) is None
    assert ev.make_router("single:table", kinds, 0, False)(hops, 0, "own?", ["text"]) == ("own?", ["table"])
    oracle = ev.make_router("oracle", kinds, 0, False)
    assert oracle(hops, 1, "own?", ["image"]) == ("own?", hops[1].gold_experts[:1])
    assert oracle(hops, 7, "own?", ["image"]) == ("own?", hops[-1].gold_experts[:1])  # past the plan: last hop
    with pytest.raises(ValueError, match="oracle"):
        oracle([], 0, "own?", ["text"])
    randomly = ev.make_router("random", kinds, 0, False)
    assert {randomly(hops, 0, "q", [])[1][0] for _ in range(60)} == set(kinds)
    gold = ev.make_router("policy", kinds, 0, gold_sub_questions=True)
    assert gold(hops, 0, "own?", ["image"]) == (hops[0].sub_question, ["image"])


def test_methods_are_checked_against_the_configured_experts():
    assert ev.parse_methods("direct, single:text,oracle", ["text", "table"]) == ["direct", "single:text", "oracle"]
    with pytest.raises(ValueError, match=r"single:image.*known: direct, random, oracle, policy, single:text"):
        ev.parse_methods("single:image", ["text"])


def test_oracle_routing_beats_every_single_expert_on_several_expert_questions(world, model_cache, tmp_path):
    """With the gold reader, a trajectory is right exactly when routing found all the evidence."""
    cfg = world_config(world, model_cache, max_steps=3)
    questions = data.load_questions(world / "questions_test.jsonl")
    methods = ["direct", "single:text", "single:image", "single:table", "random", "oracle"]
    records = ev.run_methods(cfg, questions, methods, None, False, tmp_path, str(world), gold_reader=True)
    table = ev.summarise(records)
    oracle = table["mini_world/oracle"]
    singles = [table[f"mini_world/single:{k}"] for k in ("text", "image", "table")]
    assert oracle["several_experts"]["n"] > 0
    for single in singles:
        assert oracle["several_experts"]["recall"] > single["several_experts"]["recall"]
        assert oracle["several_experts"]["evidence_recall"] > single["several_experts"]["evidence_recall"]
        assert oracle["recall"] > single["recall"]
    assert oracle["routing_accuracy"] == 100.0
    assert table["mini_world/direct"]["recall"] == 0.0 and table["mini_world/direct"]["expert_calls_per_question"] == 0
    # Every record holds its trace; the file holds every method's record for every question.
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(methods) * len(questions)
    assert all("Final answer:" in json.loads(line)["trace"] for line in lines)


def test_evaluation_command_with_the_tiny_policy(world, model_cache, tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model_name": "tiny", "model_cache": model_cache, "device": "cpu",
                                  "world_dir": str(world), "world_seed": 3, "max_steps": 1, "max_new_tokens_plan": 16,
                                  "max_new_tokens_answer": 8}))
    out = tmp_path / "eval"
    ev.main(["--config", str(config), "--split", "test", "--limit", "3", "--methods", "policy,single:table,direct",
             "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["mini_world/policy", "mini_world/single:table", "mini_world/direct"]
    assert all(row["n"] == 3 for row in summary.values())
    assert "| mini_world | single:table | 3 |" in (out / "summary.md").read_text()
    assert "F1-Recall" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--methods", "single:video"], "unknown method"),
    (["--split", "dev"], "no split 'dev'"),
    (["--policy", "gold-reader", "--methods", "policy"], "needs the model"),
])
def test_evaluation_command_errors_name_the_problem(world, model_cache, tmp_path, capsys, args, message):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model_name": "tiny", "model_cache": model_cache, "world_dir": str(world), "world_seed": 3}))
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["--config", str(config), "--out", str(tmp_path / "e"), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_gold_reader_runs_every_method_it_can_by_default(world, model_cache, tmp_path):
    """`eval.py --policy gold-reader` as the README writes it, without --methods: every method but
    `policy` (the gold reader has no routing of its own)."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model_name": "tiny", "model_cache": model_cache, "world_dir": str(world), "world_seed": 3}))
    out = tmp_path / "e"
    ev.main(["--config", str(config), "--policy", "gold-reader", "--max_steps", "3", "--limit", "4", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert [name.split("/")[1] for name in summary] == ["direct", "single:text", "single:image", "single:table",
                                                        "random", "oracle"]
    assert summary["mini_world/oracle"]["recall"] == 100.0
