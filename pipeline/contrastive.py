"""Contrastive training pieces that need no Ray: the batch sampler, the loss, GradCache, the lr schedule.

One step trains on a *global batch* of `per_worker x world` rows. Every worker gets `per_worker` of
them, embeds its queries and passages, and all-gathers the embeddings (gradients flow back to the
worker that made them), so each query is scored against every passage of the global batch: scaling
out enlarges the contrastive batch, and the loss equals the one-worker loss on the same rows.

A row is one (query, positive) pair from prep: `positive_id`, `positive_ids` (every positive of the
query: multi-hop, or the same query written for several chunks), `negative_ids`/`negative_texts`.
No column whose id is one of the query's positives is ever a negative, whichever row brought it.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np

from pipeline.errors import RetrofitError


def warmup_then_cosine(total: int, warmup_ratio: float):
    """The lr multiplier of each step: linear warmup from zero over ceil(ratio x total) steps, then cosine
    decay to zero. Exactly transformers' get_cosine_schedule_with_warmup (with its warmup-step rounding), the
    schedule sentence-transformers trains with: a comparison with it then compares training, not schedules."""
    warmup = math.ceil(warmup_ratio * total)

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return multiplier


def positive_set(row: dict) -> set[str]:
    return set(row.get("positive_ids") or []) | {row["positive_id"]}


def _identity_keys(row: dict) -> set[int]:
    """What makes two rows the same question or the same answer: the query text, the positive text, any
    positive id. Kept as 64-bit digests, the same in every worker process (str hashes are not), so 100K rows'
    keys do not hold a copy of their texts."""
    return {_digest("q", row["query"]), _digest("t", row["positive_text"])} | {_digest("p", p) for p in positive_set(row)}


def _passage_keys(row: dict, negatives: int) -> set[int]:
    """The hard negatives a step uses, in the same key space as positive ids: a passage that is one row's
    negative and another's positive (or a negative of both) would be two columns of one softmax."""
    return {_digest("p", n) for n in (row.get("negative_ids") or [])[:negatives]}


