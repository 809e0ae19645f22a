import pytest

from pipeline.sdg import clean_query, load_prompts, shard_tasks, wrong_shape


def test_prompt_file_defines_the_default_types_and_rejects_unknown_ones(tmp_path):
    prompts = load_prompts(None, {"question": 2, "claim": 1, "keyword": 0})
    assert set(prompts) == {"question", "claim"}
    with pytest.raises(ValueError, match="sdg.query_types: type 'haiku'"):
        load_prompts(None, {"haiku": 1})
    bad = tmp_path / "p.yaml"
    bad.write_text("question:\n  instruction: x\n")
    with pytest.raises(ValueError, match="lacks"):
        load_prompts(str(bad), {"question": 1})


@pytest.mark.parametrize("raw, qtype, want", [
    ("1. How do I use heapq.heappush?\nMore text", "question", "How do I use heapq.heappush?"),
    ('Question: "what does json.dumps do?"', "question", "what does json.dumps do?"),
    ("The text supports the claim that aspirin lowers adenoma risk. It also says more.", "claim",
     "Aspirin lowers adenoma risk."),
    ("- json.dumps sort_keys", "keyword", "json.dumps sort_keys"),
    ("The main finding of this text is that PGE2 enhances lung fibrosis. More.", "claim", "PGE2 enhances lung fibrosis."),
])
def test_clean_query(raw, qtype, want):
    spec = load_prompts(None, {qtype: 1})[qtype]
    assert clean_query(raw, spec) == want


def test_shape_checks():
    prompts = load_prompts(None, {"question": 1, "claim": 1})
    assert wrong_shape("Sure, here is a question for you.", prompts["question"])
    assert not wrong_shape("What is X?", prompts["question"])
    assert wrong_shape("Is aspirin good?", prompts["claim"])
    # SmolLM2's replies about the task instead of a fact from the text
    for reply in ("Yes, the text supports or refutes the claim.", "This claim is not supported by the provided text.",
                  "A single sentence.", "The text concludes with a factual claim."):
        assert wrong_shape(reply, prompts["claim"]), reply
    assert not wrong_shape("Loss of Nrf2 does not protect mice from fibrosis.", prompts["claim"])
    keyword = load_prompts(None, {"keyword": 1})["keyword"]
    assert wrong_shape("You've already done it. Here's the full example of it:", keyword)
    assert not wrong_shape("json.dumps sort_keys", keyword)


def test_shard_tasks_skip_finished_shards():
    tasks = shard_tasks(100, 32, done={1})
    assert [t["shard_id"] for t in tasks] == [0, 2, 3]
    assert tasks[-1] == {"shard_id": 3, "start": 96, "stop": 100}


def test_queries_scale_with_chunk_length_when_asked():
    from pipeline.sdg import queries_for

    assert queries_for(40, 3, None) == 3  # off by default
    assert [queries_for(t, 3, 200) for t in (10, 70, 130, 200, 400)] == [1, 1, 2, 3, 3]
    assert queries_for(10, 0, 200) == 0


def test_every_packaged_query_type_has_what_the_generator_needs():
    from pipeline.sdg import load_prompts

    prompts = load_prompts(None, {"question": 1, "claim": 1, "keyword": 1, "paraphrase": 1})
    assert set(prompts) == {"question", "claim", "keyword", "paraphrase"}


