import json
import shutil

import numpy as np
import torch
import pytest

from pipeline.embedders import OnnxEmbedder
from pipeline.export import export_onnx, parity_gate

TEXTS = ["json.dumps serialises obj to a JSON formatted str", "x",
         "Bug CSCwx12345 affects firmware 17.9.4a on RT-4410 routers " * 12]


@pytest.fixture(scope="module")
def exported(base_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(base_model, out, opset=17)
    return out


def test_onnx_graph_alone_gives_normalised_embeddings_matching_torch(base_model, exported):
    info = json.loads((exported / "export.json").read_text())
    assert info["dimension"] == 384 and info["pooling"] == "mean" and info["opset"] == 17
    emb = OnnxEmbedder(exported).encode(TEXTS)
    assert emb.shape == (3, 384)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    single = OnnxEmbedder(exported).encode(TEXTS[:1])  # batch of one: no padding, other sequence length
    assert np.allclose(single[0], emb[0], atol=1e-5)
    report = parity_gate(base_model, exported, TEXTS, 0.9999, devices=[])
    assert report["passed"] and set(report["checks"]) == {"onnx", "onnx-optimized"}


def test_optimised_graph_is_smaller_in_nodes_and_gives_the_same_embeddings(exported):
    import onnx

    info = json.loads((exported / "export.json").read_text())
    plain = onnx.load(str(exported / "model.onnx"))
    optimized = onnx.load(str(exported / info["optimized"]))
    assert len(optimized.graph.node) < 0.8 * len(plain.graph.node)  # fusions really happened
    a = OnnxEmbedder(exported, optimized=False).encode(TEXTS)
    b = OnnxEmbedder(exported).encode(TEXTS)
    assert np.allclose(a, b, atol=1e-5)


def test_model_prompts_travel_with_the_export_and_apply_by_input_type(base_model, tmp_path):
    from pipeline.embedders import load_model

    st = load_model(base_model, device="cpu")
    st.prompts = {"query": "query: ", "passage": "passage: "}
    st.save(str(tmp_path / "prompted"))
    export_onnx(tmp_path / "prompted", tmp_path / "onnx", opset=17)
    onnx_model = OnnxEmbedder(tmp_path / "onnx")
    assert onnx_model.prompts == {"query": "query: ", "passage": "passage: "}
    as_query = onnx_model.encode(TEXTS[:1], input_type="query")
    assert np.allclose(as_query, onnx_model.encode(["query: " + TEXTS[0]]), atol=1e-5)
    assert not np.allclose(as_query, onnx_model.encode(TEXTS[:1]), atol=1e-3)
    torch_query = st.encode(TEXTS[:1], prompt_name="query", normalize_embeddings=True)
    assert float(np.sum(torch_query * as_query)) > 0.9999


def test_without_tensorrt_the_export_says_why(monkeypatch):
    import onnxruntime as ort

    from pipeline.onnx_models import tensorrt_unavailable

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    why = tensorrt_unavailable()
    assert "TensorrtExecutionProvider" in why and "CPU" in why


def test_parity_gate_catches_a_diverging_model(base_model, exported, tmp_path):
    """An export that does not match the torch model (here: perturbed weights) must fail the gate."""
    import torch

    from pipeline.embedders import load_model

    st = load_model(base_model, device="cpu")
    with torch.no_grad():
        for p in st.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    st.save(str(tmp_path / "perturbed"))
    report = parity_gate(tmp_path / "perturbed", exported, TEXTS, 0.9999, devices=[])
    assert not report["passed"] and report["min_cosine"] < 0.9999


def test_int8_variant_stays_close_to_fp32(exported, tmp_path):
    from pipeline.export import quantize_int8

    fp32 = tmp_path / "fp32"
    shutil.copytree(exported, fp32)
    (fp32 / "trt_cache").mkdir()  # an fp32 TensorRT engine the export stage built on a GPU machine
    (fp32 / "trt_cache" / "model_fp16.engine").write_bytes(b"fp32 graph's engine")
    int8 = quantize_int8(fp32, tmp_path / "int8")
    assert not (int8 / "trt_cache").exists()  # 'auto' would otherwise load the fp32 graph's engine
    assert json.loads((int8 / "export.json").read_text())["quantization"] == "int8-dynamic-per-channel"
    assert (int8 / "model.onnx").stat().st_size < 0.5 * (exported / "model.onnx").stat().st_size
    a, b = OnnxEmbedder(exported).encode(TEXTS), OnnxEmbedder(int8).encode(TEXTS)
    assert np.min(np.sum(a * b, axis=1)) > 0.97  # close, but not identical: the loss is measured, not assumed



def test_one_embedder_serves_several_threads_at_once(exported):
    """The endpoint embeds in worker threads (a lone request beside a batch) while its event loop counts
    tokens. A fast tokenizer holds its padding/truncation setting as state: one shared across threads
    returned ragged, unpadded ids ("setting an array element with a sequence", HTTP 500s) and padded
    token counts."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    emb = OnnxEmbedder(exported)
    texts = [("router firmware " * (1 + (i * 7) % 60)).strip() for i in range(48)]
    want = emb.encode(texts, batch_size=8)
    want_ids = emb.token_ids(texts)

    def job(k):
        if k % 2:
            return emb.token_ids(texts)
        return emb.encode(texts[k % 12::6], batch_size=4)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so an unguarded interleaving shows up at once
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            results = list(pool.map(job, range(120)))
    finally:
        sys.setswitchinterval(interval)
    for k, got in enumerate(results):
        if k % 2:
            assert got == want_ids
        else:
            np.testing.assert_allclose(got, want[k % 12::6], atol=1e-5)



def test_export_and_int8_keep_the_console_quiet(base_model, tmp_path, caplog):
    """Tracer warnings ("might cause the trace to be incorrect") and ONNX Runtime's pre-processing advice
    filled the console of every run, where a user reads them as failures; the parity gate is the check."""
    import logging
    import warnings

    from pipeline.export import quantize_int8

    with warnings.catch_warnings(record=True) as shown, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        export_onnx(base_model, tmp_path / "onnx", opset=17)
        quantize_int8(tmp_path / "onnx", tmp_path / "int8")
    noisy = [str(w.message)[:80] for w in shown
             if issubclass(w.category, torch.jit.TracerWarning) or "aten::index" in str(w.message)]
    assert not noisy, noisy
    assert "pre-processing" not in caplog.text


def test_a_reranker_exports_with_its_head_in_the_graph_and_its_parity_gate_catches_a_diverging_one(base_model,
                                                                                                    tmp_path):
    """The graph alone scores pairs as torch does (the pair length travels with it); perturbed torch weights
    fail the gate; the int8 variant is a different graph that stays close."""
    from pipeline.crossencoder import OnnxReranker, Reranker, load_pair_model, load_reranker, save_reranker
    from pipeline.export import export_reranker_onnx, quantize_int8, reranker_parity_gate

    hf, tok = load_pair_model(base_model)
    save_reranker(hf, tok, tmp_path / "model", 64)
    export_reranker_onnx(tmp_path / "model", tmp_path / "onnx", opset=17)
    pairs = [("which firmware has the bug", t) for t in TEXTS] + [("a long query " * 3, "short")]
    report = reranker_parity_gate(tmp_path / "model", tmp_path / "onnx", pairs, 1e-3, devices=[])
    assert report["passed"] and report["max_abs_diff"]["onnx-optimized"] < 1e-4
    onnx = load_reranker(tmp_path / "onnx")
    assert isinstance(onnx, OnnxReranker) and onnx.max_tokens == 64
    assert onnx.pair_tokens("a b", ["c"] * 2) == [3 + len(onnx.token_ids(["a b"])[0]) + 1] * 2
    np.testing.assert_allclose(onnx.score_pairs(pairs), Reranker(str(tmp_path / "model")).score_pairs(pairs),
                               atol=1e-4)

    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_reranker(hf, tok, tmp_path / "perturbed", 64)
    assert not reranker_parity_gate(tmp_path / "perturbed", tmp_path / "onnx", pairs, 1e-3, devices=[])["passed"]

    quantize_int8(tmp_path / "onnx", tmp_path / "int8")
    diff = np.abs(OnnxReranker(tmp_path / "int8").score_pairs(pairs) - onnx.score_pairs(pairs)).max()
    assert 0 < diff < 0.1
