"""A generated language model in PyTorch's ecosystem: state_dict round trip, `.to(dtype)`, CPU bf16
autocast, and DistributedDataParallel over 2 CPU processes (gloo), directly and in `nlc train`."""
import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import nlc
from nlc.train import train

from .conftest import TINY, TINY_SPEC


@pytest.fixture(scope="module")
def program():
    return nlc.compile(TINY_SPEC, **TINY)


def _loss(model, ids):
    return F.cross_entropy(model(ids[:, :-1]).float().flatten(0, 1), ids[:, 1:].flatten())


def test_state_dict_round_trip(program):
    torch.manual_seed(0)
    model, fresh = program.model(256, layers=2), program.model(256, layers=2)
    ids = torch.randint(0, 256, (2, 20))
    assert not torch.equal(model(ids), fresh(ids))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(model(ids), fresh(ids))


def test_to_float64(program):
    torch.manual_seed(0)
    model = program.model(256, layers=1)
    ids = torch.randint(0, 256, (2, 20))
    single = model(ids)
    double = model.to(torch.float64)(ids)
    assert double.dtype == torch.float64
    assert torch.allclose(double.float(), single, atol=1e-4)


def test_cpu_bf16_autocast_trains(program):
    torch.manual_seed(0)
    model = program.model(256, layers=1)
    ids = torch.randint(0, 256, (2, 20))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids[:, :-1])
    assert logits.dtype == torch.bfloat16
    F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert torch.allclose(logits.float(), model(ids[:, :-1]), atol=0.1)


def _gather_equal(flat: torch.Tensor, world: int) -> bool:
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered)


def _ddp_worker(rank, world, init, config, results):
    """Each rank: (1) a DDP model stepped twice on its own batches; DDP all-reduces the gradients, so
    they and the weights agree across ranks; (2) `nlc.train.train` under the same process group."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nlc.compile(TINY_SPEC, **TINY).model(256, layers=1)
    net = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for step in range(2):
        ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(10 * step + rank))
        optimizer.zero_grad()
        _loss(net, ids).backward()
        optimizer.step()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    direct = (_gather_equal(grads, world), _gather_equal(weights, world), grads.abs().sum().item())
    trained, _ = train(config)  # rank 0 writes the folder; each rank returns its own model
    in_loop = _gather_equal(torch.cat([p.detach().flatten() for p in trained.parameters()]), world)
    if rank == 0:
        results.put((*direct, in_loop))
    dist.barrier()  # both ranks done with gloo before either tears it down (a rank that exits
    dist.destroy_process_group()  # early has been seen to abort in gloo's teardown under load)


def test_ddp_on_two_cpu_processes(config, tmp_path):
    config = dataclasses.replace(config, steps=2, checkpoint_every=2)
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, f"file://{tmp_path}/rendezvous", config, results),
                       nprocs=2, start_method="spawn")
    same_grads, same_weights, grad_size, same_trained = results.get()
    assert same_grads and same_weights and grad_size > 0 and same_trained
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert len(log) == 3 and log[-1].split(",")[4] == str(2 * 2 * 2 * 16)  # tokens of both ranks