def test_multihop_queries_pair_a_chunk_with_the_next_of_its_document(tmp_path):
    """Real SmolLM2, greedy: prompts pair a chunk with its successor in the same document (also across
    the shard's edge), and each multi-hop query names that successor as a further positive."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import load_config
    from pipeline.corpus import CHUNK_SCHEMA
    from pipeline.sdg import QueryGenerator

    texts = {"A#0": "The json module encodes Python objects as JSON text with json.dumps.",
             "A#1": "json.dumps accepts indent to pretty-print and sort_keys to order object keys.",
             "B#0": "The heapq module implements a priority queue on top of a plain list.",
             "B#1": "heapq.heappop removes and returns the smallest item, keeping the heap invariant."}
    rows = [{"chunk_id": cid, "doc_id": cid[0], "title": "", "text": t, "chunk_index": int(cid[-1]), "n_tokens": 16}
            for cid, t in texts.items()]
    pq.write_table(pa.Table.from_pylist(rows, CHUNK_SCHEMA), tmp_path / "chunks.parquet")
    sdg = load_config(None, ["sdg.query_types.question=0", "sdg.query_types.keyword=0", "sdg.query_types.multihop=1",
                             "sdg.temperature=0"]).sdg
    gen = QueryGenerator(str(tmp_path / "chunks.parquet"), str(tmp_path / "shards"), sdg, seed=1)
    summary = gen.process({"shard_id": 0, "start": 0, "stop": 3})  # B#1 lies past the shard's edge
    assert summary["pairs"] == 2  # A#0+A#1 and B#0+B#1; A#1's successor is another document
    out = pq.read_table(tmp_path / "shards" / "shard-00000.parquet").to_pylist()
    assert out, "greedy SmolLM2 wrote no usable multi-hop question"
    partner = {"A#0": ["A#1"], "B#0": ["B#1"]}
    assert all(r["related_chunk_ids"] == partner[r["chunk_id"]] and r["query_type"] == "multihop" for r in out)


def test_first_chunks_only_get_queries_when_asked(tmp_path):
    """sdg.chunks=first (documents seen through their first chunk): real SmolLM2 via llama.cpp, greedy; the
    shard's other chunks get no prompt at all, and the shard counts only the chunks it wrote about."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import load_config
    from pipeline.corpus import CHUNK_SCHEMA
    from pipeline.sdg import QueryGenerator

    texts = {"A#0": "The json module encodes Python objects as JSON text with json.dumps.",
             "A#1": "json.dumps accepts indent to pretty-print and sort_keys to order object keys.",
             "B#0": "The heapq module implements a priority queue on top of a plain list."}
    rows = [{"chunk_id": cid, "doc_id": cid[0], "title": "", "text": t, "chunk_index": int(cid[-1]), "n_tokens": 16}
            for cid, t in texts.items()]
    pq.write_table(pa.Table.from_pylist(rows, CHUNK_SCHEMA), tmp_path / "chunks.parquet")
    sdg = load_config(None, ["sdg.query_types.question=1", "sdg.query_types.keyword=0", "sdg.temperature=0",
                             "sdg.backend=llamacpp", "sdg.chunks=first"]).sdg
    gen = QueryGenerator(str(tmp_path / "chunks.parquet"), str(tmp_path / "shards"), sdg, seed=1)
    summary = gen.process({"shard_id": 0, "start": 0, "stop": 3})
    out = pq.read_table(tmp_path / "shards" / "shard-00000.parquet").to_pylist()
    assert summary["chunks"] == 2 and out and {r["chunk_id"] for r in out} <= {"A#0", "B#0"}


def test_prompt_wording_is_part_of_the_sdg_stage_identity(tmp_path, monkeypatch):
    """Editing the prompts file (same config) must make SDG write again, not resume old shards."""
    from pipeline import sdg
    from pipeline.config import load_config
    from pipeline.runner import config_hash

    cfg = load_config(None, [])
    before = {stage: config_hash(stage, cfg) for stage in ("sdg", "prep")}
    edited = tmp_path / "prompts.yaml"
    edited.write_text(sdg.DEFAULT_PROMPTS.read_text().replace("Write one search question", "Write one short question"))
    monkeypatch.setattr(sdg, "DEFAULT_PROMPTS", edited)  # the packaged file, edited in place
    assert config_hash("sdg", cfg) != before["sdg"]
    assert config_hash("prep", cfg) == before["prep"]


