"""SDG stage: an LLM writes search queries for each chunk (synthetic data generation).

The LLM worker is a plain class: it loads one engine, takes a shard (a row range of chunks.parquet),
generates the configured number of queries of each type per chunk in batches, and writes the shard's QA rows to
`sdg/shards/shard-NNNNN.parquet` atomically. A finished shard file is never redone, which makes a
rerun after a crash resume exactly; QA ids are derived from chunk ids, so nothing is duplicated.
"""

from __future__ import annotations

import json
import logging
import os
import time
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.beir import passage_text
from pipeline.config import SDGConfig
from pipeline.errors import RetrofitError
from pipeline.llm import make_engine, prompt_messages
from pipeline.ray_runtime import map_shards, set_threads
from pipeline.rundir import RunDir

log = logging.getLogger("retrofit.sdg")

QA_SCHEMA = pa.schema([
    ("qa_id", pa.string()), ("query", pa.string()), ("chunk_id", pa.string()), ("doc_id", pa.string()),
    ("query_type", pa.string()), ("generator", pa.string()),
    ("related_chunk_ids", pa.list_(pa.string())),  # further positives of a multi-hop query (may be null)
])

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.yaml")


def load_prompts(path: str | None, wanted: dict[str, int]) -> dict[str, dict]:
    """The query-type templates (an editable YAML file); every type asked for must be defined there."""
    import yaml

    path = Path(path) if path else DEFAULT_PROMPTS
    try:
        prompts = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RetrofitError(f"sdg.prompts: cannot read {path}: {e}") from None
    for qtype, n in wanted.items():
        if n and qtype not in prompts:
            raise RetrofitError(f"sdg.query_types: type {qtype!r} is not defined in {path} "
                             f"(defined: {sorted(prompts)})")
        missing = [k for k in ("instruction", "example_text", "example_query") if n and k not in prompts[qtype]]
        if missing:
            raise RetrofitError(f"{path}: query type {qtype!r} lacks {missing}")
    return {t: prompts[t] for t, n in wanted.items() if n}


MAX_EXAMPLE_QUERIES = 8  # Promptagator's few-shot budget: enough for the style, short enough for small LLMs


def load_example_queries(path: str | None) -> list[str]:
    """Real queries whose style the LLM should copy (one per line; blank lines and '#' lines skipped)."""
    if not path:
        return []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RetrofitError(f"sdg.example_queries: cannot read {path}: {e}") from None
    queries = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not queries:
        raise RetrofitError(f"sdg.example_queries: {path} holds no query (one per line)")
    too_long = next((i for i, ln in enumerate(lines, 1) if len(ln.strip()) > 300), None)
    if too_long:
        raise RetrofitError(f"sdg.example_queries: {path} line {too_long} is over 300 characters: a query, "
                            "not a document, belongs on each line")
    return queries[:MAX_EXAMPLE_QUERIES]


def repetitive(query: str) -> bool:
    """A reply that loops ("What is timedelta? How to calculate timedelta()? How to implement
    timedelta()? ..."): three or more sentences, or one word of 4+ letters three times or more."""
    sentences = [x for x in re.split(r"(?<=[.?!])\s+", query.strip()) if x]
    words = re.findall(r"[a-z][a-z0-9_]{3,}", query.lower())
    return len(sentences) >= 3 or any(words.count(w) >= 3 for w in set(words))


def copies_example(query: str, examples: list[str]) -> bool:
    """A reply that echoes one of the prompt's examples (the worked one or the user's) instead of
    describing its own chunk: most of its words (Jaccard >= 0.6) are one example's words."""
    words = set(re.findall(r"\w+", query.lower()))
    for example in examples:
        other = set(re.findall(r"\w+", example.lower()))
        if words and other and len(words & other) / len(words | other) >= 0.6:
            return True
    return False


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z][a-z0-9-]{3,}", text.lower()))


