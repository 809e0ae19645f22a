"""A rerank request read and checked: Cohere's and Jina's /v1/rerank body, or TEI's /rerank body, as one
`RerankRequest`, or a `BadRequest` that names the field. No model here: the caller gives the token counter.

Both forms count limits the same way: documents per request, characters per text (bounding tokenizer work),
and tokens per (query, document) pair, which is what a cross-encoder reads. A pair over the model's length
answers 413 naming the limit unless the request asks to cut the document ('truncate': 'END' keeps its start,
'START' its end); the query itself is never cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# What each form calls its fields: (documents, how many to return, return the texts, raw logits).
FORMS = {"cohere": ("documents", "top_n", "return_documents", None),
         "tei": ("texts", None, "return_text", "raw_scores")}
# Over-long inputs: NIM's `truncate` values (NONE: a 413 naming the limit), plus OpenAI/TEI-style `true`.
# The embedding endpoint reads the same values.
TRUNCATE = {None: "NONE", False: "NONE", "NONE": "NONE", True: "END", "END": "END", "START": "START"}


class BadRequest(ValueError):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class RerankRequest:
    query: str
    documents: list[str]       # as the model reads them (cut where the request asked)
    originals: list[str]       # as sent, for return_documents
    top_n: int
    return_documents: bool
    raw_scores: bool
    tokens: int                # tokens of all pairs as read, special tokens included


def _flag(body: dict, name: str | None) -> bool:
    value = body.get(name, False) if name else False
    if not isinstance(value, bool):
        raise BadRequest(400, f"'{name}' must be true or false")
    return value


def _texts(body: dict, field: str) -> list[str]:
    docs = body.get(field)
    if docs is None:
        raise BadRequest(400, f"request body must have a '{field}' field (a list of strings)")
    if not isinstance(docs, list):
        raise BadRequest(400, f"'{field}' must be a list")
    texts = []
    for i, d in enumerate(docs):
        if isinstance(d, dict) and field == "documents":
            d = d.get("text")
        if not isinstance(d, str):
            shape = "a string or an object with a 'text' string" if field == "documents" else "a string"
            raise BadRequest(400, f"'{field}' item {i} must be {shape}")
        if not d.strip():
            raise BadRequest(400, f"'{field}' item {i} is an empty string")
        texts.append(d)
    if not texts:
        raise BadRequest(400, f"'{field}' is empty")
    return texts


def parse(body, form: str, model_name: str, max_documents: int, max_chars: int, max_pair_tokens: int,
          special_pair_tokens: int, count_tokens: Callable[[list[str]], list[list[int]]],
          decode: Callable[[list[int]], str]) -> RerankRequest:
    """The request in `form` ('cohere' or 'tei'), checked against the limits; `count_tokens` gives each text's
    ids without special tokens, `decode` turns ids back into text (for 'START')."""
    docs_field, top_n_field, return_field, raw_field = FORMS[form]
    if not isinstance(body, dict):
        raise BadRequest(400, "request body must be a JSON object with 'query' and "
                              f"'{docs_field}' fields")
    if body.get("model") not in (None, model_name):
        raise BadRequest(404, f"the model {body['model']!r} does not exist here; /v1/rerank serves "
                              f"{model_name!r}", code="model_not_found")
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise BadRequest(400, "'query' must be a non-empty string")
    originals = _texts(body, docs_field)
    if len(originals) > max_documents:
        raise BadRequest(413, f"{len(originals)} {docs_field} exceed the limit of {max_documents} per request")
    n = len(originals)
    top_n = body.get(top_n_field) if top_n_field else None
    if top_n is None:
        top_n = n
    elif isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= n:
        raise BadRequest(400, f"'{top_n_field}' must be an integer from 1 to the number of {docs_field} ({n}); "
                              f"got {top_n!r}")
    raw = body.get("truncate")
    truncate = TRUNCATE.get(raw) if isinstance(raw, (str, bool, type(None))) else None
    if truncate is None:
        raise BadRequest(400, "'truncate' must be 'NONE', 'END', 'START' (or true, meaning 'END')")
    if len(query) > max_chars:
        raise BadRequest(413, f"'query' has more than {max_chars} characters")
    docs = originals
    if truncate != "NONE":  # the character cap bounds tokenizer work; tokens decide below
        docs = [d[:max_chars] if truncate == "END" else d[-max_chars:] for d in docs]
    too_long = next((i for i, d in enumerate(docs) if len(d) > max_chars), None)
    if too_long is not None:
        raise BadRequest(413, f"'{docs_field}' item {too_long} has more than {max_chars} characters "
                              "(send 'truncate': 'END' or 'START' to cut it instead)")
    query_ids, *doc_ids = count_tokens([query, *docs])
    room = max_pair_tokens - special_pair_tokens - len(query_ids)  # tokens left for a document
    if room < 1:
        raise BadRequest(413, f"'query' has {len(query_ids)} tokens; this reranker reads at most "
                              f"{max_pair_tokens} per (query, document) pair, the document included")
    over = [i for i, ids in enumerate(doc_ids) if len(ids) > room]
    if over and truncate == "NONE":
        i = over[0]
        raise BadRequest(413, f"'{docs_field}' item {i} makes a pair of {len(doc_ids[i]) + max_pair_tokens - room} "
                              f"tokens with the query; this reranker reads at most {max_pair_tokens} per pair "
                              "(send 'truncate': 'END' or 'START' to cut documents instead)")
    if truncate == "START":  # keep the end (the tokenizer would cut the end)
        docs = list(docs)
        for i in over:
            docs[i] = decode(doc_ids[i][-room:])
    tokens = sum(max_pair_tokens - room + min(len(ids), room) for ids in doc_ids)
    return RerankRequest(query, docs, originals, top_n, _flag(body, return_field), _flag(body, raw_field), tokens)
