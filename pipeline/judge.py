"""Relevance judges: how likely a passage answers a query, as a probability in [0, 1].

Used by prep twice: as a second opinion on hard-negative candidates (a candidate the judge rates about
as relevant as the query's own positive is probably a false negative), and optionally to score each
synthetic query against its own chunk with a written rubric (QUERY_RUBRIC), dropping poor queries.
Two kinds, one interface:
- `LLMJudge`: a causal LLM asked "Does the passage answer the question?", scored by the next-token
  probability of yes vs no (one forward pass per pair, no sampling, so it is deterministic).
- `CrossEncoderJudge`: a sentence-transformers CrossEncoder folder (e.g. an ms-marco re-ranker).
"""

from __future__ import annotations

import numpy as np

from pipeline.config import JudgeChoice

JUDGE_PROMPT = ("Passage: {passage}\n\nQuery: {query}\n\n"
                "Does the passage answer the query? Answer yes or no.")
# The rubric for judging a synthetic query against the chunk it was written for.
QUERY_RUBRIC = ("Passage: {passage}\n\nSearch query: {query}\n\n"
                "A good search query (1) is answered by the passage, (2) asks about the passage's specific "
                "content (names, identifiers, numbers, facts) rather than about the passage itself, and (3) reads "
                "like something a person would type into a search box. Is this a good search query for the "
                "passage? Answer yes or no.")


class LLMJudge:
    def __init__(self, model_path: str, batch_size: int = 8, max_passage_tokens: int = 384,
                 template: str = JUDGE_PROMPT):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.tok.padding_side = "left"  # the last position must be the answer slot for every row
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.device, self.batch_size, self.max_passage_tokens = device, batch_size, max_passage_tokens
        self.template = template
        self.yes = self._first_tokens(["yes", "Yes", " yes", " Yes"])
        self.no = self._first_tokens(["no", "No", " no", " No"])

    def _first_tokens(self, words: list[str]) -> list[int]:
        return sorted({self.tok.encode(w, add_special_tokens=False)[0] for w in words})

    def _prompt(self, query: str, passage: str) -> str:
        ids = self.tok.encode(passage, add_special_tokens=False)[:self.max_passage_tokens]
        content = self.template.format(passage=self.tok.decode(ids), query=query)
        if self.tok.chat_template:
            return self.tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)
        return content + "\nAnswer:"  # base (non-chat) models: completion style

    def score(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        torch, out = self.torch, []
        for i in range(0, len(pairs), self.batch_size):
            prompts = [self._prompt(q, p) for q, p in pairs[i:i + self.batch_size]]
            enc = self.tok(prompts, return_tensors="pt", padding=True).to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits[:, -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            margin = torch.logsumexp(logp[:, self.yes], -1) - torch.logsumexp(logp[:, self.no], -1)
            out.append(torch.sigmoid(margin).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)


class CrossEncoderJudge:
    def __init__(self, model_path: str, batch_size: int = 32):
        import torch
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(model_path, local_files_only=True, activation_fn=torch.nn.Sigmoid())
        self.batch_size = batch_size

    def score(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        if not pairs:
            return np.zeros(0, np.float32)
        return np.asarray(self.model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False),
                          np.float32).reshape(len(pairs), -1)[:, -1]


def make_judge(choice: JudgeChoice, llm: str, template: str = JUDGE_PROMPT):
    """The judge `choice` names (None for kind 'none'); an LLM judge without a model is the SDG generator `llm`."""
    if choice.kind == "none":
        return None
    if choice.kind == "llm":
        from pipeline.models import resolve_llm

        return LLMJudge(resolve_llm(choice.model or llm), template=template)
    return CrossEncoderJudge(choice.model)
