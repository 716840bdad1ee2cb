"""Experts: real offline encoder, hnswlib indexes, batched search, save/load, and bad input."""
import json

import numpy as np
import pytest

import experts
from conftest import random_image
from config import UserError
from experts import Expert, HnswIndex, Query

PASSAGES = [
    {"id": "p1", "title": "Mount Korvath", "text": "Mount Korvath is a volcano whose summit rises 4,210 metres above sea level."},
    {"id": "p2", "title": "Lake Imren", "text": "Lake Imren is a freshwater lake famous for its migrating pink flamingos."},
    {"id": "p3", "title": "Oskar Vale", "text": "Oskar Vale was a composer who wrote eleven symphonies and two operas."},
    {"id": "p4", "title": "Brightwater Bridge", "text": "The Brightwater Bridge is a steel suspension bridge opened to traffic in 1931."},
    {"id": "p5", "title": "Tallis Academy", "text": "Tallis Academy is a university known for its school of marine biology."},
]
PARAPHRASES = {"How high is the peak of Korvath?": "p1", "Which birds visit Lake Imren?": "p2",
               "Who composed many symphonies?": "p3", "When did the suspension bridge open?": "p4",
               "Where can I study ocean life?": "p5"}
TABLES = [
    {"id": "t1", "title": "Population of river towns", "header": ["town", "population"],
     "rows": [["Arlen", 5200], ["Bexley", 13100]]},
    {"id": "t2", "title": "Medal table of the winter games", "header": ["country", "gold", "silver"],
     "rows": [["Norland", 9, 4], ["Estria", 3, 7]]},
    {"id": "t3", "title": "Annual rainfall by month", "header": ["month", "millimetres"],
     "rows": [["January", 81], ["July", 12]]},
]


@pytest.fixture(scope="module")
def encoder():
    return experts.TextEncoder("minilm")


@pytest.fixture(scope="module")
def text_expert(encoder):
    return Expert.build("text", PASSAGES, encoder, progress=False)


@pytest.fixture(scope="module")
def image_expert(encoder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    docs = []
    for i, caption in enumerate(["a red lighthouse on a cliff", "a green tram in the city",
                                 "a striped blue kite", "a yellow windmill in a field"]):
        random_image(100 + i, (64, 64)).save(folder / f"{i}.png")
        docs.append({"id": f"i{i}", "image": str(folder / f"{i}.png"), "text": caption})
    return Expert.build("image", docs, encoder, experts.PixelImageEncoder(), progress=False)


def test_text_expert_finds_paraphrased_passages(text_expert):
    hits = text_expert.search(list(PARAPHRASES), k=3)
    assert [h[0].doc_id for h in hits] == list(PARAPHRASES.values())
    assert all(h[0].expert == "text" and h[0].text.startswith(d["title"]) for h, d in
               zip(hits, PASSAGES))
    assert all(h[0].score >= h[1].score for h in hits)


def test_table_expert_finds_tables_and_flattens_them(encoder):
    expert = Expert.build("table", TABLES, encoder, progress=False)
    hits = expert.search(["how many people live in Bexley", "gold medals won by Norland",
                          "how much rain falls in July"], k=2)
    assert [h[0].doc_id for h in hits] == ["t1", "t2", "t3"]
    assert hits[0][0].text == "[Title] Population of river towns [Header] town | population [Row] Arlen | 5200 [Row] Bexley | 13100"


def test_image_expert_by_image_by_text_and_by_both(image_expert):
    # A resized, lightly noised copy of image 2 still finds it: the pixel encoder matches near-duplicates.
    noisy = np.asarray(random_image(102, (64, 64)).resize((90, 90)), dtype=np.int16)
    noisy = np.clip(noisy + np.random.RandomState(0).randint(-12, 13, noisy.shape), 0, 255).astype(np.uint8)
    from PIL import Image
    by_image = image_expert.search([Query(image=Image.fromarray(noisy))], k=1)[0]
    by_text = image_expert.search([Query(text="which tram is green")], k=1)[0]
    both = image_expert.search([Query(text="kite", image=Image.fromarray(noisy))], k=1)[0]
    assert by_image[0].doc_id == "i2" and by_image[0].text == "a striped blue kite"
    assert by_text[0].doc_id == "i1" and both[0].doc_id == "i2"


def test_batched_search_equals_one_by_one(text_expert, image_expert):
    queries = list(PARAPHRASES) * 4  # B x G queries of one rollout step
    batched = text_expert.search(queries, k=5)
    single = []
    for q in queries:
        text_expert.text_encoder.recent.clear()  # encode each query alone, not from the batch's memory
        single.append(text_expert.search([q], k=5)[0])
    assert [[h.doc_id for h in r] for r in batched] == [[h.doc_id for h in r] for r in single]
    assert np.allclose([[h.score for h in r] for r in batched], [[h.score for h in r] for r in single], atol=1e-5)
    mixed = [Query("a kite"), Query(image=random_image(101, (64, 64))), Query("windmill", random_image(103, (64, 64)))]
    assert [r[0].doc_id for r in image_expert.search(mixed)] == [image_expert.search([q])[0][0].doc_id for q in mixed]


def test_query_memory_returns_what_encoding_returns_and_encodes_each_text_once(encoder):
    texts = ["Who founded Velora?", "population of Arlen", "Who founded Velora?"]
    encoder.recent.clear()
    calls = []
    encode = encoder.encode
    encoder.encode = lambda batch, progress=None: calls.append(list(batch)) or encode(batch, progress)
    try:
        first = encoder.encode_queries(texts)
        again = encoder.encode_queries(texts[:2])
    finally:
        del encoder.encode  # back to the method
    assert calls == [texts[:2]]  # one pass, duplicates and repeats not re-encoded
    assert np.allclose(first, encode(texts), atol=1e-5) and np.array_equal(again, first[:2])
    encoder.recent_size = 2  # full: the least recently used text goes
    encoder.encode_queries(["a new text"])
    assert list(encoder.recent) == ["population of Arlen", "a new text"]
    encoder.recent_size = 4096


def test_query_memory_past_capacity_keeps_what_the_call_needs(encoder):
    """The memory filled in the middle of a call used to drop texts the call still needed
    (a KeyError; in a rollout an expert call with no passages). Reproduced at capacity 8 instead of
    4,096: fill the memory with 8 distinct queries, then ask for one of them and a new one."""
    from step_grpo import SubQuestionSimilarity
    encoder.recent.clear()
    encoder.recent_size = 8
    try:
        encoder.encode_queries([f"sub-question {i}" for i in range(8)])
        similarity = SubQuestionSimilarity(encoder)("sub-question 0", "new")
        assert len(encoder.recent) == 8 and list(encoder.recent)[-2:] == ["sub-question 0", "new"]
        many = [f"query {i}" for i in range(20)]  # one call larger than the whole memory
        assert np.allclose(encoder.encode_queries(many), encoder.encode(many), atol=1e-5)
    finally:
        encoder.recent_size = 4096
    assert np.isclose(similarity, float(np.dot(*encoder.encode(["sub-question 0", "new"]))), atol=1e-5)


def test_save_load_gives_identical_results_and_restores_ef(text_expert, encoder, tmp_path):
    text_expert.index.ef = 37
    text_expert.save(tmp_path / "text")
    loaded = Expert.load(tmp_path / "text", text_encoder=encoder)
    assert loaded.index.ef == 37 and loaded.index.index.ef == 37
    queries = list(PARAPHRASES)
    before, after = text_expert.search(queries, k=5), loaded.search(queries, k=5)
    assert [[(h.doc_id, h.score) for h in r] for r in before] == [[(h.doc_id, h.score) for h in r] for r in after]
    text_expert.index.ef = 100


def test_hnsw_recall_against_exact_search_on_real_embeddings(encoder):
    rng = np.random.RandomState(0)
    words = "river town mountain bridge composer lake museum festival railway harbour castle forest".split()
    texts = [" ".join(rng.choice(words, 6)) + f" number {i}" for i in range(1500)]
    vectors = encoder.encode(texts)
    index = HnswIndex(encoder.dim)
    index.add(vectors)
    queries = vectors[:100] + 0.05 * rng.randn(100, encoder.dim).astype(np.float32)
    labels, _ = index.search(queries, 10)
    truth = experts.exact_search(vectors, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(labels, truth)])
    assert recall >= 0.98


