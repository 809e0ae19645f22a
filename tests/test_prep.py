import json

import numpy as np

from pipeline.prep import mine_negatives, roundtrip_filter, split_documents


def test_split_is_by_document_seeded_and_complete():
    docs = [f"d{i}" for i in range(50)]
    a = split_documents(docs + docs, 0.1, 0.2, seed=7)  # repeated ids: one assignment per document
    assert a == split_documents(list(reversed(docs)), 0.1, 0.2, seed=7)  # order does not matter
    assert a != split_documents(docs, 0.1, 0.2, seed=8)
    counts = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 35, "val": 5, "test": 10}


def test_tiny_corpus_still_gets_every_split():
    counts = {s: list(split_documents(["a", "b", "c"], 0.1, 0.2, 1).values()).count(s)
              for s in ("train", "val", "test")}
    assert counts == {"train": 1, "val": 1, "test": 1}


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def test_planted_duplicates_same_document_and_test_documents_are_never_negatives():
    rng = np.random.default_rng(0)
    dim = 16
    positive = _unit(rng.normal(size=dim))
    query = _unit(positive + 0.3 * _unit(rng.normal(size=dim)))
    exact_dup = positive.copy()                                       # identical text elsewhere
    near_dup = _unit(positive + 0.05 * _unit(rng.normal(size=dim)))   # near-identical text
    sibling = _unit(positive + 0.4 * _unit(rng.normal(size=dim)))     # same document as the positive
    held_out = _unit(positive + 0.5 * _unit(rng.normal(size=dim)))    # a test-split document
    others = [_unit(positive + s * _unit(rng.normal(size=dim))) for s in (0.9, 1.0, 1.1, 1.3, 1.5, 2.0)]
    emb = np.stack([positive, exact_dup, near_dup, sibling, held_out, *others])
    ids = ["pos", "dup", "near", "sib", "held", *[f"o{i}" for i in range(len(others))]]
    docs = ["D", "X", "Y", "D", "T", *[f"O{i}" for i in range(len(others))]]
    stats = dict.fromkeys(["skipped_top", "same_document", "held_out_document", "above_margin", "kept"], 0)
    [mined] = mine_negatives([{"chunk_id": "pos", "doc_id": "D"}], ids, docs, emb, query[None, :],
                             candidates=10, margin=0.95, skip_top=0, num_negatives=3,
                             banned_docs={"T"}, stats=stats)
    chosen = {ids[j] for j in mined["negatives"]}
    assert chosen.isdisjoint({"pos", "dup", "near", "sib", "held"})
    assert len(chosen) == 3
    assert stats["above_margin"] >= 2 and stats["same_document"] == 1 and stats["held_out_document"] == 1
    assert all(s <= 0.95 * mined["positive_score"] for s in mined["negative_scores"])
    assert stats["scores"]["kept_negative"]["n"] == 3
    assert stats["scores"]["dropped_above_margin"]["p10"] > 0.95 * mined["positive_score"]


