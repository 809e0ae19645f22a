"""Contrastive training logic without Ray: sampler, loss masking, all-gather, GradCache, schedule, engine state."""
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port
from pipeline.contrastive import BatchSampler, StepLayout, grad_cache_step, info_nce, warmup_then_cosine


def row(qa_id, query, positive, positives=None, negatives=()):
    return {"qa_id": qa_id, "query": query, "positive_id": positive, "positive_text": f"text of {positive}",
            "positive_ids": sorted(positives or [positive]), "negative_ids": list(negatives),
            "negative_texts": [f"text of {n}" for n in negatives]}


def unit(*vectors):
    return torch.nn.functional.normalize(torch.tensor(vectors, dtype=torch.float32), dim=-1)


def test_warmup_then_cosine_is_the_schedule_sentence_transformers_trains_with():
    """transformers' get_cosine_schedule_with_warmup with the trainer's ceil(ratio x steps) warmup: our old
    schedule started warmup at 1/warmup and rounded warmup steps down, ~6% more learning rate in all over the
    benchmark's 31 steps than the trainer we compare with."""
    from transformers import get_cosine_schedule_with_warmup

    for total, ratio in ((31, 0.1), (100, 0.1), (7, 0.0), (250, 0.06)):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        theirs = get_cosine_schedule_with_warmup(optimizer, math.ceil(ratio * total), total)
        want = []
        for _ in range(total):
            want.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            theirs.step()
        ours = warmup_then_cosine(total, ratio)
        assert [ours(s) for s in range(total)] == pytest.approx(want, abs=1e-12), (total, ratio)
    lrs = [warmup_then_cosine(100, 0.1)(s) for s in range(100)]
    assert lrs[0] == 0.0 and lrs[10] == 1.0 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


# -- defect 1: other positives of the query are never negatives ------------------------------------------------

def test_a_sibling_rows_positive_is_not_its_negative():
    """A multi-hop query unrolled into two rows (positives p1, p2) in one batch: p2's column is not a
    negative of the p1 row, and neither is a hard negative that happens to be p2."""
    rows = [row("a", "q", "p1", ["p1", "p2"], negatives=["p2"]), row("b", "q", "p2", ["p1", "p2"]),
            row("c", "other", "p3")]
    layout = StepLayout.build([rows], negatives_per_query=1)
    # columns: p1 p2 p3 | p2 (a's hard negative)
    assert layout.not_negative[0].tolist() == [False, True, False, True]
    assert layout.not_negative[1].tolist() == [True, False, False, True]  # its own positive, twice
    assert layout.not_negative[2].tolist() == [False, False, False, False]
    q = unit([1, 0, 0], [0.9, 0.1, 0], [0, 0, 1])
    p = unit([1, 0, 0], [0.9, 0.1, 0], [0, 0, 1], [0.9, 0.1, 0])
    loss = info_nce(q, p, layout, 0, 1, 0.05)
    # By hand: each query against only its true negatives.
    scores = q @ p.T / 0.05
    want = torch.stack([-torch.log_softmax(scores[0, [0, 2]], 0)[0], -torch.log_softmax(scores[1, [1, 2]], 0)[0],
                        -torch.log_softmax(scores[2], 0)[2]]).mean()
    assert torch.isclose(loss, want)


def test_symmetric_loss_masks_sibling_queries():
    rows = [row("a", "q", "p1", ["p1", "p2"]), row("b", "q", "p2", ["p1", "p2"]), row("c", "other", "p3")]
    layout = StepLayout.build([rows], negatives_per_query=0)
    assert layout.not_negative_back.tolist() == [[False, True, False], [True, False, False], [False] * 3]
    torch.manual_seed(0)
    q, p = (torch.nn.functional.normalize(torch.randn(3, 8), dim=-1) for _ in range(2))
    both = info_nce(q, p, layout, 0, 1, 0.05, symmetric=True)
    one_way = info_nce(q, p, layout, 0, 1, 0.05)
    back = p @ q.T / 0.05
    want_back = torch.stack([-torch.log_softmax(back[0, [0, 2]], 0)[0], -torch.log_softmax(back[1, [1, 2]], 0)[0],
                             -torch.log_softmax(back[2], 0)[2]]).mean()
    assert torch.isclose(both, (one_way + want_back) / 2)


