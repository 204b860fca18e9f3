"""The steady-state training step moves nothing between host and device: checked over the real loop.

What counts as a host<->device transfer is decided by the operation, not by the devices, since on
a CPU every tensor is on the host. ``deblur.bench.transfers.HostTransfers`` (a torch function mode
and a dispatch mode) classifies each operation as a GPU would run it:

- a tensor built from Python/NumPy data (``aten.lift_fresh``): a blocking host-to-device copy;
- a tensor factory called without a device (``torch.arange(11)``): a host tensor on a GPU machine;
- ``aten._local_scalar_dense`` (``.item()``, ``bool(t)``), ``.tolist()``, ``.numpy()``: the host
  reads a device value and waits for it;
- ``.cpu()``/``.cuda()``/``.pin_memory()``, or ``.to()`` between different devices;
- an operator whose output size depends on the data (``nonzero``, boolean indexing, ...);

and tells the one deliberate host read apart by where it is issued: inside
``deblur.training.stop.DeviceToHost``, the stop flag's copy, started one step before it is read.

Per steady-state step = (a 3-step run) - (a 2-step run) of ``deblur.training.loop.train``, each
in a fresh process so that both start cold (caches, lazy state), with logging, validation and
checkpoints only at each run's last step, so that they cancel out. The runs are a DDP world of
one gloo process: DDP wraps the models and every collective (c10d operator) is real and counted.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections import Counter
from pathlib import Path

import torch

from deblur.bench.transfers import HostTransfers
from deblur.training.stop import DeviceToHost


def counted_run(shards: str, out: str, steps: int) -> dict:
    """In a fresh process: train ``steps`` steps under HostTransfers; its counts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # LOCAL_RANK makes Accelerate start a (one-process) gloo group and wrap the models in DDP.
    world = dict(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_PORT=str(port))
    os.environ.update(ACCELERATE_USE_CPU="true", MASTER_ADDR="127.0.0.1", WANDB_SILENT="true", **world)
    from deblur.training.config import build_config
    from deblur.training.loop import train

    beyond = steps + 1000  # logging, validation and checkpoints only at the last step
    cfg = build_config(
        {
            "output_dir": out,
            "data": {"shards": shards, "batch_size": 1, "workers": 1},
            "train": {"max_steps": steps, "checkpoint_every": beyond, "log_every": beyond, "eval_every": beyond},
            "wandb": {"mode": "disabled"},
        }
    )
    with HostTransfers() as transfers:
        assert train(cfg) == "finished"
    return {"counts": transfers.counts, "sites": dict(transfers.sites), "collectives": transfers.collectives}


def per_step(short: Counter, long: Counter) -> Counter:
    return Counter({key: long[key] - short[key] for key in short.keys() | long.keys() if long[key] != short[key]})


def test_a_steady_state_step_moves_nothing_between_host_and_device(tiny_shards, tmp_path):
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(2, maxtasksperchild=1) as pool:  # the two runs side by side
        runs = [pool.apply_async(counted_run, (str(tiny_shards), str(tmp_path / f"run{n}"), n)) for n in (2, 3)]
        short, long = (run.get(timeout=600) for run in runs)
    step = per_step(short["counts"], long["counts"])
    sites = {kind: per_step(short["sites"].get(kind, Counter()), long["sites"].get(kind, Counter())) for kind in step}
    # Nothing but the stop flag's host copy, read once (DeviceToHost.get in stop.py).
    assert step == {"deliberate": 1}, sites
    assert [site.split(":")[0] for site in sites["deliberate"]] == ["deblur/training/stop.py"]

    # Collectives: DDP's gradient all-reduce (issued by the backward in gan.py, some buckets per
    # update) and one small all-reduce per step, the stop flag's; no statistics per update.
    collectives = per_step(short["collectives"], long["collectives"])
    ddp = {site: n for site, n in collectives.items() if "deblur/training/gan.py" in site}
    others = {site.split(" at ")[1].split(":")[0]: n for site, n in collectives.items() if site not in ddp}
    assert others == {"deblur/training/stop.py": 1}, collectives
    assert sum(ddp.values()) >= 4, collectives  # 4 updates per step, each with at least one bucket


def test_the_counter_sees_every_kind_and_the_deliberate_copy():
    x = torch.ones(3)
    with HostTransfers() as transfers:
        torch.tensor([1.0, 2.0])  # from host data
        torch.arange(3)  # factory without a device
        torch.zeros(2, device=x.device)  # with one: not counted
        x.sum().item(), bool(x.all()), x.tolist()  # host reads
        x.cpu()  # move
        x.to(x.device), x.to(torch.float64)  # same device, dtype only: not counted
        x[x > 0]  # boolean mask: data-dependent size
        DeviceToHost(x).get()  # the deliberate copy and read
    assert transfers.counts == {
        "from_host": 1,
        "host_factory": 1,
        "host_read": 3,
        "move": 1,
        "data_dependent": 1,
        "deliberate": 1,
    }, transfers.report()
    assert transfers.unexpected() == 7
    assert all(site.startswith(str(Path("tests") / "test_host_transfers.py")) for site in transfers.sites["host_read"])
