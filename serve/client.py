"""A small client for the OpenAI-compatible embedding endpoint."""

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
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = requests.post(f"{url.rstrip('/')}/v1/embeddings", json=body, timeout=timeout, headers=headers)
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except Exception:
            message = r.text[:200]
        raise EndpointError(f"{url} answered {r.status_code}: {message}")
    data = sorted(r.json()["data"], key=lambda d: d["index"])
    if encoding_format == "base64":
        return [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").tolist() for d in data]
    return [d["embedding"] for d in data]