def _digest(kind: str, text: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{kind}:{text}".encode(), digest_size=8).digest(), "little")


def _linked_groups(keys: list[set[int]]) -> list[int]:
    """Each row's group: rows linked by a shared key, directly or through others (union-find)."""
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[int, int] = {}
    for i, row_keys in enumerate(keys):
        for k in row_keys:
            parent[root(i)] = root(first.setdefault(k, i))
    return [root(i) for i in range(len(keys))]


class BatchSampler:
    """Equal global batches, the same number in every epoch, every row in every epoch, each worker always
    given rows.

    `steps_per_epoch = ceil(rows / (per_worker x world))`, fixed, so resume arithmetic (epoch, offset) is
    exact and the end of every epoch is a real step. Each epoch is a seeded shuffle packed greedily into
    batches whose rows share no query text, no positive and no hard negative. The last batch is topped up
    with rows already used this epoch (as torch's DistributedSampler pads), so no row is dropped; when
    conflicts leave too few compatible rows to fill a batch (a query with more positives than there are
    batches), it is filled anyway: the loss masks a positive's other columns, so a conflict costs negatives
    (or repeats one), never correctness.
    """

    # Row columns the sampler reads; the worker gives it only these, and takes each step's full rows later.
    COLUMNS = ("query", "positive_id", "positive_ids", "positive_text", "negative_ids")

    def __init__(self, rows: list[dict], per_worker: int, world: int, seed: int, negatives_per_query: int = 0):
        n = len(rows)
        if n < max(2, world):
            raise RetrofitError(f"{n} training rows cannot feed {world} worker(s): contrastive training needs at "
                                f"least {max(2, world)} (one row per worker, two in all)")
        # Fewer rows than one global batch: shrink the batch rather than leave a worker without rows.
        self.per_worker = min(per_worker, n // world)
        self.world, self.seed = world, seed
        self.global_batch = self.per_worker * world
        self.steps_per_epoch = -(-n // self.global_batch)
        # Rows of one batch share no key: no query, positive or used hard negative appears twice among its
        # columns (sentence-transformers' NoDuplicatesBatchSampler compares every text column the same way).
        identity = [_identity_keys(r) for r in rows]
        self.group = _linked_groups(identity)  # siblings of one query, spread over the epoch below
        self.keys = [keys | _passage_keys(r, negatives_per_query) for keys, r in zip(identity, rows)]
        self.group_size = Counter(self.group)

    def epoch(self, epoch: int) -> list[list[int]]:
        """Row indices of each global batch of `epoch`; the same for a given (seed, epoch) on every worker."""
        rng = random.Random(self.seed * 1000 + epoch)
        order = list(range(len(self.keys)))
        rng.shuffle(order)
        # Spread each group of linked rows evenly over the epoch (the k-th of a group of g sits near k/g), so
        # the greedy packing rarely ends with rows that can only share a batch with each other.
        rank, seen = {}, Counter()
        for i in order:
            rank[i] = seen[self.group[i]]
            seen[self.group[i]] += 1
        order.sort(key=lambda i: (rank[i] + rng.random()) / self.group_size[self.group[i]])
        remaining = dict.fromkeys(order)  # insertion-ordered set
        out = []
        for _ in range(self.steps_per_epoch):
            batch = self._pack(remaining)
            for i in batch:
                del remaining[i]
            if len(batch) < self.global_batch:  # rows ran out (the last batch): top up with used ones
                chosen = set(batch)
                batch += self._pack(dict.fromkeys(i for i in order if i not in chosen), self.global_batch - len(batch),
                                    used=set().union(*(self.keys[i] for i in batch)))
            out.append(batch)
        return out

    def _pack(self, candidates: dict, size: int | None = None, used: set | None = None) -> list[int]:
        """Up to `size` candidates sharing no key, in order; filled up with conflicting ones if need be."""
        size = size or self.global_batch
        batch, used = [], set(used or ())
        for i in candidates:
            if not (self.keys[i] & used):
                batch.append(i)
                used |= self.keys[i]
                if len(batch) == size:
                    return batch
        chosen = set(batch)
        return batch + [i for i in candidates if i not in chosen][:size - len(batch)]

    def worker_rows(self, batch: list[int], rank: int) -> list[int]:
        """This worker's contiguous slice of a global batch: always `per_worker` rows."""
        return batch[rank * self.per_worker:(rank + 1) * self.per_worker]


@dataclass
class StepLayout:
    """Where every text of one global step sits once embeddings are gathered, and what is not a negative.

    Each worker contributes a block of passages: its rows' positives, then their hard negatives, padded to
    the longest block so the all-gather sees equal shapes. Query g (global order) has its positive at
    column `labels[g]`; `not_negative[g, c]` is true for padding and for every other column holding one of
    g's positives; `not_negative_back[g, h]` (the passage-to-query direction) is true for queries h other
    than g that count g's positive among their own."""

    block: int
    passages: list[list[str]]  # per worker, unpadded
    labels: list[int]
    not_negative: np.ndarray  # (global queries, workers x block) bool
    not_negative_back: np.ndarray  # (global queries, global queries) bool

    @classmethod
    def build(cls, worker_rows: list[list[dict]], negatives_per_query: int) -> "StepLayout":
        k = negatives_per_query
        ids, texts = [], []
        for rows in worker_rows:
            ids.append([r["positive_id"] for r in rows] + [i for r in rows for i in r["negative_ids"][:k]])
            texts.append([r["positive_text"] for r in rows] + [t for r in rows for t in r["negative_texts"][:k]])
        block = max(len(x) for x in ids)
        rows = [r for part in worker_rows for r in part]
        labels = [w * block + i for w, part in enumerate(worker_rows) for i in range(len(part))]
        columns_of: dict[str, list[int]] = {}
        not_negative = np.ones((len(rows), block * len(ids)), dtype=bool)  # padding stays masked
        for w, part in enumerate(ids):
            not_negative[:, w * block:w * block + len(part)] = False
            for j, c in enumerate(part):
                columns_of.setdefault(c, []).append(w * block + j)
        queries_of: dict[str, list[int]] = {}
        for g, r in enumerate(rows):
            for p in positive_set(r):
                not_negative[g, columns_of.get(p, [])] = True
                queries_of.setdefault(p, []).append(g)
        not_negative[np.arange(len(rows)), labels] = False
        not_negative_back = np.zeros((len(rows), len(rows)), dtype=bool)
        for g, r in enumerate(rows):
            not_negative_back[g, queries_of[r["positive_id"]]] = True
        np.fill_diagonal(not_negative_back, False)
        return cls(block, texts, labels, not_negative, not_negative_back)


def gather(t, world: int):
    """All-gather along dim 0 keeping gradients (they flow back to the worker that made each piece)."""
    if world == 1:
        return t
    import torch
    import torch.distributed.nn

    return torch.cat(torch.distributed.nn.functional.all_gather(t))


def info_nce(q_local, p_local, layout: StepLayout, rank: int, world: int, temperature: float,
             symmetric: bool = False):
    """InfoNCE of this worker's queries against every passage of the global step (its own and the gathered
    ones); with `symmetric`, plus each local positive against every query. The mean over workers of this
    loss is the one-worker loss on the whole global batch."""
    import torch

    n = q_local.shape[0]
    pad = layout.block - p_local.shape[0]
    if pad:
        p_local = torch.cat([p_local, p_local.new_zeros(pad, p_local.shape[1])])
    p_all = gather(p_local, world)
    mine = slice(rank * n, (rank + 1) * n)
    labels = torch.tensor(layout.labels[mine], device=q_local.device)
    masked = torch.from_numpy(layout.not_negative[mine]).to(q_local.device)
    scores = (q_local @ p_all.T / temperature).masked_fill(masked, float("-inf"))
    loss = torch.nn.functional.cross_entropy(scores, labels)
    if symmetric:
        q_all = gather(q_local, world)
        back = torch.from_numpy(layout.not_negative_back[mine]).to(q_local.device)
        scores_back = (p_local[:n] @ q_all.T / temperature).masked_fill(back, float("-inf"))
        targets = torch.arange(rank * n, (rank + 1) * n, device=q_local.device)
        loss = (loss + torch.nn.functional.cross_entropy(scores_back, targets)) / 2
    return loss


def grad_cache_step(encode, queries: list[str], passages: list[str], loss_fn, backward, chunk: int,
                    seed: int) -> float:
    """One contrastive step whose activation memory is one chunk's, not the whole batch's (GradCache).

    1) embed every text in chunks without autograd graphs; 2) compute the loss on those embeddings and
    its gradient with respect to them; 3) embed each chunk again with a graph and push that gradient
    through it. Each chunk is embedded both times under the same RNG seed (CPU and CUDA generators), so
    dropout masks repeat and the gradients are those of the loss computed in step 2."""
    import torch

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []

    def chunks(texts):
        return [(i, texts[i:i + chunk]) for i in range(0, len(texts), chunk)]

    def embed_chunk(part, kind, i):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed * 100_003 + i * 2 + ("query", "passage").index(kind))
            return encode(part, kind)

    with torch.no_grad():
        q = torch.cat([embed_chunk(part, "query", i) for i, part in chunks(queries)])
        p = torch.cat([embed_chunk(part, "passage", i) for i, part in chunks(passages)])
    q.requires_grad_(True)
    p.requires_grad_(True)
    loss = loss_fn(q, p)
    loss.backward()  # gradients of the loss w.r.t. the embeddings only (they are leaves)
    for kind, texts, grad in (("query", queries, q.grad), ("passage", passages, p.grad)):
        for i, part in chunks(texts):
            backward((embed_chunk(part, kind, i) * grad[i:i + len(part)]).sum())
    return float(loss.item())
