import numpy as np

from pipeline.report import by_query_type, compare, paired_test, plot_metrics


def test_planted_large_improvement_is_significant():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 300)
    better = np.clip(base + rng.normal(0.1, 0.1, 300), 0, 1)
    t = paired_test(base, better)
    assert t["significant"] and t["p_value"] < 0.001
    assert 0.05 < t["ci95"][0] < t["delta"] < t["ci95"][1] < 0.15


def test_no_change_is_not_significant():
    rng = np.random.default_rng(2)
    base = rng.uniform(0, 1, 300)
    same = base + rng.normal(0, 0.05, 300)  # noise, no shift
    t = paired_test(base, same)
    assert not t["significant"] and t["p_value"] > 0.05
    assert t["ci95"][0] < 0 < t["ci95"][1]
    assert paired_test(base, base)["p_value"] == 1.0


def test_compare_and_breakdown_shapes(tmp_path):
    per_query = {"base": {"q1": {"ndcg@10": 0.5}, "q2": {"ndcg@10": 0.0}},
                 "tuned": {"q1": {"ndcg@10": 1.0}, "q2": {"ndcg@10": 0.5}}}
    c = compare(per_query, ["ndcg@10"])
    assert c["base"]["ndcg@10"] == {"value": 0.25}
    assert c["tuned"]["ndcg@10"]["delta"] == 0.5 and c["tuned"]["ndcg@10"]["rel_delta"] == 2.0
    b = by_query_type(per_query, {"q1": "keyword", "q2": "question"}, ["ndcg@10"])
    assert b["keyword"] == {"queries": 1, "base": {"ndcg@10": 0.5}, "tuned": {"ndcg@10": 1.0}}
    plot_metrics({"base": {"ndcg@10": 0.25}, "tuned": {"ndcg@10": 0.75}}, ["ndcg@10"], tmp_path / "m.png", "t")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_secondary_metrics_are_holm_corrected_and_the_verdict_says_noise():
    from pipeline.report import holm, verdict

    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == {"a": 0.03, "c": 0.06, "b": 0.06}
    rng = np.random.default_rng(3)
    qids = [f"q{i}" for i in range(60)]
    base = {q: {"ndcg@10": float(v), "recall@10": float(v), "map@10": float(v)}
            for q, v in zip(qids, rng.uniform(0, 1, 60))}
    noisy = {q: {m: min(1.0, max(0.0, x + rng.normal(0.01, 0.05))) for m, x in row.items()} for q, row in base.items()}
    c = compare({"base": base, "tuned": noisy}, ["ndcg@10", "recall@10", "map@10"])
    assert "p_holm" not in c["tuned"]["ndcg@10"]  # the primary metric is tested alone
    assert c["tuned"]["recall@10"]["p_holm"] >= c["tuned"]["recall@10"]["p_value"]
    text = verdict(c, "tuned", "base", 60)
    assert ("within noise" in text) == (not c["tuned"]["ndcg@10"]["significant"])
    better = {q: {m: min(1.0, x + 0.2) for m, x in row.items()} for q, row in base.items()}
    assert verdict(compare({"base": base, "t": better}, ["ndcg@10"]), "t", "base", 60).endswith("t is better.")
