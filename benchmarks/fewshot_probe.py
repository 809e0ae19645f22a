"""Does a small generator copy the style of example queries, or their topic? (issue 18)

48 SciFact abstracts (3,000-3,047 of the corpus, not used by the examples) get one claim each from the
packaged SmolLM2-135M-Instruct (transformers backend, greedy), with the 8 example claims that
`benchmarks/scifact.py --setting few-shot` uses (SciFact train claims, seeded sample) placed three ways:

    none     no examples (the zero-label prompt)
    last     after the chunk, before the instruction (`sdg.example_queries`, Promptagator's layout)
    system   in a system message before everything

Per variant: mean words per claim (SciFact's human claims average ~12), claims that copy an example
(`sdg.copies_example`), and claims that borrow the examples' topic (`sdg.leaks_example`: a rare word
of the examples, in under 2% of the corpus's abstracts, that the claim's own abstract lacks).

    .venv/bin/python benchmarks/fewshot_probe.py      # ~5 min on 2 CPU cores
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_result  # noqa: E402
from benchmarks.scifact import SCIFACT, write_example_queries  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.beir import passage_text  # noqa: E402
from pipeline.llm import make_engine, prompt_messages  # noqa: E402
from pipeline.sdg import clean_query, copies_example, leaks_example, load_prompts, rare_example_words  # noqa: E402


def main() -> int:
    corpus = [json.loads(line) for line in (SCIFACT / "corpus.jsonl").read_text().splitlines()]
    docs = corpus[3000:3048]
    examples = write_example_queries(SCIFACT, ROOT / "benchmarks" / "work" / "fewshot-examples.txt").read_text().split("\n")
    examples = [e for e in examples if e]
    rare = rare_example_words(examples, [passage_text(d["title"], d["text"]) for d in corpus])
    cfg = load_config(None, ["sdg.query_types.claim=1", "sdg.query_types.question=0", "sdg.query_types.keyword=0"])
    spec = load_prompts(None, cfg.sdg.query_types)["claim"]
    engine = make_engine(cfg.sdg)
    texts = [engine.fit_to_context(passage_text(d["title"], d["text"]))[0] for d in docs]
    style = "Users of this collection write queries like these:\n" + "".join(f"- {q}\n" for q in examples)
    layouts = {"none": lambda t: prompt_messages(t, spec),
               "last": lambda t: prompt_messages(t, spec, examples=examples),
               "system": lambda t: [{"role": "system", "content": style}, *prompt_messages(t, spec)]}
    rows = []
    for name, layout in layouts.items():
        t0 = time.perf_counter()
        replies = engine.generate([layout(t) for t in texts], 1, stop_at_newline=True)
        claims = [clean_query(r[0], spec) for r in replies]
        row = {"layout": name, "claims": len(claims),
               "mean_words": round(sum(len(c.split()) for c in claims) / len(claims), 1),
               "copied_example": sum(copies_example(c, examples) for c in claims),
               "leaked_example": sum(leaks_example(c, t, rare) for c, t in zip(claims, texts)),
               "seconds": round(time.perf_counter() - t0, 1), "sample": claims[:3]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    path = write_result("fewshot-probe", {"generator": cfg.sdg.llm, "abstracts": "SciFact corpus rows 3000-3047",
                                          "examples": examples, "rare_example_words": sorted(rare), "results": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
