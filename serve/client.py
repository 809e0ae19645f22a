"""A small client for the endpoint: /v1/embeddings (OpenAI's shape) and /v1/rerank (Cohere's and Jina's)."""

from __future__ import annotations

import base64

import numpy as np
import requests


class EndpointError(RuntimeError):
    pass


def embed(url: str, texts: list[str], model: str | None = None, encoding_format: str = "float",
          timeout: float = 60.0, token: str | None = None, input_type: str | None = None,
          truncate: str = "NONE") -> list[list[float]]:
    """Embeddings from a /v1/embeddings endpoint; input_type 'query' or 'passage' applies the model's prompt;
    truncate 'END' or 'START' cuts inputs longer than the model reads (the default 'NONE' answers 413)."""
    body = {"input": texts, "encoding_format": encoding_format, "truncate": truncate}
    if model:
        body["model"] = model
    if input_type:
        body["input_type"] = input_type
    data = sorted(_post(url, "/v1/embeddings", body, timeout, token)["data"], key=lambda d: d["index"])
    if encoding_format == "base64":
        return [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").tolist() for d in data]
    return [d["embedding"] for d in data]


def rerank(url: str, query: str, documents: list[str], top_n: int | None = None, return_documents: bool = False,
           truncate: str = "NONE", timeout: float = 60.0, token: str | None = None) -> list[dict]:
    """`documents` ranked for `query` by a /v1/rerank endpoint: [{index, relevance_score, document?}], best first;
    truncate 'END' or 'START' cuts documents whose pair with the query is longer than the reranker reads."""
    body = {"query": query, "documents": documents, "return_documents": return_documents, "truncate": truncate}
    if top_n is not None:
        body["top_n"] = top_n
    return _post(url, "/v1/rerank", body, timeout, token)["results"]


def _post(url: str, path: str, body: dict, timeout: float, token: str | None) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = requests.post(f"{url.rstrip('/')}{path}", json=body, timeout=timeout, headers=headers)
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except Exception:
            message = r.text[:200]
        raise EndpointError(f"{url} answered {r.status_code}: {message}")
    return r.json()