def test_sampler_keeps_rows_sharing_a_query_or_positive_apart():
    rows = [row(f"r{i}", f"query {i // 2}", f"c{i}", [f"c{i}", f"c{i ^ 1}"]) for i in range(40)]  # sibling pairs
    rows += [row(f"s{i}", f"again {i % 10}", f"d{i}") for i in range(20)]                        # repeated text
    sampler = BatchSampler(rows, per_worker=8, world=1, seed=3)
    for epoch in range(3):
        for batch in sampler.epoch(epoch):
            assert len({rows[i]["query"] for i in batch}) == len(batch)
            ids = [p for i in batch for p in rows[i]["positive_ids"]]
            assert len(ids) == len(set(ids))


def test_sampler_keeps_a_passage_out_of_two_rows_of_one_batch():
    """Popular passages are mined as hard negatives for many queries. As in sentence-transformers'
    NoDuplicatesBatchSampler (every text column compared), no passage is two columns of one batch: not the
    hard negative of two rows, not one row's negative and another's positive. Negatives past those a step
    uses do not count. Only an epoch's last batch may be left with rows that conflict with each other (the
    loss then masks or repeats those columns)."""
    rows = [row(f"r{i}", f"query {i}", f"c{i}", negatives=[f"n{i % 8}", f"c{(i + 1) % 48}", f"unused{i % 2}"])
            for i in range(48)]
    sampler = BatchSampler(rows, per_worker=4, world=1, seed=5, negatives_per_query=2)
    for epoch in range(4):
        for batch in sampler.epoch(epoch)[:-1]:
            columns = [rows[i]["positive_id"] for i in batch] + [n for i in batch for n in rows[i]["negative_ids"][:2]]
            assert len(columns) == len(set(columns)), (epoch, columns)


# -- defect 2: the same number of full batches in every epoch ---------------------------------------------------

def test_every_epoch_has_the_same_number_of_full_batches_and_every_row():
    rows = [row(f"r{i}", f"query {i}", f"c{i % 38}") for i in range(139)]  # 139 rows over 38 chunks
    sampler = BatchSampler(rows, per_worker=16, world=1, seed=13)
    assert sampler.steps_per_epoch == 9  # ceil(139 / 16): the last batch is topped up, no row dropped
    for epoch in range(6):
        batches = sampler.epoch(epoch)
        assert len(batches) == sampler.steps_per_epoch and all(len(b) == 16 for b in batches)
        assert {i for b in batches for i in b} == set(range(139))  # every row, every epoch
        for b in batches:
            assert len({rows[i]["positive_id"] for i in b}) == 16
    assert sampler.epoch(2) == BatchSampler(rows, 16, 1, 13).epoch(2)  # deterministic: resume recomputes it


def test_a_query_with_more_positives_than_batches_still_fills_every_batch():
    rows = [row(f"r{i}", "one query", f"c{i}", [f"c{j}" for j in range(12)]) for i in range(12)]
    rows += [row("x", "another", "x1")]
    sampler = BatchSampler(rows, per_worker=4, world=1, seed=0)
    batches = sampler.epoch(0)
    assert len(batches) == 4 and all(len(b) == 4 for b in batches)


# -- defect 3: every worker always gets rows ---------------------------------------------------------------------

def test_every_worker_gets_rows_even_from_a_tiny_split():
    rows = [row(f"r{i}", f"q{i}", f"c{i}") for i in range(5)]
    sampler = BatchSampler(rows, per_worker=16, world=3, seed=1)
    assert sampler.per_worker == 1 and sampler.steps_per_epoch == 2
    for batch in sampler.epoch(0):
        assert all(len(sampler.worker_rows(batch, w)) == 1 for w in range(3))
    with pytest.raises(ValueError, match="2 training rows cannot feed 3 worker"):
        BatchSampler(rows[:2], per_worker=16, world=3, seed=1)


