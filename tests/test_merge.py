"""The merge stage: the shipped model is a * fine-tuned + (1 - a) * base, a chosen on human dev queries."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import RetrofitError
from pipeline.beir import load_dev_queries
from pipeline.merge import choose_weight, merge_weights
from tests.conftest import SCIFACT


def damaged_copy(base_model: str, out, scale: float = 0.5, seed: int = 0) -> str:
    """A 'fine-tuned' model that is the base with noise on every weight: worse on any real query."""
    from pipeline.embedders import load_model

    model = load_model(base_model, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp(min=1e-3))
    model.save(str(out))
    return str(out)


def key(state: dict, suffix: str) -> str:
    return next(k for k in state if k.endswith(suffix))


def test_merged_weights_are_the_weighted_average(base_model, tmp_path):
    from pipeline.embedders import load_model

    tuned = damaged_copy(base_model, tmp_path / "tuned", scale=0.1)
    merge_weights(base_model, tuned, 0.25, tmp_path / "merged")
    merged, t, b = (load_model(str(p), device="cpu").state_dict()
                    for p in (tmp_path / "merged", tuned, base_model))
    for name in (key(t, "embeddings.word_embeddings.weight"), key(t, "encoder.layer.5.output.dense.bias")):
        assert torch.allclose(merged[name], 0.25 * t[name] + 0.75 * b[name], atol=1e-6)
        assert not torch.allclose(merged[name], t[name])


def test_models_of_another_shape_are_not_merged(base_model, tmp_path):
    from pipeline.embedders import load_model

    model = load_model(base_model, device="cpu")
    encoder = model[0].auto_model.encoder
    encoder.layer = encoder.layer[:5]  # a 5-layer "fine-tuned" model
    model[0].auto_model.config.num_hidden_layers = 5
    model.save(str(tmp_path / "other"))
    with pytest.raises(RetrofitError, match="differ in names or shapes"):
        merge_weights(base_model, str(tmp_path / "other"), 0.5, tmp_path / "merged")


def test_dev_queries_never_come_from_the_test_split(tmp_path):
    with pytest.raises(RetrofitError, match="test split"):
        load_dev_queries(f"{SCIFACT}:test")
    with pytest.raises(RetrofitError, match=r"splits here: test, train"):
        load_dev_queries(str(SCIFACT))  # no qrels/dev.tsv in SciFact: the error lists what is there
    dev = load_dev_queries(f"{SCIFACT}:train")
    assert len(dev.qrels) == 809 and all(dev.queries[q] for q in dev.qrels)


def test_dev_queries_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text('{"query": "aspirin and adenoma", "relevant": ["d1", "d2"]}\n\n{"query": "no documents"}\n')
    with pytest.raises(RetrofitError, match=r"dev.jsonl line 3 needs"):
        load_dev_queries(str(path))
    path.write_text('{"query": "aspirin and adenoma", "relevant": ["d1", "d2"]}\n{"query": "x", "relevant": {"d3": 2}}\n')
    assert load_dev_queries(str(path)).qrels == {"1": {"d1": 1, "d2": 1}, "2": {"d3": 2}}
    path.write_text('{"query": "cut off\n')
    with pytest.raises(RetrofitError, match=r"line 1 is not JSON"):
        load_dev_queries(str(path))


def test_a_tie_goes_to_the_weight_closer_to_the_base():
    curve = {1.0: {"ndcg@10": 0.7}, 0.5: {"ndcg@10": 0.7}, 0.0: {"ndcg@10": 0.6}}
    assert choose_weight(curve) == 0.5


def scifact_slice(tmp_path, n_docs: int = 150):
    """The first SciFact abstracts as a run's chunks, and the train claims about them as dev queries."""
    docs = [json.loads(line) for line in (SCIFACT / "corpus.jsonl").read_text().splitlines()[:n_docs]]
    chunks = pa.table({"chunk_id": [f"{d['_id']}#0" for d in docs], "doc_id": [str(d["_id"]) for d in docs],
                       "title": [d["title"] for d in docs], "text": [d["text"] for d in docs]})
    return chunks, f"{SCIFACT}:train"


def test_the_stage_ships_the_weight_dev_queries_prefer(base_model, tmp_path):
    """A fine-tune that hurts on human queries is not shipped as is: the dev curve picks a weight below 1,
    the manifest says why, and the shipped weights are that mix."""
    from pipeline import merge
    from pipeline.embedders import load_model
    from pipeline.rundir import RunDir, StageRecorder

    run = RunDir(tmp_path / "run")
    chunks, dev = scifact_slice(tmp_path)
    (run.root / "corpus").mkdir(parents=True)
    pq.write_table(chunks, run.root / "corpus" / "chunks.parquet")
    tuned = damaged_copy(base_model, run.root / "train" / "model", scale=0.6)
    cfg = load_config(None, [f"merge.dev_queries={dev}", "merge.grid=[0.0, 0.5, 1.0]"])
    rec = StageRecorder(run, "merge", "test", {})
    with rec:
        merge.run_stage(cfg, run, rec)
    counts = json.loads((run.root / "merge" / "manifest.json").read_text())["counts"]
    curve = {float(a): v["ndcg@10"] for a, v in counts["curve"].items()}
    assert counts["dev_queries"] > 5 and counts["dev_queries_dropped"] > 700  # 150 of 5,183 abstracts
    assert curve[0.0] > curve[1.0] + 0.05, curve  # the damage is visible on human queries
    assert counts["weight"] == max(curve, key=lambda a: (curve[a], -a)) < 1.0
    shipped = load_model(str(run.root / "merge" / "model"), device="cpu").state_dict()
    t, b = load_model(tuned, device="cpu").state_dict(), load_model(base_model, device="cpu").state_dict()
    name = key(t, "encoder.layer.0.attention.self.query.weight")
    a = counts["weight"]
    assert torch.allclose(shipped[name], a * t[name] + (1 - a) * b[name], atol=1e-6)


def test_without_dev_queries_the_configured_weight_ships(base_model, tmp_path):
    from pipeline import merge
    from pipeline.embedders import load_model
    from pipeline.rundir import RunDir, StageRecorder

    run = RunDir(tmp_path / "run")
    tuned = damaged_copy(base_model, run.root / "train" / "model", scale=0.1)
    cfg = load_config(None, ["merge.weight=0.5"])
    rec = StageRecorder(run, "merge", "test", {})
    with rec:
        merge.run_stage(cfg, run, rec)
    counts = json.loads((run.root / "merge" / "manifest.json").read_text())["counts"]
    assert counts["weight"] == 0.5 and "no dev queries" in counts["chosen_by"]
    shipped = load_model(str(run.root / "merge" / "model"), device="cpu").state_dict()
    t, b = load_model(tuned, device="cpu").state_dict(), load_model(base_model, device="cpu").state_dict()
    name = key(t, "encoder.layer.3.intermediate.dense.weight")
    assert torch.allclose(shipped[name], 0.5 * t[name] + 0.5 * b[name], atol=1e-6)


def test_a_grid_weight_outside_0_1_is_refused():
    with pytest.raises(RetrofitError, match="grid"):
        load_config(None, ["merge.grid=[0.5, 1.5]"])
