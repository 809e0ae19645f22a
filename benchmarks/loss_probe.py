"""Which loss gains on human queries? A probe for issue 18, outside the pipeline (sentence-transformers'
own trainer), on SciFact's 809 human *train* claims as perfect queries; scored on the 300 human test
claims over the whole corpus. Variants:
  mnrl LAM   MultipleNegativesRankingLoss, 3 hard negatives mined with the base model (our recipe)
  mnrl0 LAM  the same with in-batch negatives only
  mse LAM    MarginMSE, 1 mined negative, teacher = base cosine + LAM * BM25 / (query's top BM25 score)
1 epoch, batch 32, lr 2e-5, warmup 10%, training length 128 tokens, evaluation length 256.

    .venv/bin/python benchmarks/loss_probe.py mnrl 0.2      # one variant per process; appends to
    .venv/bin/python benchmarks/loss_probe.py mse 0.2       # benchmarks/work/loss_probe/results.jsonl
    .venv/bin/python benchmarks/loss_probe.py mse 0.2 benchmarks/work/scifact-1500         # its SDG queries
    .venv/bin/python benchmarks/loss_probe.py mnrl 0.2 titles:benchmarks/work/scifact-1500  # titles as queries
    .venv/bin/python benchmarks/loss_probe.py mnrl 0.2 ict:1000   # a document's own sentence as its query
    .venv/bin/python benchmarks/loss_probe.py mnrl 0.2 last:1000  # its last sentence
    .venv/bin/python benchmarks/loss_probe.py mnrl 0.2 --bf16      # trained in bf16 (autocast), scored in fp32
The two forms naming benchmarks/work/scifact-1500 need a run folder with sdg/ and prep/ (e.g. from
benchmarks/scifact.py --docs 1500); ict:N and last:N need neither an LLM nor a run folder.
"""
import json, sys, time, random
import numpy as np, torch
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
D = ROOT.parent / "shared" / "data" / "scifact"
WORK = ROOT / "benchmarks" / "work" / "loss_probe"
WORK.mkdir(parents=True, exist_ok=True)
from pipeline.models import resolve_embedder
from sentence_transformers import SentenceTransformer, losses
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from datasets import Dataset
import bm25s, Stemmer, pytrec_eval
torch.set_num_threads(2)
bf16 = "--bf16" in sys.argv  # does bf16 training (train.precision 'auto' on a CPU with native bf16) cost quality?
argv = [a for a in sys.argv if a != "--bf16"]
variant = argv[1]; lam = float(argv[2]) if len(argv) > 2 else 0.2
# Optional third argument: a run folder whose SDG queries (zero-label, on its train-split documents) replace the
# human train claims. This asks the GPL question: does a teacher's graded label rescue noisy synthetic queries?
# "titles:RUN" uses each train-split document's title as its query and the body alone as the positive: a
# pseudo-query source that needs no LLM.
# "ict:N" / "last:N": N seeded documents, each with one of its own sentences as the query (a random one: the
# Inverse Cloze Task; or its last, the abstract's conclusion) and the rest of the document as the positive.
source = argv[3] if len(argv) > 3 else ""
titles_as_queries = source.startswith("titles:")
kind, _, sentence_docs = source.partition(":")
sentence_mode = kind if kind in ("ict", "last") else ""
synthetic_run = Path(source.removeprefix("titles:")) if source and not sentence_mode else None
corpus = [json.loads(l) for l in open(D/"corpus.jsonl")]
human_queries = {json.loads(l)["_id"]: json.loads(l)["text"] for l in open(D/"queries.jsonl")}
queries = human_queries
def qrels(split):
    out = {}
    for i, l in enumerate(open(D/"qrels"/f"{split}.tsv")):
        if i == 0: continue
        q, d, s = l.split("\t"); out.setdefault(q, {})[d] = int(s)
    return out
tr, te = qrels("train"), qrels("test")
ids = [d["_id"] for d in corpus]; texts = [f"{d['title']} {d['text']}".strip() for d in corpus]
base = resolve_embedder("minilm")
cache = WORK / "base_emb.npy"
m = SentenceTransformer(base, device="cpu"); m.max_seq_length = 256
if cache.exists(): cemb = np.load(cache)
else:
    cemb = m.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True); np.save(cache, cemb)
stem = Stemmer.Stemmer("english")
bm = bm25s.BM25(); bm.index(bm25s.tokenize(texts, stopwords="en", stemmer=stem, show_progress=False), show_progress=False)
pos = {d: i for i, d in enumerate(ids)}
if synthetic_run is not None:
    import pandas as pd
    held_out = set()
    for split in ("val", "test"):
        held_out |= set(pd.read_parquet(synthetic_run / "prep" / f"{split}.parquet").positive_doc_id)
    qa = pd.read_parquet(synthetic_run / "sdg" / "qa.parquet")
    qa = qa[~qa.doc_id.isin(held_out) & qa.doc_id.isin(set(ids))]
    queries = {f"syn{i}": q for i, q in enumerate(qa["query"])}
    tr = {f"syn{i}": {d: 1} for i, d in enumerate(qa.doc_id)}
    variant_label = f"{variant} synthetic:{synthetic_run.name}"
    if titles_as_queries:
        docs = sorted(set(qa.doc_id))
        queries = {f"title{i}": corpus[pos[d]]["title"] for i, d in enumerate(docs)}
        tr = {f"title{i}": {d: 1} for i, d in enumerate(docs)}
        variant_label = f"{variant} titles:{synthetic_run.name}"
    queries.update(human_queries)  # the test claims are scored at the end