# -- negatives from every worker: the 2-worker loss is the 1-worker loss on the same global batch ----------------

def _features(texts):
    """A fixed random feature vector per text: the toy encoder's input."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(64, 16, generator=gen)
    return table[[int(t.split()[-1][1:]) % 64 for t in texts]]


def _toy_step(rank: int, world: int, rows_per_worker: list[list[dict]], symmetric: bool):
    torch.manual_seed(0)
    encoder = torch.nn.Linear(16, 8)
    layout = StepLayout.build(rows_per_worker, negatives_per_query=2)
    mine = rows_per_worker[rank]
    q = torch.nn.functional.normalize(encoder(_features([f"text of {r['qa_id']}" for r in mine])), dim=-1)
    p = torch.nn.functional.normalize(encoder(_features(layout.passages[rank])), dim=-1)
    loss = info_nce(q, p, layout, rank, world, 0.05, symmetric)
    loss.backward()
    return loss.detach(), encoder.weight.grad.clone()


def _gather_worker(rank, world, port, rows_per_worker, symmetric, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loss, grad = _toy_step(rank, world, rows_per_worker, symmetric)
    dist.all_reduce(loss)
    dist.all_reduce(grad)  # what the engine does: average the gradients
    if rank == 0:
        out.put((loss.item() / world, (grad / world).tolist()))
    dist.destroy_process_group()


@pytest.mark.parametrize("symmetric", [False, True])
def test_two_workers_see_the_whole_global_batch(symmetric):
    rows = [row(f"c{i}", f"q{i}", f"c{i}", negatives=[f"c{20 + i}", f"c{40 + i}"]) for i in range(6)]
    rows[4]["negative_ids"] = rows[4]["negative_ids"][:1]  # uneven blocks: padding must not count
    rows[4]["negative_texts"] = rows[4]["negative_texts"][:1]
    one_loss, one_grad = _toy_step(0, 1, [rows], symmetric)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, [rows[:3], rows[3:]], symmetric, out))
             for r in range(2)]
    for p in procs:
        p.start()
    loss, grad = out.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    assert math.isclose(loss, one_loss.item(), rel_tol=1e-5)
    assert torch.allclose(torch.tensor(grad), one_grad, atol=1e-6)
    # Without the gather each worker would see only its own 3 rows: a different (smaller) loss.
    local = sum(_toy_step(0, 1, [part], symmetric)[0].item() for part in (rows[:3], rows[3:])) / 2
    assert not math.isclose(loss, local, rel_tol=1e-3)


# -- defect 5: GradCache replays dropout exactly (train mode; CPU, and the CUDA generator where present) ---------

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_grad_cache_replays_dropout_in_train_mode(base_model, device):
    from pipeline.embedders import load_model

    model = load_model(base_model, device=device).train()  # dropout on
    queries = [f"how do I read {t} files in python?" for t in ("csv", "json", "zip", "xml", "ini", "tar")]
    passages = [f"The {t} module reads and writes {t} data." for t in ("csv", "json", "zip", "xml", "ini", "tar")]
    layout = StepLayout.build([[row(f"c{i}", q, f"c{i}") for i, q in enumerate(queries)]], 0)

    def encode(texts, kind):
        features = {k: v.to(device) if hasattr(v, "to") else v for k, v in model.preprocess(texts).items()}
        return torch.nn.functional.normalize(model(features)["sentence_embedding"], dim=-1)

    def loss_fn(q, p):
        return info_nce(q, p, layout, 0, 1, 0.05)

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return out

    def reference(seed):
        """The same chunks under the same seeds, one graph end to end: what GradCache must equal."""
        embs = []
        for kind, texts in (("query", queries), ("passage", passages)):
            for i in range(0, len(texts), 4):
                with torch.random.fork_rng(devices=[0] if device == "cuda" else []):
                    torch.manual_seed(seed * 100_003 + i * 2 + ("query", "passage").index(kind))
                    embs.append((kind, encode(texts[i:i + 4], kind)))
        loss = loss_fn(torch.cat([e for k, e in embs if k == "query"]), torch.cat([e for k, e in embs if k == "passage"]))
        loss.backward()
        return loss.item(), grads()

    want_loss, want = reference(seed=1)
    cached = grad_cache_step(encode, queries, passages, loss_fn, lambda x: x.backward(), chunk=4, seed=1)
    got = grads()
    assert abs(cached - want_loss) < 1e-5
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5, rtol=1e-3), name
    other_loss, other = reference(seed=2)  # dropout is really on: other masks give other gradients
    assert abs(other_loss - want_loss) > 1e-4
    # The replay leaves the caller's RNG streams as they were (CPU and CUDA).
    state = torch.get_rng_state()
    grad_cache_step(encode, queries, passages, loss_fn, lambda x: x.backward(), chunk=4, seed=1)
    assert torch.equal(state, torch.get_rng_state())


# -- defect 4: the optimiser's state survives a checkpoint ------------------------------------------------------

def test_plain_engine_resumes_with_its_optimiser_moments(tmp_path):
    from pipeline.training import PlainEngine

    def make():
        torch.manual_seed(0)
        return torch.nn.Linear(4, 2)

    def step(engine, model, x):
        engine.backward(model(x).pow(2).sum())
        engine.step()

    xs = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    model = make()
    engine = PlainEngine(model, 1e-2, warmup_then_cosine(4, 0.25), world=1)
    for x in xs[:2]:
        step(engine, model, x)
    engine.save_state(tmp_path, rank=0)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    for x in xs[2:]:
        step(engine, model, x)

    resumed = make()
    resumed.load_state_dict(saved)
    engine2 = PlainEngine(resumed, 1e-2, warmup_then_cosine(4, 0.25), world=1)
    engine2.load_state(tmp_path)
    assert engine2.scheduler.last_epoch == 2  # the schedule continues too
    for x in xs[2:]:
        step(engine2, resumed, x)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, resumed.state_dict()[k], atol=1e-7), k


# -- precision: bf16 where the hardware multiplies it natively, fp32 weights and gradients either way ----------

def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    from pipeline.training import use_bf16

    assert use_bf16("fp32", on_gpu=False) is False and use_bf16("bf16", on_gpu=False) is True
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        assert use_bf16("auto", on_gpu=False) is native
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the probe: no bf16
    assert use_bf16("auto", on_gpu=False) is False


def _deepspeed_forward_dtype(port, out):
    from pipeline.config import TrainConfig
    from pipeline.training import DeepSpeedEngine

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    model = torch.nn.Linear(4, 2)
    engine = DeepSpeedEngine(model, 1e-2, warmup_then_cosine(2, 0.0), 1, TrainConfig(), on_gpu=False, bf16=True)
    y = engine.forward(torch.randn(3, 4))
    engine.backward(y.float().pow(2).sum())
    out.put((str(y.dtype), str(model.weight.dtype)))


def test_bf16_on_a_cpu_runs_the_model_in_bf16_and_keeps_fp32_weights():
    """Both engines: the matmuls in bf16 (autocast), the weights and their gradients fp32."""
    from pipeline.training import PlainEngine

    model = torch.nn.Linear(4, 2)
    engine = PlainEngine(model, 1e-2, warmup_then_cosine(2, 0.0), world=1, bf16=True)
    y = engine.forward(torch.randn(3, 4))
    engine.backward(y.float().pow(2).sum())
    assert y.dtype == torch.bfloat16 and model.weight.grad.dtype == torch.float32
    assert PlainEngine(model, 1e-2, warmup_then_cosine(2, 0.0), world=1).forward(torch.randn(3, 4)).dtype \
        == torch.float32
    ctx = mp.get_context("spawn")  # DeepSpeed sets up a process group: not in the test process
    out = ctx.Queue()
    proc = ctx.Process(target=_deepspeed_forward_dtype, args=(free_port(), out))
    proc.start()
    assert out.get(timeout=120) == ("torch.bfloat16", "torch.float32")
    proc.join(timeout=60)


def test_each_python_environment_has_its_own_deepspeed_op_folder(monkeypatch):
    """DeepSpeed's CPU op's build file names the environment's paths: in torch's one shared folder, two
    checkouts' venvs rebuilt it for each other at every switch. Warmup builds it, training loads it, here."""
    from torch.utils.cpp_extension import _get_build_directory

    from pipeline.training import own_torch_extensions_dir

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    mine = own_torch_extensions_dir()
    assert _get_build_directory("deepspeed_shm_comm", verbose=False).startswith(mine)  # where DeepSpeed looks
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", "/another/checkout/.venv")
    assert own_torch_extensions_dir() != mine
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/chosen/by/the/user")
    assert own_torch_extensions_dir() == "/chosen/by/the/user"


