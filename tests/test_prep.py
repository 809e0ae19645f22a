import numpy as np

from pipeline.prep import mine_negatives, split_documents


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