def rare_example_words(examples: list[str], chunk_texts: list[str], max_share: float = 0.02) -> set[str]:
    """The user's example queries' topic words: those in under `max_share` of the chunks."""
    vocab = _words(" ".join(examples))
    if not vocab or not chunk_texts:
        return vocab
    counts = dict.fromkeys(vocab, 0)
    for text in chunk_texts:
        for w in vocab & _words(text):
            counts[w] += 1
    return {w for w, n in counts.items() if n < max_share * len(chunk_texts)}


def leaks_example(query: str, chunk_text: str, rare_words: set[str]) -> bool:
    """A reply that borrows the examples' topic (a small model given "Drosophila ... wing discs" as an
    example wrote Drosophila into a third of its claims about other abstracts): it uses a rare word
    of the examples that its own chunk does not contain."""
    return bool(_words(query) & rare_words - _words(chunk_text))


def wrong_shape(query: str, spec: dict) -> bool:
    """Chatter ("Sure, here is...") instead of the asked-for shape: a question needs '?', a claim none,
    a keyword query few words; a reply matching one of the type's reject_patterns talks about the task."""
    if spec.get("must_contain") and spec["must_contain"] not in query:
        return True
    if spec.get("max_words") and len(query.split()) > spec["max_words"]:
        return True
    if any(re.search(pattern, query, re.IGNORECASE) for pattern in spec.get("reject_patterns", [])):
        return True
    return bool(spec.get("must_not_contain") and spec["must_not_contain"] in query)

def talks_about_source(query: str, spec: dict) -> bool:
    """A reply about its source ("The abstract supports the claim that ...", "What does the study find?"):
    a user's query names the thing, never "the text" it came from."""
    return any(re.search(pattern, query, re.IGNORECASE) for pattern in spec.get("preambles", []))


_PREFIX = re.compile(r"^\s*(?:\d+[.)]\s*|[-*•]\s*|(?:question|query|q)\s*[:.-]\s*)", re.IGNORECASE)


def clean_query(raw: str, spec: dict | None = None) -> str:
    """First line of the model's reply, without numbering, labels, lead-ins or wrapping quotes."""
    spec = spec or {}
    line = next((ln for ln in raw.strip().splitlines() if ln.strip()), "")
    line = _PREFIX.sub("", line).strip().strip('"\'`').strip()
    for lead_in in spec.get("strip_lead_ins", []):
        line = re.sub(rf"^\s*{lead_in}\s*[:,]?\s*", "", line, flags=re.IGNORECASE)
    line = re.sub(r"\s+", " ", line).strip()
    if spec.get("first_sentence"):  # a claim: one sentence, capitalised again after a removed lead-in
        line = re.split(r"(?<=[.!])\s+(?=[A-Z])", line, maxsplit=1)[0]
        line = line[:1].upper() + line[1:]
    return line


def shard_tasks(n_rows: int, shard_size: int, done: set[int]) -> list[dict]:
    tasks = []
    for shard_id, start in enumerate(range(0, n_rows, shard_size)):
        if shard_id not in done:
            tasks.append({"shard_id": shard_id, "start": start, "stop": min(start + shard_size, n_rows)})
    return tasks


def finished_shards(shard_dir: Path) -> set[int]:
    return {int(p.stem.split("-")[1]) for p in shard_dir.glob("shard-*.parquet")}


