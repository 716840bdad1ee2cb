"""Data: official files, the mini world, gold experts found by real retrieval, step files, bad input."""
import hashlib
import json
from pathlib import Path

import pytest

import data
from conftest import SAMPLES
from world import QUESTION_KINDS, build_world, label_gold_experts, write_world

# ------------------------------------------------------------------------------------ official files


# The samples' rows (the release's files: 3000, 715, 1000, 3000, 1000, 1000; docs/PROTOCOL.md).
@pytest.mark.parametrize("name,count", [("2wikimultihopqa", 25), ("dyn_vqa", 25), ("infoseek", 25),
                                        ("openwikitqa", 22), ("tabfact", 25), ("webqa", 25)])
def test_benchmark_files_load_with_counts(name, count):
    questions = data.load_benchmark(name, SAMPLES / data.BENCHMARKS[name][0])
    assert len(questions) == count and all(q.question and q.answers for q in questions)


def test_benchmark_field_mapping():
    wiki = data.load_benchmark("2wikimultihopqa", SAMPLES / "2wikimultihopqa_val.jsonl")
    assert wiki[0].answers == ["Małgorzata Braunek"] and wiki[0].image is None
    infoseek = data.load_benchmark("infoseek", SAMPLES / "infoseek_val.jsonl")
    assert infoseek[0].qid == "infoseek_val_00000000" and infoseek[0].answers == ["energy transformation"]
    assert infoseek[0].answer_eval == ["energy conversion", "energy transformation", "conversion"]
    ranged = [q for q in infoseek if q.answer_eval and isinstance(q.answer_eval[0], dict)]
    assert ranged and "range" in ranged[0].answer_eval[0]  # numeric ranges kept intact
    dyn = data.load_benchmark("dyn_vqa", SAMPLES / "DynVQA_en.202412.jsonl")
    assert dyn[0].qid == "en1" and len(dyn[0].answers) == 2


def test_official_step_file_counts_and_images():
    """Ten trajectories of the release's step file (119 trajectories, 758 steps: 346 plan, 293
    answer, 119 final, 203 with an image; docs/PROTOCOL.md)."""
    samples = data.load_step_file(SAMPLES / "grpo_dataset_valid_new.jsonl")
    assert len({s.trajectory for s in samples}) == 10 and len(samples) == 50
    assert sum(s.kind == "plan" for s in samples) == 24
    assert sum(s.kind == "final" for s in samples) == 10
    assert sum(any(p["type"] == "image" for p in s.parts) for s in samples) == 23
    first = samples[0]
    assert first.kind == "plan" and first.gold["retriever"] == ["text retriever"]
    assert first.parts == [{"type": "text", "text": first.parts[0]["text"]}]  # text-only: no dummy image
    pictured = next(s for s in samples if any(p["type"] == "image" for p in s.parts))
    assert pictured.parts[1]["image"].endswith(".jpg")


# ----------------------------------------------------------------------------------------- the world


def tree_digest(folder: Path, skip=("index.bin",)) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def test_world_is_byte_identical_for_a_seed(tmp_path):
    write_world(tmp_path / "a", seed=5, n_towns=10, per_kind=4)
    write_world(tmp_path / "b", seed=5, n_towns=10, per_kind=4)
    write_world(tmp_path / "c", seed=6, n_towns=10, per_kind=4)
    digest_a = tree_digest(tmp_path / "a")
    assert digest_a == tree_digest(tmp_path / "b") and digest_a != tree_digest(tmp_path / "c")


def test_labelled_world_files_are_identical_for_a_seed(world, tmp_path):
    build_world(tmp_path, seed=3, n_towns=15, per_kind=6)
    assert tree_digest(world) == tree_digest(tmp_path)


def test_every_kind_in_every_split_and_no_shared_questions(world):
    splits = {name: data.load_questions(world / f"questions_{name}.jsonl") for name in ("train", "validation", "test")}
    for questions in splits.values():
        assert {q.kind for q in questions} == set(QUESTION_KINDS)
    texts = [{(q.question, tuple(h.sub_question for h in q.hops)) for q in qs} for qs in splits.values()]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert {len(q.hops) for qs in splits.values() for q in qs} == {1, 2, 3}


def test_gold_documents_contain_the_sub_answers(world):
    from experts import document_text, read_corpus
    docs = {}
    for kind in ("text", "image", "table"):
        docs.update({d["id"]: document_text(d, kind) for d in read_corpus(world / "corpora" / f"{kind}.jsonl", kind,
                                                                                   images_anywhere=True)})
    questions = data.load_questions(world / "questions_train.jsonl")
    for q in questions:
        for hop in q.hops:
            assert hop.gold_docs and all(hop.sub_answer in docs[d] for d in hop.gold_docs), hop
        assert q.answers[0] == q.hops[-1].sub_answer or q.kind == "compare"


