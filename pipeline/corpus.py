"""Corpus stage: read documents from any supported source and cut them into token-aware chunks.

Sources: a folder of text/markdown files (recursive), JSONL or Parquet with id/title/text columns,
a BEIR folder, a Hugging Face dataset saved to disk, or the built-in 'sample' corpus (documentation of
installed standard-library modules: real text full of identifiers, present on every Python install).

Bad files inside a larger corpus are skipped and counted; a corpus with nothing usable is an error
that names the file.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import RetrofitError
from pipeline.models import resolve_embedder
from pipeline.storage import fingerprint_listing, is_remote, local_copy

log = logging.getLogger("retrofit.corpus")

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text"}
CHUNK_SCHEMA = pa.schema([
    ("chunk_id", pa.string()), ("doc_id", pa.string()), ("title", pa.string()),
    ("text", pa.string()), ("chunk_index", pa.int32()), ("n_tokens", pa.int32()),
])


class CorpusError(RetrofitError):
    """Nothing usable could be read; the message names the file."""


@dataclass
class Document:
    doc_id: str
    title: str
    text: str
    parent_id: str | None = None  # pre-chunked input: the document a chunk came from


@dataclass
class ReadReport:
    """What was read and what was skipped (and why), for the manifest."""
    documents: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count
    examples: list = field(default_factory=list)  # first few "path: reason"

    def skip(self, where: str, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < 10:
            self.examples.append(f"{where}: {reason}")
        log.warning("skipped %s: %s", where, reason)


# ---------------------------------------------------------------- sources

def detect_format(path: str) -> str:
    if path == "sample":
        return "sample"
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"corpus not found: {p}")
    if p.is_dir():
        if (p / "corpus.jsonl").exists():
            return "beir"
        if (p / "dataset_info.json").exists() or (p / "state.json").exists():
            return "hf"
        return "folder"
    if p.suffix == ".jsonl":
        return "jsonl"
    if p.suffix == ".parquet":
        return "parquet"
    raise CorpusError(f"{p}: unsupported corpus file type {p.suffix!r} (use a folder, .jsonl, .parquet or a BEIR folder)")


def _read_text_file(path: Path, report: ReadReport) -> str | None:
    data = path.read_bytes()
    if not data.strip():
        report.skip(str(path), "empty file")
        return None
    if b"\x00" in data[:8192]:
        report.skip(str(path), "binary file")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        report.skip(str(path), f"not UTF-8 (byte {e.start})")
        return None


def _title_of(text: str, fallback: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line:
            break
    return fallback


def read_folder(root: Path, report: ReadReport) -> Iterator[Document]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise CorpusError(f"{root}: corpus folder is empty")
    for p in files:
        if p.suffix.lower() not in TEXT_SUFFIXES:
            report.skip(str(p), f"not a text file ({p.suffix or 'no suffix'})")
            continue
        text = _read_text_file(p, report)
        if text is not None:
            yield Document(str(p.relative_to(root)), _title_of(text, p.stem), text)


def _row_to_document(row: dict, where: str, report: ReadReport) -> Document | None:
    doc_id = row.get("id", row.get("_id"))
    text = row.get("text")
    if doc_id is None or doc_id == "":
        report.skip(where, "missing field 'id' (or '_id')")
        return None
    if not isinstance(text, str) or not text.strip():
        report.skip(where, "missing or empty field 'text'")
        return None
    parent = row.get("doc_id")
    return Document(str(doc_id), str(row.get("title") or ""), text, str(parent) if parent is not None else None)


def read_jsonl(path: Path, report: ReadReport) -> Iterator[Document]:
    try:
        fh = open(path, encoding="utf-8")
        with fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    report.skip(where, f"invalid JSON ({e.msg})")
                    continue
                if not isinstance(row, dict):
                    report.skip(where, "row is not a JSON object")
                    continue
                doc = _row_to_document(row, where, report)
                if doc is not None:
                    yield doc
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text (byte {e.start})") from None


def read_parquet(path: Path, report: ReadReport) -> Iterator[Document]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None
    names = set(pf.schema_arrow.names)
    if "text" not in names or not ({"id", "_id"} & names):
        raise CorpusError(f"{path}: needs columns 'id' (or '_id') and 'text'; found {sorted(names)}")
    row_no = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            doc = _row_to_document(row, f"{path} row {row_no}", report)
            row_no += 1
            if doc is not None:
                yield doc


def read_beir(root: Path, report: ReadReport) -> Iterator[Document]:
    corpus = root / "corpus.jsonl"
    if not corpus.exists():
        raise CorpusError(f"{root}: not a BEIR folder (no corpus.jsonl)")
    yield from read_jsonl(corpus, report)


def read_hf(root: Path, report: ReadReport) -> Iterator[Document]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(root))
    except Exception as e:
        raise CorpusError(f"{root}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next(iter(ds))]
    for i, row in enumerate(ds):
        doc = _row_to_document(row, f"{root} row {i}", report)
        if doc is not None:
            yield doc


# Well-documented modules whose docs are long, stable and full of identifiers.
SAMPLE_MODULES = (
    "json", "csv", "argparse", "pathlib", "itertools", "functools", "collections", "datetime", "re",
    "textwrap", "shutil", "subprocess", "logging", "heapq", "bisect", "statistics", "fractions",
    "decimal", "zipfile", "tarfile", "gzip", "hashlib", "hmac", "secrets", "uuid", "base64", "struct",
    "string", "difflib", "pprint", "enum", "dataclasses", "contextlib", "abc", "copy", "operator",
    "random", "math", "tempfile", "glob", "fnmatch", "sqlite3", "pickle", "shelve", "configparser",
    "calendar", "locale", "urllib.parse", "http.client", "socket", "selectors", "threading",
    "queue", "sched", "asyncio", "inspect", "traceback", "warnings", "weakref", "typing",
)


def sample_documents(n: int, max_chars: int = 2500) -> Iterator[Document]:
    """Documentation of installed standard-library modules, one document per module."""
    for name in SAMPLE_MODULES[:n]:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        parts = [inspect.getdoc(mod) or ""]
        for attr in sorted(getattr(mod, "__all__", None) or [a for a in dir(mod) if not a.startswith("_")]):
            obj = getattr(mod, attr, None)
            doc = inspect.getdoc(obj) if callable(obj) else None
            if not doc or getattr(obj, "__module__", name) not in (name, None):
                continue
            try:
                sig = str(inspect.signature(obj))
            except (TypeError, ValueError):
                sig = ""
            parts.append(f"{name}.{attr}{sig}: {doc}")
        text = "\n\n".join(p for p in parts if p)[:max_chars]
        if text.strip():
            yield Document(f"stdlib/{name}", f"Python {name} module", text)


def read_documents(path: str, fmt: str, sample_docs: int, report: ReadReport) -> Iterator[Document]:
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "sample":
        return sample_documents(sample_docs)
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"corpus not found: {p}")
    readers = {"folder": read_folder, "jsonl": read_jsonl, "parquet": read_parquet, "beir": read_beir,
               "hf": read_hf}
    return readers[fmt](p, report)


# ---------------------------------------------------------------- chunking

class Chunker:
    """Token-aware windows cut from the original text (so chunks keep exact wording)."""

    def __init__(self, tokenizer_path: str, chunk_tokens: int, overlap: int):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_path)
        self.size, self.stride = chunk_tokens, chunk_tokens - overlap

    def split(self, text: str) -> list[tuple[str, int]]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = enc["offset_mapping"]
        if len(offsets) <= self.size:
            return [(text.strip(), len(offsets))]
        chunks = []
        for start in range(0, len(offsets), self.stride):
            window = offsets[start:start + self.size]
            chunks.append((text[window[0][0]:window[-1][1]].strip(), len(window)))
            if start + self.size >= len(offsets):
                break
        return chunks


def write_chunks(docs: Iterator[Document], out_path: Path, chunker: Chunker | None,
                 max_docs: int | None, report: ReadReport) -> int:
    """Stream documents into chunks.parquet; returns the number of chunks. `chunker=None` keeps rows as chunks."""
    tmp = out_path.with_suffix(".tmp")
    writer = pq.ParquetWriter(tmp, CHUNK_SCHEMA)
    rows: list[dict] = []
    n_chunks = 0
    seen_ids: set[str] = set()
    for doc in docs:
        if max_docs is not None and report.documents >= max_docs:
            break
        if doc.doc_id in seen_ids:
            report.skip(doc.doc_id, "duplicate id")
            continue
        seen_ids.add(doc.doc_id)
        report.documents += 1
        pieces = [(doc.text.strip(), -1)] if chunker is None else chunker.split(doc.text)
        for i, (text, n_tok) in enumerate(pieces):
            if not text:
                continue
            chunk_id = doc.doc_id if chunker is None else f"{doc.doc_id}#{i}"
            rows.append({"chunk_id": chunk_id, "doc_id": doc.parent_id or doc.doc_id, "title": doc.title, "text": text,
                         "chunk_index": i, "n_tokens": n_tok})
        if len(rows) >= 2048:
            writer.write_table(pa.Table.from_pylist(rows, CHUNK_SCHEMA))
            n_chunks += len(rows)
            rows = []
    if rows:
        writer.write_table(pa.Table.from_pylist(rows, CHUNK_SCHEMA))
        n_chunks += len(rows)
    writer.close()
    if n_chunks == 0:
        tmp.unlink(missing_ok=True)
        detail = "; ".join(report.examples[:3]) or "no documents found"
        raise CorpusError(f"no usable documents in the corpus ({detail})")
    tmp.rename(out_path)
    return n_chunks


def run_stage(cfg, run, rec) -> None:
    c = cfg.corpus
    report = ReadReport()
    chunker = None if c.prechunked else Chunker(resolve_embedder(cfg.train.base_model), c.chunk_tokens,
                                                c.chunk_overlap)
    docs = read_documents(str(local_copy(c.path)), c.format, c.sample_docs, report)  # a bucket: fetched first
    n_chunks = write_chunks(docs, rec.output("chunks.parquet"), chunker, c.max_docs, report)
    rec.manifest.counts = {"documents": report.documents, "chunks": n_chunks, "skipped": report.skipped,
                           "skipped_examples": report.examples}
    print(f"[corpus] {report.documents} documents -> {n_chunks} chunks"
          + (f"; skipped {sum(report.skipped.values())} ({report.skipped})" if report.skipped else ""))


def input_fingerprint(cfg) -> str:
    """What the corpus stage reads: the source files (size + mtime: cheap for large corpora)."""
    import hashlib

    if cfg.corpus.path == "sample":
        import sys

        return f"sample-{sys.version_info[0]}.{sys.version_info[1]}"
    if is_remote(cfg.corpus.path):  # the bucket's listing: nothing is downloaded to see whether it changed
        listing = fingerprint_listing(cfg.corpus.path)
        if not listing:
            raise CorpusError(f"corpus not found: {cfg.corpus.path}")
    else:
        p = Path(cfg.corpus.path)
        if not p.exists():
            raise CorpusError(f"corpus not found: {p}")
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        listing = [(str(f.relative_to(p)) if p.is_dir() else f.name, f.stat().st_size, f.stat().st_mtime_ns)
                   for f in files]
    h = hashlib.sha256()
    for name, size, mtime in listing:
        h.update(f"{name}:{size}:{mtime}".encode())
    return h.hexdigest()[:16]