def write_shard(table: pa.Table, shard_dir: Path, shard_id: int, summary: dict) -> None:
    """Stats sidecar first, then the Parquet file by atomic rename: the Parquet file marks 'done'."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    (shard_dir / f"shard-{shard_id:05d}.json").write_text(json.dumps(summary))
    final = shard_dir / f"shard-{shard_id:05d}.parquet"
    tmp = shard_dir / f".shard-{shard_id:05d}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, final)  # atomic: a killed worker leaves no half shard behind


def queries_for(n_tokens: int, n: int, reference_tokens: int | None) -> int:
    """Queries to keep for a chunk: n, or with sdg.length_reference_tokens set, n scaled by the chunk's
    length against that reference (at least 1, at most n: short chunks hold fewer distinct questions)."""
    if not reference_tokens or not n:
        return n
    return max(1, min(n, round(n * n_tokens / reference_tokens)))


def parse_json_queries(reply: str) -> tuple[list[str], int]:
    """Queries from a reply that should be a JSON list (of strings, or of objects with a 'query' field).

    Parsed item by item: a malformed item is counted and dropped, the others are kept; a reply that is
    not JSON at all (or cut off by the token limit) still yields the complete string items it holds."""
    start = reply.find("[")
    body = reply[start:] if start >= 0 else reply
    try:
        items = json.loads(body[:body.rfind("]") + 1]) if "]" in body else None
    except json.JSONDecodeError:
        items = None
    if not isinstance(items, list):  # salvage complete "..." strings from a broken or truncated list
        found = re.findall(r'"((?:[^"\\]|\\.)*)"', body)
        items = []
        for raw in found:
            try:
                items.append(json.loads(f'"{raw}"'))
            except json.JSONDecodeError:
                items.append(None)
        if not found:
            return [], 1
    queries, malformed = [], 0
    for item in items:
        if isinstance(item, dict):
            item = item.get("query") or item.get("question")
        if isinstance(item, str) and item.strip():
            queries.append(item.strip())
        else:
            malformed += 1
    return queries, malformed


class QueryGenerator:
    """Holds one LLM engine; process() turns one shard of chunks into QA rows."""

    def __init__(self, chunks_path: str, shard_dir: str, sdg: SDGConfig, seed: int, run: str | None = None):
        set_threads(sdg.placement.cpus_per_actor)
        # With `run` both paths are relative to that run folder: an actor on another node reads its own
        # node's mirror of a bucket run folder and pushes each finished shard itself.
        self.run, self.shard_rel = (RunDir(run), shard_dir) if run else (None, None)
        if self.run:
            chunks_path, shard_dir = str(self.run.pull(chunks_path)), str(self.run.root / shard_dir)
        self.sdg, self.seed = sdg, seed
        self.prompts = load_prompts(sdg.prompts, sdg.query_types)
        self.examples = load_example_queries(sdg.example_queries)
        self.chunks_path, self.shard_dir = chunks_path, Path(shard_dir)
        self.rare_example_words = set()
        if self.examples:  # word frequencies from up to 20K chunks spread over the corpus
            table = pq.read_table(chunks_path, columns=["title", "text"], memory_map=True)
            sample = table.take(list(range(0, table.num_rows, max(1, table.num_rows // 20_000))))
            texts = [f"{t} {x}" for t, x in zip(sample.column("title").to_pylist(), sample.column("text").to_pylist())]
            self.rare_example_words = rare_example_words(self.examples, texts)
        self.engine = make_engine(sdg)

    def process(self, task: dict) -> dict:
        shard_id = int(task["shard_id"])
        self.engine.reseed(self.seed * 100_003 + shard_id)  # same shard, same queries, whatever the actor
        start, stop = int(task["start"]), int(task["stop"])
        # One row past the shard: the last chunk's successor, for multi-hop pairs across the shard edge.
        chunks = pq.read_table(self.chunks_path, memory_map=True).slice(start, stop - start + 1).to_pylist()
        successor = {c["chunk_id"]: n for c, n in zip(chunks, chunks[1:]) if n["doc_id"] == c["doc_id"]}
        chunks = chunks[:stop - start]
        if self.sdg.chunks == "first":
            chunks = [c for c in chunks if c["chunk_index"] == 0]
        rows = []
        stats = {"truncated": 0, "too_short": 0, "too_long": 0, "wrong_shape": 0, "repetitive": 0,
                 "preamble": 0, "copied_example": 0, "leaked_example": 0, "duplicate": 0, "malformed": 0, "pairs": 0}
        bs = self.sdg.chunks_per_call
        tokens_before = self.engine.output_tokens
        report = getattr(self, "on_progress", None)  # set by map_shards: progress inside a long shard
        for i in range(0, len(chunks), bs):
            if report:
                report(i, len(chunks))
            batch = chunks[i:i + bs]
            texts = []
            for c in batch:
                text, cut = self.engine.fit_to_context(passage_text(c["title"], c["text"]))
                stats["truncated"] += cut
                texts.append(text)
            for qtype, spec in self.prompts.items():
                n = self.sdg.query_types[qtype]
                as_json = self.sdg.output == "json"
                items = [(c, t, None) for c, t in zip(batch, texts)]
                if spec.get("pair") == "next_chunk":  # multi-hop: a question that needs this chunk and the next
                    items = []
                    for c, t in zip(batch, texts):
                        if c["chunk_id"] in successor:
                            partner = successor[c["chunk_id"]]
                            pair, cut = self.engine.fit_to_context(
                                f"{t}\n\n{passage_text(partner['title'], partner['text'])}")
                            stats["truncated"] += cut
                            items.append((c, pair, partner["chunk_id"]))
                    stats["pairs"] += len(items)
                if not items:
                    continue
                prompts = [prompt_messages(t, spec, n_json=n if as_json else 0, examples=self.examples)
                           for _, t, _ in items]
                replies_per_chunk = self.engine.generate(prompts, 1 if as_json else n, stop_at_newline=not as_json)
                for (chunk, text, related), replies in zip(items, replies_per_chunk):
                    if as_json:
                        replies, malformed = parse_json_queries(replies[0])
                        stats["malformed"] += malformed
                    seen: set[str] = set()
                    keep = queries_for(chunk["n_tokens"], n, self.sdg.length_reference_tokens)
                    for j, reply in enumerate(replies[:keep]):
                        q = clean_query(reply, spec)
                        if len(q) < self.sdg.min_query_chars or len(q.split()) < 2:
                            stats["too_short"] += 1
                        elif len(q) > self.sdg.max_query_chars:
                            stats["too_long"] += 1
                        elif wrong_shape(q, spec):
                            stats["wrong_shape"] += 1
                        elif talks_about_source(q, spec):
                            stats["preamble"] += 1
                        elif repetitive(q):
                            stats["repetitive"] += 1
                        elif copies_example(q, [spec["example_query"], *self.examples]):
                            stats["copied_example"] += 1
                        elif leaks_example(q, text, self.rare_example_words):
                            stats["leaked_example"] += 1
                        elif q.lower() in seen:
                            stats["duplicate"] += 1
                        else:
                            seen.add(q.lower())
                            rows.append({"qa_id": f"{chunk['chunk_id']}::{qtype}{j}", "query": q,
                                         "chunk_id": chunk["chunk_id"], "doc_id": chunk["doc_id"],
                                         "query_type": qtype, "generator": self.sdg.llm,
                                         "related_chunk_ids": [related] if related else None})
        summary = {"shard_id": shard_id, "chunks": len(chunks), "queries": len(rows), **stats,
                   "output_tokens": self.engine.output_tokens - tokens_before, "node": current_node(),
                   "origin": self.engine.origin}
        write_shard(pa.Table.from_pylist(rows, QA_SCHEMA), self.shard_dir, shard_id, summary)
        if self.run:  # the sidecar first, as on disk: the Parquet file marks the shard done
            for suffix in ("json", "parquet"):
                self.run.push(f"{self.shard_rel}/shard-{shard_id:05d}.{suffix}")
        return summary


def shard_origins(shards: list[Path]) -> dict[str, int]:
    """Shards per backend:model. One stage's queries come from one generator: a fallback in some actors
    (or a resume under another backend) would mix two generators' styles without a trace, so it stops
    the stage. The shards stay on disk."""
    origins: dict[str, list[str]] = {}
    for p in shards:
        origin = json.loads(p.with_suffix(".json").read_text()).get("origin", "unrecorded")
        origins.setdefault(origin, []).append(p.name)
    if len(origins) > 1:
        detail = "; ".join(f"{o}: {len(names)} shard(s), e.g. {names[0]}" for o, names in sorted(origins.items()))
        raise RetrofitError(f"{shards[0].parent} mixes query generators ({detail}). Make the intended backend "
                            "available (or set sdg.backend to the one you want and sdg.placement.fallback_backend to "
                            "null) "
                            "and rerun with --force sdg")
    return {o: len(names) for o, names in origins.items()}


def current_node() -> str | None:
    """The Ray node this worker runs on (None outside Ray): the manifest shows where shards were made."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except ImportError:
        return None