elif sentence_mode:
    import re
    picker = random.Random(1)
    queries, tr, positive_text = {}, {}, {}
    for d in picker.sample(range(len(corpus)), len(corpus)):  # every document, in a seeded order
        sentences = [x for x in re.split(r"(?<=[.!?])\s+(?=[A-Z])", corpus[d]["text"].strip()) if x]
        if len(sentences) < 3:
            continue
        k = len(sentences) - 1 if sentence_mode == "last" else picker.randrange(len(sentences))
        if len(sentences[k].split()) < 6:
            continue
        qid = f"{sentence_mode}{len(queries)}"
        queries[qid], tr[qid] = sentences[k], {ids[d]: 1}
        positive_text[ids[d]] = f"{corpus[d]['title']} {' '.join(sentences[:k] + sentences[k + 1:])}".strip()
        if len(queries) == int(sentence_docs):
            break
    test_docs = {d for rel in te.values() for d in rel}
    print("sentence queries whose document a test claim cites:", sum(1 for r in tr.values() if set(r) & test_docs))
    variant_label = f"{variant} {sentence_mode}:{sentence_docs}"
    queries.update(human_queries)
else:
    variant_label = variant
trq = sorted(tr); rng = random.Random(0)
qemb = m.encode([queries[q] for q in trq], normalize_embeddings=True)
qtok = bm25s.tokenize([queries[q] for q in trq], stopwords="en", stemmer=stem, show_progress=False, return_ids=False)
rows = []
for i, q in enumerate(trq):
    dense = cemb @ qemb[i]
    lex = bm.get_scores(qtok[i]); lex = lex / max(lex.max(), 1e-9)
    teach = dense + lam * lex
    order = np.argsort(-dense)[:30]
    negs = [j for j in order if ids[j] not in tr[q]][:3]
    for d in tr[q]:
        if d not in pos: continue
        p = pos[d]
        rows.append({"q": queries[q], "p": corpus[p]["text"] if titles_as_queries else
                     positive_text[d] if sentence_mode else texts[p], "negs": [texts[j] for j in negs],
                     "tp": float(teach[p]), "tn": [float(teach[j]) for j in negs]})
print(variant, lam, "rows", len(rows), flush=True)
student = SentenceTransformer(base, device="cpu"); student.max_seq_length = 128
if variant == "mnrl":
    ds = Dataset.from_dict({"anchor": [r["q"] for r in rows], "positive": [r["p"] for r in rows],
                            **{f"negative_{k}": [r["negs"][k] for r in rows] for k in range(3)}})
    loss = losses.MultipleNegativesRankingLoss(student)
elif variant == "mnrl0":
    ds = Dataset.from_dict({"anchor": [r["q"] for r in rows], "positive": [r["p"] for r in rows]})
    loss = losses.MultipleNegativesRankingLoss(student)
else:  # margin mse: one triple per negative, label = teacher margin
    a, p_, n_, lab = [], [], [], []
    for r in rows:
        for k, n in enumerate(r["negs"][:1]):
            a.append(r["q"]); p_.append(r["p"]); n_.append(n); lab.append(r["tp"] - r["tn"][k])
    ds = Dataset.from_dict({"anchor": a, "positive": p_, "negative": n_, "label": lab})
    loss = losses.MarginMSELoss(student, similarity_fct=lambda x, y: torch.nn.functional.cosine_similarity(x, y))
args = SentenceTransformerTrainingArguments(output_dir=str(WORK / ("out-" + variant)), num_train_epochs=1,
        per_device_train_batch_size=32, learning_rate=2e-5, warmup_ratio=0.1, save_strategy="no",
        logging_steps=10, report_to=[], seed=13, batch_sampler="no_duplicates" if variant.startswith("mnrl") else "batch_sampler",
        dataloader_drop_last=False, use_cpu=True, bf16=bf16)
t = time.time()
SentenceTransformerTrainer(model=student, args=args, train_dataset=ds, loss=loss).train()
print("train s", time.time() - t, flush=True)
def evaluate(model, name):
    model.max_seq_length = 256
    e = model.encode(texts, batch_size=64, normalize_embeddings=True) if model is not m else cemb
    tq = sorted(te); qe = model.encode([queries[q] for q in tq], normalize_embeddings=True)
    S = qe @ e.T; run = {}
    for i, q in enumerate(tq):
        top = np.argsort(-S[i])[:100]; run[q] = {ids[j]: float(S[i, j]) for j in top}
    ev = pytrec_eval.RelevanceEvaluator(te, {"ndcg_cut.10", "recall.100"})
    r = ev.evaluate(run)
    ndcg, rec100 = (float(np.mean([v[k] for v in r.values()])) for k in ("ndcg_cut_10", "recall_100"))
    print(name, "ndcg@10 %.4f recall@100 %.4f" % (ndcg, rec100), flush=True)
    with open(WORK / "results.jsonl", "a") as f:
        f.write(json.dumps({"variant": name, "ndcg@10": round(ndcg, 4), "recall@100": round(rec100, 4)}) + "\n")
if variant == "mnrl" and not (WORK / "base_done").exists():
    evaluate(m, "base"); (WORK / "base_done").touch()
evaluate(student, f"{variant_label} lam={lam} rows={len(rows)}" + (" bf16" if bf16 else ""))