def test_training_progress_reaches_the_console_from_the_workers_log(tmp_path, capsys):
    """Workers' output stays in Ray's logs; the driver shows their progress from the log they write,
    including a line still being written when it looks."""
    import json
    import time

    from pipeline.training import follow_progress

    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({"epoch": 0, "step": 3, "loss": 9.0}) + "\n")  # an earlier attempt's line
    with follow_progress(log, epochs=2, every_s=0.05, every_steps=10):
        with open(log, "a") as f:
            f.write(json.dumps({"event": "start", "global_step": 0, "steps_per_epoch": 20}) + "\n")
            for step in range(19):
                f.write(json.dumps({"epoch": 0, "step": step, "loss": 1.0 / (step + 1), "examples_per_s": 4.0}) + "\n")
            f.write('{"epoch": 0, "step": 19, "loss": 0.05, "exa')
            f.flush()
            time.sleep(0.3)
            f.write('mples_per_s": 4.0}\n' + json.dumps({"event": "val", "global_step": 20, "ndcg@10": 0.5}) + "\n")
    out = capsys.readouterr().out.splitlines()
    assert [ln.split(" |")[0] for ln in out] == ["[train] step 10/40 loss 0.1000", "[train] step 20/40 loss 0.0500",
                                                "[train] val NDCG@10 0.5000 at step 20"]
    assert "ETA" in out[0]