def run_stage(cfg, run, rec) -> None:
    chunks_path = run.root / "corpus" / "chunks.parquet"
    n_chunks = pq.ParquetFile(chunks_path).metadata.num_rows
    shard_dir = rec.dir / "shards"
    done = finished_shards(shard_dir) if shard_dir.exists() else set()
    for stale in shard_dir.glob(".shard-*.tmp"):  # half-written by a killed worker: never a shard
        stale.unlink()
    tasks = shard_tasks(n_chunks, cfg.sdg.shard_size, done)
    if done:
        print(f"[sdg] resuming: {len(done)} finished shard(s) kept, {len(tasks)} to go", flush=True)
    t0 = time.perf_counter()
    where = cfg.sdg.placement
    fresh = list(map_shards(
        QueryGenerator, tasks, use_ray=True, num_actors=where.num_actors, num_cpus=where.cpus_per_actor,
        num_gpus=where.gpus_per_actor, resources=where.resources, label="sdg",
        ctor_kwargs={"chunks_path": "corpus/chunks.parquet", "shard_dir": "sdg/shards", "sdg": cfg.sdg,
                     "seed": cfg.seed, "run": run.location}))
    seconds = time.perf_counter() - t0
    rec.phase("generate")
    run.pull("sdg/shards")  # actors on other nodes pushed theirs to the bucket run folder

    shards = sorted(shard_dir.glob("shard-*.parquet"))
    origins = shard_origins(shards)
    # One shard at a time into the final table: the driver never holds more than one shard's rows.
    qa_rows, examples = 0, []
    with pq.ParquetWriter(rec.output("qa.parquet"), QA_SCHEMA) as writer:
        for i, p in enumerate(shards):
            table = pq.read_table(p, schema=QA_SCHEMA)
            writer.write_table(table)
            qa_rows += table.num_rows
            if table.num_rows and i in (0, len(shards) // 3, 2 * len(shards) // 3):
                examples.append(table.column("query")[0].as_py())
    totals: dict[str, int] = {}
    nodes = set()
    for p in shards:
        for k, v in json.loads(p.with_suffix(".json").read_text()).items():
            if k == "node":
                nodes.add(v)
            elif k not in ("shard_id", "origin"):
                totals[k] = totals.get(k, 0) + int(v)
    fresh_chunks = sum(int(r["chunks"]) for r in fresh)
    fresh_queries = sum(int(r["queries"]) for r in fresh)
    fresh_tokens = sum(int(r.get("output_tokens", 0)) for r in fresh)
    rec.manifest.counts = {**totals, "qa_pairs": qa_rows, "shards": len(shards), "resumed_shards": len(done),
                           "generated_by": origins,
                           "ray_nodes": sorted(n for n in nodes if n),
                           "chunks_per_s": round(fresh_chunks / seconds, 3) if seconds and fresh else None,
                           "queries_per_s": round(fresh_queries / seconds, 3) if seconds and fresh else None,
                           "output_tokens_per_s": round(fresh_tokens / seconds, 1) if seconds and fresh else None}
    dropped = {k: totals.get(k, 0) for k in ("too_short", "too_long", "wrong_shape", "preamble", "repetitive", "duplicate",
                                             "malformed", "truncated")}
    print(f"[sdg] {qa_rows} queries for {totals.get('chunks', 0)} chunks; dropped/flagged: {dropped}")
    for q in examples:
        print(f"[sdg]   e.g. {q}")
    if qa_rows == 0:
        raise RetrofitError("the LLM produced no usable query; see the drop counts in sdg/manifest.json")