# ------------------------------------------------------------------------------------- bad input

def test_empty_queries_get_empty_results(text_expert, image_expert):
    assert text_expert.search(["", "   "]) == [[], []]
    assert image_expert.search([Query()]) == [[]]
    assert text_expert.search([Query(image=random_image(1))]) == [[]]  # the text expert has no eyes
    assert text_expert.search([]) == []


def test_missing_index_directory_is_named(tmp_path):
    with pytest.raises(UserError, match="no expert index at .*nowhere"):
        Expert.load(tmp_path / "nowhere")


def test_index_and_metadata_mismatch(text_expert, encoder, tmp_path):
    text_expert.save(tmp_path / "x")
    lines = (tmp_path / "x" / "docs.jsonl").read_text().splitlines()
    (tmp_path / "x" / "docs.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="5 vectors but docs.jsonl has 4"):
        Expert.load(tmp_path / "x", text_encoder=encoder)


def test_encoder_dimension_mismatch(encoder):
    with pytest.raises(ValueError, match="384-d vectors but the index holds 448-d"):
        # An index built with another (448-d) encoder cannot be queried with MiniLM's 384-d vectors.
        Expert("text", HnswIndex(448), PASSAGES, encoder)


def test_corpus_line_that_is_not_json_names_file_and_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps(PASSAGES[0]) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: not valid JSON"):
        experts.read_corpus(path, "text")
    path.write_text(json.dumps({"id": "x", "title": "t"}) + "\n")
    with pytest.raises(ValueError, match=r"corpus.jsonl: 1 of 1 text documents refused.*document 1 .*lacks field 'text'"):
        experts.read_corpus(path, "text")


def test_unreadable_image_names_the_file(image_expert, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="bad.jpg"):
        image_expert.search([Query("kite", bad)])


def test_command_line_build_and_search(tmp_path, capsys):
    corpus = tmp_path / "passages.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in PASSAGES))
    experts.main(["build", "--kind", "text", "--corpus", str(corpus), "--out", str(tmp_path / "idx")])
    experts.main(["search", "--index", str(tmp_path / "idx"), "Which birds visit Lake Imren?", "-k", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("built text expert: 5 documents")
    assert lines[1].split()[0] == "1" and lines[1].split()[2] == "p2" and len(lines) == 3


def test_clip_image_encoder_code_path_with_a_tiny_random_clip(tmp_path):
    """The real CLIP path, on a CLIP built from a config (no weights can be downloaded here)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2), projection_dim=16,
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8))
    CLIPModel(config).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    encoder = experts.make_image_encoder(str(tmp_path))
    vectors = encoder.encode([random_image(i) for i in range(3)])
    assert vectors.shape == (3, 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