def test_ray_workers_output_stays_out_of_the_console(tmp_path):
    import subprocess
    import sys

    code = """
import ray
from pipeline.ray_runtime import ensure_ray
ensure_ray(num_cpus=1)

@ray.remote
def chatter():
    print("PlacementGroupCleaner: Failed to query ... Continuing to monitor")
    return 1

assert ray.get(chatter.remote()) == 1

from pipeline.ray_runtime import map_shards

class Echo:  # the smallest shard worker: a Ray Data actor pool, as SDG and encoding use
    def process(self, task):
        return {"shard_id": task["shard_id"], "rows": 1}

assert len(list(map_shards(Echo, [{"shard_id": 0}, {"shard_id": 1}], ctor_kwargs={}))) == 2
import time; time.sleep(2)  # worker output reaches the driver asynchronously
print("DONE")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DONE" in out.stdout and "PlacementGroupCleaner" not in out.stdout + out.stderr
    assert "core_worker.cc" not in out.stderr, out.stderr[-3000:]  # Ray's "E ... constructor arguments" line
    # Ray Data's chatter and the deprecation warning of the one setting that has no other spelling stay off it
    for line in ("ray_remote_args", "Progress bars disabled", "execution finished"):
        assert line not in out.stderr, out.stderr[-3000:]
    logs = out.stderr.split("[ray] worker logs: ", 1)[1].split()[0]
    assert any("PlacementGroupCleaner" in p.read_text(errors="replace") for p in Path(logs).glob("worker-*.out"))
    assert "execution finished" in (Path(logs) / "ray-data" / "ray-data.log").read_text()  # kept, in its log file
