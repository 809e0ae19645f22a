import math

import torch

from pipeline.train import batches, info_nce, lr_lambda


def test_warmup_then_cosine():
    total, warmup = 100, 10
    lrs = [lr_lambda(s, total, warmup) for s in range(total)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0                   # linear warmup to the peak
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then monotone decay
    assert math.isclose(lrs[55], 0.5, abs_tol=0.02) and lrs[-1] < 0.01


def test_batches_never_hold_one_positive_twice():
    rows = [{"positive_id": f"c{i % 5}", "query": str(i)} for i in range(40)]
    out = batches(rows, 4, seed=1, epoch=0)
    assert all(len({r["positive_id"] for r in b}) == len(b) for b in out)
    used = [r["query"] for b in out for r in b]
    assert len(used) == len(set(used)) >= 39  # each row once; at most a lone leftover is dropped


def test_info_nce_masks_a_duplicate_positive():
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    # Passage 2 is a hard negative for query 1 but is the same chunk as query 0's positive.
    p = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), dim=-1)
    masked = info_nce(q, p, ["a", "b"], ["a", "b", "a"], 0.05)
    unmasked = info_nce(q, p, ["a", "b"], ["a", "b", "x"], 0.05)
    assert masked < unmasked  # query 0's duplicate positive no longer counts against it
    assert math.isclose(masked.item(), info_nce(q, p[:2], ["a", "b"], ["a", "b"], 0.05).item(), rel_tol=1e-5)


def test_symmetric_loss_adds_the_passage_direction():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(8, 8), dim=-1)
    ids = ["a", "b", "c", "d"]
    cols = ids + ["e", "f", "g", "h"]
    one_way = info_nce(q, p, ids, cols, 0.05)
    both = info_nce(q, p, ids, cols, 0.05, symmetric=True)
    backward = torch.nn.functional.cross_entropy(p[:4] @ q.T / 0.05, torch.arange(4))
    assert torch.isclose(both, (one_way + backward) / 2)


def test_lr_presets_by_name():
    from pipeline.config import load_config

    assert load_config(None, ["train.lr=2e-5", "train.lr_preset=half"]).train.effective_lr == 1e-5
    assert load_config(None, ["train.lr=2e-5", "train.lr_preset=double"]).train.effective_lr == 4e-5