def test_example_queries_file_is_checked_and_is_part_of_the_sdg_identity(tmp_path):
    from pipeline.config import load_config
    from pipeline.runner import config_hash
    from pipeline.sdg import MAX_EXAMPLE_QUERIES, load_example_queries

    path = tmp_path / "examples.txt"
    path.write_text("".join(f"query number {i}\n" for i in range(12)))
    assert load_example_queries(str(path)) == [f"query number {i}" for i in range(MAX_EXAMPLE_QUERIES)]
    cfg = load_config(None, [f"sdg.example_queries={path}"])
    before = config_hash("sdg", cfg)
    assert before != config_hash("sdg", load_config(None, []))
    path.write_text("another style of query\n")  # same path, new text: SDG must write again
    assert config_hash("sdg", cfg) != before
    path.write_text("\n# only a comment\n")
    with pytest.raises(ValueError, match=f"{path} holds no query"):
        load_example_queries(str(path))
    path.write_text("fine query\n" + "x" * 400 + "\n")
    with pytest.raises(ValueError, match=f"{path} line 2 is over 300 characters"):
        load_example_queries(str(path))
    with pytest.raises(ValueError, match="cannot read"):
        load_example_queries(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("query, loops", [
    ("What is the difference between timedelta() and timedelta? How to calculate timedelta()? "
     "How to implement timedelta()?", True),  # kept by `make demo` before this check
    ("How does heapq.heappush keep the heap invariant?", False),
    ("Does json.dumps sort keys? Does it escape unicode?", False),
    ("Aspirin lowers adenoma risk in patients with prior adenomas.", False),
    ("reset reset reset the router", True),
])
def test_a_reply_that_repeats_itself_is_dropped(query, loops):
    from pipeline.sdg import repetitive

    assert repetitive(query) is loops


@pytest.mark.parametrize("query, copied", [
    ("Loss of Nrf2 worsens bleomycin-induced lung fibrosis in mice.", True),  # the prompt's worked example
    ("Loss of Nrf2 worsens bleomycin induced fibrosis in the lung of mice", True),  # reworded a little
    ("BLM gene encodes RecQ-class DNA helicase.", True),  # a user's example, verbatim
    ("Nrf2 knockout has no effect on cisplatin nephrotoxicity in rats.", False),  # same topic, its own claim
    ("WRN encodes a RecQ helicase mutated in Werner syndrome.", False),
])
def test_a_reply_that_copies_an_example_is_dropped(query, copied):
    from pipeline.sdg import copies_example

    examples = ["Loss of Nrf2 worsens bleomycin-induced lung fibrosis in mice.", "BLM gene encodes RecQ-class DNA helicase."]
    assert copies_example(query, examples) is copied


def test_a_reply_that_borrows_the_examples_topic_is_dropped():
    """SmolLM2 given SciFact claims as examples wrote their topics into other abstracts' claims."""
    from pipeline.sdg import leaks_example, rare_example_words

    examples = ["Drosophila supracellular actomyosin structures are found at boundaries in wing imaginal discs.",
                "Rising temperatures lower the risk of dengue fever transmission."]
    chunks = ([f"Patients with chronic kidney disease were studied; risk factors and structures {i}." for i in range(60)]
              + ["Dengue fever transmission by Aedes mosquitoes rises with temperatures."])
    rare = rare_example_words(examples, chunks, max_share=0.05)
    assert {"drosophila", "dengue", "actomyosin"} <= rare and not {"risk", "structures"} & rare  # common words stay
    kidney = chunks[0]
    assert leaks_example("Drosophila actomyosin regulates kidney disease risk.", kidney, rare)
    assert not leaks_example("Chronic kidney disease raises the risk of cardiac structures failing.", kidney, rare)
    assert not leaks_example("Higher temperatures raise dengue fever transmission.", chunks[-1], rare)  # its own words


def test_finished_shards_become_the_final_table_in_shard_order_without_any_llm(tmp_path):
    """Every shard already written (a rerun after a crash at the last shard): no LLM actor starts, the
    final table is the shards' rows in shard order, and the manifest counts them as resumed."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import sdg
    from pipeline.config import load_config
    from pipeline.corpus import CHUNK_SCHEMA
    from pipeline.rundir import RunDir, StageRecorder

    run = RunDir(tmp_path / "run")
    chunks = [{"chunk_id": f"c{i}", "doc_id": f"d{i}", "title": "", "text": f"text {i}", "chunk_index": 0,
               "n_tokens": 2} for i in range(5)]
    with StageRecorder(run, "corpus", "h", {}) as rec:
        pq.write_table(pa.Table.from_pylist(chunks, CHUNK_SCHEMA), rec.output("chunks.parquet"))
    cfg = load_config(None, ["sdg.shard_size=2", "sdg.query_types.question=1", "sdg.query_types.keyword=0"])
    with StageRecorder(run, "sdg", "h", {}) as rec:
        for shard_id, start in enumerate(range(0, 5, 2)):
            rows = [{"qa_id": f"c{i}::question0", "query": f"what is text {i}?", "chunk_id": f"c{i}", "doc_id": f"d{i}",
                     "query_type": "question", "generator": "g", "related_chunk_ids": None}
                    for i in range(start, min(start + 2, 5))]
            sdg.write_shard(pa.Table.from_pylist(rows, sdg.QA_SCHEMA), rec.dir / "shards", shard_id,
                            {"shard_id": shard_id, "chunks": len(rows), "queries": len(rows), "origin": "openai:g"})
        sdg.run_stage(cfg, run, rec)
    qa = pq.read_table(run.root / "sdg" / "qa.parquet")
    assert qa.column("qa_id").to_pylist() == [f"c{i}::question0" for i in range(5)]
    counts = json.loads((run.root / "sdg" / "manifest.json").read_text())["counts"]
    assert counts["qa_pairs"] == 5 and counts["shards"] == 3 and counts["resumed_shards"] == 3