def _fake_run(root, queries_per_chunk, seed_text):
    """A run folder whose corpus and sdg stages are complete (real files, real manifests)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.corpus import CHUNK_SCHEMA
    from pipeline.rundir import RunDir, StageRecorder
    from pipeline.sdg import QA_SCHEMA

    run = RunDir(root)
    chunks = [{"chunk_id": f"d{d}#{c}", "doc_id": f"d{d}", "title": f"Doc {d}",
               "text": f"Document {d} part {c} about topic {(d * 7 + c) % 13}", "chunk_index": c, "n_tokens": 8}
              for d in range(12) for c in range(2)]
    with StageRecorder(run, "corpus", "h", {}) as rec:
        pq.write_table(pa.Table.from_pylist(chunks, CHUNK_SCHEMA), rec.output("chunks.parquet"))
    qa = [{"qa_id": f"{c['chunk_id']}::question{j}", "query": f"{seed_text} {j} topic {c['text'][-2:]}?",
           "chunk_id": c["chunk_id"], "doc_id": c["doc_id"], "query_type": "question", "generator": "test"}
          for c in chunks for j in range(queries_per_chunk)]
    with StageRecorder(run, "sdg", "h", {}) as rec:
        pq.write_table(pa.Table.from_pylist(qa, QA_SCHEMA), rec.output("qa.parquet"))
    return run


def test_fixed_evaluation_set_is_reused_across_runs_on_the_same_corpus(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.config import load_config
    from pipeline.runner import run_stage

    def prep(run, seed, fixed=True):
        cfg = load_config(None, [f"seed={seed}", f"prep.eval_set_root={tmp_path / 'sets'}",
                                 f"prep.fixed_eval_set={fixed}", "prep.num_negatives=2"])
        run_stage("prep", cfg, run, force=True)
        return pq.read_table(run.root / "prep" / "test.parquet").to_pylist()

    first = prep(_fake_run(tmp_path / "a", 1, "what is"), seed=1)
    # Another run on the same corpus with other queries and another seed: same test queries.
    second = prep(_fake_run(tmp_path / "b", 2, "where is"), seed=2)
    assert [r["qa_id"] for r in second] == [r["qa_id"] for r in first]
    assert [r["query"] for r in second] == [r["query"] for r in first]
    test_docs = {r["positive_doc_id"] for r in first}
    train = pq.read_table(tmp_path / "b" / "prep" / "train.parquet").to_pylist()
    assert test_docs.isdisjoint({r["positive_doc_id"] for r in train})
    # Told otherwise, the split is drawn afresh from this run's seed.
    third = prep(_fake_run(tmp_path / "c", 2, "where is"), seed=2, fixed=False)
    assert {r["positive_doc_id"] for r in third} != test_docs


def test_roundtrip_filter_drops_training_queries_whose_source_is_not_found():
    qa = [{"query": "good"}, {"query": "The claim is not supported."}, {"query": "far"}]
    mined = [{"positive_rank": 0}, {"positive_rank": -1}, {"positive_rank": 25}]
    kept_qa, kept_mined, summary = roundtrip_filter(qa, mined, ["train"] * 3, top_k=20)
    assert [r["query"] for r in kept_qa] == ["good"] and len(kept_mined) == 1
    assert summary["in"] == 3 and summary["out"] == 1 and "The claim is not supported." in summary["dropped_examples"]
    assert roundtrip_filter(qa, mined, ["train"] * 3, top_k=0)[0] == qa


def test_roundtrip_filter_never_touches_val_or_test_queries():
    """The filter uses the base model, which evaluation compares against: a held-out split kept only where
    the base already finds the source would flatter it (base Recall@100 = 1.0 by construction)."""
    qa = [{"query": q} for q in ("a", "b", "c", "d")]
    mined = [{"positive_rank": r} for r in (-1, 40, -1, 3)]
    kept_qa, _, summary = roundtrip_filter(qa, mined, ["test", "val", "train", "train"], top_k=20)
    assert [r["query"] for r in kept_qa] == ["a", "b", "d"]
    assert summary == {"top_k": 20, "applied_to": "train", "in": 2, "out": 1, "dropped_examples": ["c"]}


def test_prep_stage_keeps_test_queries_the_base_model_cannot_find(tmp_path):
    """Stage level: with the strictest round-trip filter, training loses queries but the test split keeps
    one row per test-document query."""
    import pyarrow.parquet as pq

    from pipeline.config import load_config
    from pipeline.runner import run_stage

    run = _fake_run(tmp_path / "r", 2, "zebra quantum")  # queries that barely describe their chunk
    cfg = load_config(None, ["prep.fixed_eval_set=false", "prep.num_negatives=2", "prep.roundtrip_top_k=1",
                             "prep.near_duplicate_cosine=1.0"])
    run_stage("prep", cfg, run)
    test = pq.read_table(run.root / "prep" / "test.parquet").to_pylist()
    counts = json.loads((run.root / "prep" / "manifest.json").read_text())["counts"]
    qa = pq.read_table(run.root / "sdg" / "qa.parquet").to_pylist()
    assert counts["roundtrip_filter"]["out"] < counts["roundtrip_filter"]["in"]  # it did drop training queries
    assert len(test) == counts["test_rows"] > 0
    test_doc_ids = {r["positive_doc_id"] for r in test}
    assert len(test) == sum(r["doc_id"] in test_doc_ids for r in qa)  # every query of a test document is kept


def _clustered(n, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, dim))
    x = centres[rng.integers(0, 50, n)] + 0.5 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_approximate_indexes_find_what_exact_search_finds_and_auto_switches_by_size():
    from pipeline.index import build_index, search

    chunks, queries = _clustered(6000), _clustered(200, seed=1)
    exact, desc = build_index(chunks, "auto", exact_max=10_000, use_gpu=False)
    assert desc.startswith("flat")
    _, truth = search(exact, queries, 10)
    for kind in ("ivf", "hnsw"):
        index, _ = build_index(chunks, kind, nprobe=16, ef_search=128, use_gpu=False)
        _, found = search(index, queries, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found)])
        assert recall > 0.9, (kind, recall)
    _, desc = build_index(chunks, "auto", exact_max=1000, use_gpu=False)
    assert desc.startswith("hnsw")  # past exact_max on a CPU


def _stats():
    return dict.fromkeys(["skipped_top", "other_positive", "same_document", "held_out_document",
                          "above_margin", "kept"], 0)


def test_other_positives_of_a_query_are_never_its_negatives():
    rng = np.random.default_rng(3)
    dim = 16
    positive = _unit(rng.normal(size=dim))
    query = _unit(positive + 0.3 * _unit(rng.normal(size=dim)))
    second = _unit(query + 0.45 * _unit(rng.normal(size=dim)))  # the query's other positive, elsewhere
    others = [_unit(query + s * _unit(rng.normal(size=dim))) for s in (1.0, 1.2, 1.4, 1.6)]
    emb = np.stack([positive, second, *others])
    ids, docs = ["pos", "pos2", "a", "b", "c", "d"], ["D", "E", "A", "B", "C", "F"]
    stats = _stats()
    [mined] = mine_negatives([{"chunk_id": "pos", "doc_id": "D"}], ids, docs, emb, query[None, :], candidates=10,
                             margin=1.0, skip_top=0, num_negatives=3, banned_docs=set(), stats=stats,
                             other_positives=[{"pos", "pos2"}])
    assert "pos2" not in {ids[j] for j in mined["negatives"]} and stats["other_positive"] == 1
    # Without that knowledge it would have been the hardest negative: the test plants a real trap.
    [naive] = mine_negatives([{"chunk_id": "pos", "doc_id": "D"}], ids, docs, emb, query[None, :], candidates=10,
                             margin=1.0, skip_top=0, num_negatives=3, banned_docs=set(), stats=_stats())
    assert ids[naive["negatives"][0]] == "pos2"


def test_sampled_negatives_come_from_the_survivors_and_are_seeded():
    emb = _clustered(400, seed=5)
    query = emb[:1] + 0.01
    ids, docs = [f"c{i}" for i in range(400)], [f"d{i}" for i in range(400)]

    def mine(selection, seed):
        [m] = mine_negatives([{"chunk_id": "c0", "doc_id": "d0"}], ids, docs, emb, query, candidates=40,
                             margin=1.0, skip_top=0, num_negatives=5, banned_docs=set(), stats=_stats(),
                             selection=selection, seed=seed)
        return m["negatives"]

    top = mine("top", 0)
    window = set(mine_negatives([{"chunk_id": "c0", "doc_id": "d0"}], ids, docs, emb, query, candidates=40,
                                margin=1.0, skip_top=0, num_negatives=40, banned_docs=set(),
                                stats=_stats())[0]["negatives"])
    a, b, c = mine("sample", 0), mine("sample", 0), mine("sample", 1)
    assert a == b and a != c and len(a) == 5 and set(a) <= window and a != top


def test_unroll_positives_gives_one_row_per_positive_and_shares_the_positive_set():
    from pipeline.prep import unroll_positives

    doc_of = {"a#0": "A", "b#0": "B", "c#0": "C"}
    qa = [{"qa_id": "q1", "query": "Which port?", "chunk_id": "a#0", "doc_id": "A", "related_chunk_ids": ["b#0"]},
          {"qa_id": "q2", "query": "which port? ", "chunk_id": "c#0", "doc_id": "C", "related_chunk_ids": None}]
    rows = unroll_positives(qa, doc_of)
    assert [(r["qa_id"], r["chunk_id"], r["doc_id"], r["group_id"]) for r in rows] == [
        ("q1", "a#0", "A", "q1"), ("q1#p1", "b#0", "B", "q1"), ("q2", "c#0", "C", "q2")]
    assert all(r["positives"] == {"a#0", "b#0", "c#0"} for r in rows)


def test_prep_stage_unrolls_multi_positive_queries_and_scores_all_positives(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import load_config
    from pipeline.runner import run_stage
    from pipeline.sdg import QA_SCHEMA

    run = _fake_run(tmp_path / "r", 1, "what is")
    qa = pq.read_table(run.root / "sdg" / "qa.parquet").to_pylist()
    for row in qa:  # every query also needs the first chunk of the next document (a two-hop question)
        nxt = (int(row["doc_id"][1:]) + 1) % 12
        row["related_chunk_ids"] = [f"d{nxt}#0"]
    pq.write_table(pa.Table.from_pylist(qa, QA_SCHEMA), run.root / "sdg" / "qa.parquet")
    cfg = load_config(None, ["prep.fixed_eval_set=false", "prep.num_negatives=3", "prep.roundtrip_top_k=0"])
    run_stage("prep", cfg, run, force=True)
    out = run.root / "prep"
    train = pq.read_table(out / "train.parquet").to_pylist()
    assert any(r["qa_id"].endswith("#p1") for r in train)
    for r in train:
        assert r["positive_id"] in r["positive_ids"] and set(r["negative_ids"]).isdisjoint(r["positive_ids"])
    test = pq.read_table(out / "test.parquet").to_pylist()
    assert not any("#p" in r["qa_id"] for r in test)
    qrels = (out / "beir_test" / "qrels" / "test.tsv").read_text().splitlines()[1:]
    assert len(qrels) > len(test)  # a test query's qrels name all its positives in its split
    counts = __import__("json").loads((out / "manifest.json").read_text())["counts"]
    assert counts["queries"] == 24 and counts["query_positive_pairs"] == 48
    assert counts["negatives"]["cross_split_positive"] > 0  # next-document positives across a split boundary


JUDGE_CASE = {
    "query": "Which enzyme breaks down lactose in the gut?",
    "positive": "Lactase is the enzyme in the small intestine that breaks lactose down into glucose and galactose.",
    "unrelated": "The Eiffel Tower was built in Paris for the 1889 World's Fair.",
}


def _judge_mining(judge):
    """Margin filter off, so only the judge can catch the exact copy of the positive in another document."""
    ids, docs = ["pos", "copy", "far"], ["D", "E", "F"]
    passages = [JUDGE_CASE["positive"], JUDGE_CASE["positive"], JUDGE_CASE["unrelated"]]
    emb = np.stack([_unit([1, 0, 0.1]), _unit([1, 0, 0.1]), _unit([0.2, 1, 0])])
    stats = _stats()
    [mined] = mine_negatives([{"chunk_id": "pos", "doc_id": "D", "query": JUDGE_CASE["query"]}], ids, docs, emb,
                             _unit([1, 0.1, 0])[None, :], candidates=5, margin=1.0, skip_top=0, num_negatives=2,
                             banned_docs=set(), stats=stats, judge=judge, judge_top=5, passages=passages)
    return {ids[j] for j in mined["negatives"]}, stats


def test_llm_judge_drops_a_copy_of_the_positive_and_keeps_an_unrelated_passage():
    from pipeline.config import JudgeChoice
    from pipeline.judge import make_judge

    judge = make_judge(JudgeChoice(kind="llm"), "smollm2")
    pairs = [(JUDGE_CASE["query"], JUDGE_CASE["positive"]), (JUDGE_CASE["query"], JUDGE_CASE["unrelated"])]
    batched = judge.score(pairs)
    alone = np.concatenate([judge.score([p]) for p in pairs])
    np.testing.assert_allclose(batched, alone, atol=2e-3)  # left padding does not change a pair's score
    assert batched[0] > batched[1]
    negatives, stats = _judge_mining(judge)
    assert negatives == {"far"} and stats["judged"] == 2 and stats["judge_dropped"] == 1


def test_cross_encoder_judge_is_wired_the_same_way(tmp_path):
    from sentence_transformers import CrossEncoder

    from pipeline.config import JudgeChoice
    from pipeline.judge import make_judge
    from pipeline.models import resolve_embedder

    # No re-ranker ships as a package: a MiniLM with a fresh scoring head is a real CrossEncoder folder.
    import torch
    torch.manual_seed(0)
    CrossEncoder(resolve_embedder("minilm"), num_labels=1, local_files_only=True).save(str(tmp_path / "ce"))
    negatives, stats = _judge_mining(make_judge(JudgeChoice(kind="cross_encoder", model=str(tmp_path / "ce")), "smollm2"))
    assert "copy" not in negatives and stats["judged"] == 2 and stats["judge_dropped"] >= 1


def test_embedding_cache_is_keyed_by_model_and_table(tmp_path, base_model):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import load_file, save_file

    from pipeline.encode import encode_parquet

    table = tmp_path / "q.parquet"
    pq.write_table(pa.table({"query": ["how to open a file", "parse a date string"]}), table)
    cache = tmp_path / "cache"
    first = encode_parquet(base_model, table, "query", cache)
    again = encode_parquet(base_model, table, "query", cache)
    assert len(list(cache.iterdir())) == 1 and np.array_equal(first, again)
    # The same model with one weight changed: its embeddings are computed afresh, not reused.
    changed = tmp_path / "changed"
    shutil.copytree(base_model, changed)
    weights = load_file(changed / "model.safetensors")
    name = next(k for k in weights if k.endswith("word_embeddings.weight"))
    weights[name] = weights[name] * 1.5
    save_file(weights, changed / "model.safetensors")
    other = encode_parquet(str(changed), table, "query", cache)
    assert len(list(cache.iterdir())) == 2 and not np.allclose(first, other)
    # A changed table too.
    pq.write_table(pa.table({"query": ["how to open a file", "sort a list"]}), table)
    third = encode_parquet(base_model, table, "query", cache)
    assert len(list(cache.iterdir())) == 3 and np.allclose(third[0], first[0], atol=1e-5)


def test_near_duplicate_queries_of_a_chunk_are_dropped_but_other_chunks_keep_theirs():
    from pipeline.prep import near_duplicates

    base = _unit([1, 0, 0, 0])
    emb = np.stack([base, _unit([1, 0.05, 0, 0]), _unit([0, 1, 0, 0]), _unit([1, 0.05, 0, 0])])
    qa = [{"chunk_id": "a", "query": "q0"}, {"chunk_id": "a", "query": "q0 again"},
          {"chunk_id": "a", "query": "other"}, {"chunk_id": "b", "query": "q0 for b"}]
    keep, summary = near_duplicates(qa, emb, 0.97)
    assert keep.tolist() == [True, False, True, True]
    assert summary["dropped"] == 1 and summary["dropped_examples"] == ["q0 again"]
    assert near_duplicates(qa, emb, 0)[0].all()


def test_query_judge_drops_queries_its_rubric_rejects():
    """SmolLM2 with the written rubric, deterministic (one forward pass): on-topic queries score at least
    0.5 against their chunk, off-topic and meta replies below, and those are dropped and counted."""
    from pipeline.config import JudgeChoice
    from pipeline.judge import QUERY_RUBRIC, make_judge
    from pipeline.prep import judge_queries

    passage = {"c": "Lactase is the enzyme in the small intestine that breaks lactose down into glucose and galactose."}
    qa = [{"chunk_id": "c", "query": q} for q in ("Which enzyme breaks down lactose?",
                                                   "The claim is not supported by the text.",
                                                   "what does lactase break lactose into",
                                                   "How tall is the Eiffel Tower?")]
    keep, summary = judge_queries(qa, passage, make_judge(JudgeChoice(kind="llm"), "smollm2", template=QUERY_RUBRIC), 0.5)
    assert keep.tolist() == [True, False, True, False]
    assert summary["in"] == 4 and summary["out"] == 2 and len(summary["dropped_examples"]) == 2


def test_prep_stage_runs_the_query_judge_and_records_it(tmp_path):
    import json

    import pyarrow.parquet as pq

    from pipeline.config import load_config
    from pipeline.runner import run_stage

    run = _fake_run(tmp_path / "r", 1, "what is")
    cfg = load_config(None, ["prep.fixed_eval_set=false", "prep.roundtrip_top_k=0", "prep.query_judge=llm",
                             "prep.query_judge_min=0.5"])
    run_stage("prep", cfg, run, force=True)
    counts = json.loads((run.root / "prep" / "manifest.json").read_text())["counts"]
    judged = counts["query_judge"]
    assert judged["in"] == 24 and judged["scores"]["n"] == 24
    rows = sum(pq.read_table(run.root / "prep" / f"{s}.parquet").num_rows for s in ("train", "val", "test"))
    assert rows == judged["out"]