def test_gold_experts_come_from_real_retrieval(world):
    questions = [q for split in ("train", "validation", "test")
                 for q in data.load_questions(world / f"questions_{split}.jsonl")]
    labels = {(q.kind, i): h.gold_experts for q in questions for i, h in enumerate(q.hops)}
    assert labels[("table_number", 0)] == ["table"]  # populations exist only in tables
    assert labels[("image_fact", 0)] == ["image"]  # which town is pictured: only the picture tells
    assert labels[("both_fact", 0)] == ["text", "table"]  # founding years are in passages and tables
    assert labels[("image_fact", 1)] == ["text"]


def test_labels_change_when_an_expert_loses_the_evidence(world):
    """The label is what retrieval finds: an index without the tables cannot be labelled table."""
    from experts import Expert
    text_only = [Expert.load(world / "indexes" / "text")]
    questions = [q for q in data.load_questions(world / "questions_test.jsonl") if q.kind in ("both_fact", "table_number")]
    label_gold_experts(questions, text_only, k=10, image_dir=world)
    assert {tuple(q.hops[0].gold_experts) for q in questions if q.kind == "both_fact"} == {("text",)}
    assert {tuple(q.hops[0].gold_experts) for q in questions if q.kind == "table_number"} == {()}


def test_generated_step_files_load_through_the_official_loader(world):
    samples = data.load_step_file(world / "steps_train.jsonl")
    questions = data.load_questions(world / "questions_train.jsonl")
    assert sum(s.kind == "final" for s in samples) == len(questions)
    assert sum(s.kind == "plan" for s in samples) == sum(len(q.hops) + 1 for q in questions)
    plan = next(s for s in samples if s.kind == "plan")
    assert "Text Retriever, Text Image Retriever, Table Retriever" in plan.system
    answer = next(s for s in samples if s.kind == "answer")
    assert "ter-0:" in answer.parts[-1]["text"] or "tar-0:" in answer.parts[-1]["text"] or "tir-0:" in answer.parts[-1]["text"]
    pictured = next(s for s in samples if s.parts[0]["type"] == "image")
    assert Path(pictured.parts[0]["image"]).exists()


# ----------------------------------------------------------------------------------------- bad input


def write_lines(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_benchmark_rows_name_file_line_and_field(tmp_path):
    good = {"question": "q?", "answer": "a"}
    path = write_lines(tmp_path / "wiki.jsonl", [good, {"question": "q?"}])
    with pytest.raises(ValueError, match=r"wiki.jsonl:2: missing field 'answer'"):
        data.load_benchmark("2wikimultihopqa", path)
    path = write_lines(tmp_path / "web.jsonl", [{"question": "q?", "answer": "not a list", "image_id": "1"}])
    with pytest.raises(ValueError, match=r"web.jsonl:1: field 'answer' must be list"):
        data.load_benchmark("webqa", path)
    path = write_lines(tmp_path / "web2.jsonl", [{"question": "q?", "answer": ["a"], "image_id": "404"}])
    with pytest.raises(ValueError, match=r"web2.jsonl:1: field 'image_id': image file .*404.jpg not found"):
        data.load_benchmark("webqa", path, image_root=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'hotpot'"):
        data.load_benchmark("hotpot", path)


def test_bad_step_rows_name_file_line_and_field(tmp_path):
    step = {"step_type": "ret", "system": "s", "problem": "p", "answer": {"query": "q", "retriever": ["x"]}}
    path = write_lines(tmp_path / "steps.jsonl", [{"images": [], "steps": [step]}, {"images": [], "steps": [dict(step, step_type="act")]}])
    with pytest.raises(ValueError, match=r"steps.jsonl:2 step 0: field 'step_type'"):
        data.load_step_file(path)
    path = write_lines(tmp_path / "s2.jsonl", [{"images": [], "steps": [dict(step, problem="<image> what?")]}])
    with pytest.raises(ValueError, match=r"s2.jsonl:1 step 0: field 'problem' has 1 <image> but 'images' has 0"):
        data.load_step_file(path)
    path = write_lines(tmp_path / "s3.jsonl", [{"steps": []}])
    with pytest.raises(ValueError, match=r"s3.jsonl:1: missing field 'images'"):
        data.load_step_file(path)
