import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.corpus import (Chunker, CorpusError, ReadReport, detect_format, read_documents,
                             sample_documents, write_chunks)


def _read(path, fmt="auto"):
    report = ReadReport()
    return list(read_documents(str(path), fmt, 5, report)), report


def test_folder_recursive_skips_and_counts_bad_files(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.md").write_text("# Router guide\nReset with `fw-reset --hard` on RT-4410.")
    (tmp_path / "sub" / "deeper" / "b.txt").write_text("Bug CSCwx12345 affects firmware 17.9.4a.")
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    docs, report = _read(tmp_path)
    assert {d.doc_id for d in docs} == {"a.md", "sub/deeper/b.txt"}
    assert docs[0].title == "Router guide"
    assert report.skipped == {"empty file": 1, "binary file": 1, "not UTF-8 (byte 3)": 1,
                              "not a text file (.png)": 1}
    assert any("latin1.txt" in e for e in report.examples)


def test_empty_folder_and_missing_path_are_errors(tmp_path):
    with pytest.raises(CorpusError, match="empty"):
        _read(tmp_path)
    with pytest.raises(CorpusError, match="not found"):
        _read(tmp_path / "nope")


def test_nothing_usable_names_the_file(tmp_path):
    (tmp_path / "only.txt").write_bytes(b"\xff\xfe\x00bad")
    report = ReadReport()
    docs = read_documents(str(tmp_path), "auto", 5, report)
    with pytest.raises(CorpusError, match="only.txt"):
        write_chunks(docs, tmp_path / "chunks.parquet", None, None, report)
    assert not (tmp_path / "chunks.parquet").exists()


def test_jsonl_bad_rows_are_skipped_with_line_numbers(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"id": "d1", "title": "T", "text": "hello"}\n{not json}\n{"id": "d3"}\n["x"]\n'
                 '{"_id": 4, "text": "beir style"}\n')
    docs, report = _read(f)
    assert [d.doc_id for d in docs] == ["d1", "4"]
    assert report.skipped == {"invalid JSON (Expecting property name enclosed in double quotes)": 1,
                              "missing or empty field 'text'": 1, "row is not a JSON object": 1}
    assert any(e.startswith(f"{f}:2") for e in report.examples)


def test_parquet_beir_and_hf_sources(tmp_path):
    pq.write_table(pa.table({"id": ["p1", "p2"], "title": ["A", "B"], "text": ["alpha", "beta"]}),
                   tmp_path / "docs.parquet")
    docs, _ = _read(tmp_path / "docs.parquet")
    assert [d.text for d in docs] == ["alpha", "beta"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(CorpusError, match="bad.parquet.*'text'"):
        _read(tmp_path / "bad.parquet")

    beir = tmp_path / "beir"
    beir.mkdir()
    (beir / "corpus.jsonl").write_text(json.dumps({"_id": "c1", "title": "t", "text": "claim text"}) + "\n")
    assert detect_format(str(beir)) == "beir"
    assert [d.doc_id for d in _read(beir)[0]] == ["c1"]

    import datasets

    datasets.Dataset.from_dict({"id": ["h1"], "title": [""], "text": ["from hf"]}).save_to_disk(tmp_path / "hf")
    assert detect_format(str(tmp_path / "hf")) == "hf"
    assert [d.text for d in _read(tmp_path / "hf")[0]] == ["from hf"]


def test_chunker_windows_overlap_and_cover_text(base_model):
    chunker = Chunker(base_model, chunk_tokens=32, overlap=8)
    text = " ".join(f"word{i}" for i in range(200))
    pieces = chunker.split(text)
    assert len(pieces) > 3
    assert all(n <= 32 for _, n in pieces)
    assert pieces[0][0].startswith("word0") and pieces[-1][0].endswith("word199")
    assert pieces[0][0].split()[-1] in pieces[1][0]  # neighbours share the overlap


def test_prechunked_input_keeps_ids_and_documents(tmp_path):
    f = tmp_path / "chunks.jsonl"
    f.write_text('{"id": "vec-17", "doc_id": "manual-3", "text": "chunk one"}\n'
                 '{"id": "vec-18", "doc_id": "manual-3", "text": "chunk two"}\n')
    report = ReadReport()
    n = write_chunks(read_documents(str(f), "auto", 5, report), tmp_path / "out.parquet", None, None, report)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert n == 2 and [r["chunk_id"] for r in rows] == ["vec-17", "vec-18"]
    assert {r["doc_id"] for r in rows} == {"manual-3"}


def test_sample_corpus_is_real_stdlib_documentation():
    docs = list(sample_documents(5))
    assert len(docs) == 5 and docs[0].doc_id == "stdlib/json"
    assert "json.dumps(" in docs[0].text
