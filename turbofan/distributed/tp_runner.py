"""One process per tensor-parallel rank. Rank 0 is the engine's own process: it schedules, samples and broadcasts
each step's ForwardBatch; ranks 1..N-1 are spawned workers that run the same forward on their shard of the model,
meeting rank 0 in the all-reduces of every layer. Each rank pins its threads to its own cores."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import torch

from turbofan.distributed.tensor_parallel import Shard, TensorParallelGroup, check_partition
from turbofan.model.architectures import model_args_from_config
from turbofan.model.batch import ForwardBatch
from turbofan.model.loader import read_config
from turbofan.model.runner import ModelRunner

log = logging.getLogger("turbofan.distributed")


def rank_cores(rank: int, world: int, cores: list[int]) -> list[int]:
    """The rank-th contiguous slice of the cores this process may use (a core of its own, shared if too few)."""
    mine = cores[len(cores) * rank // world : len(cores) * (rank + 1) // world]
    return mine or [cores[rank % len(cores)]]


def pin_threads(rank: int, world: int, cores: list[int]) -> list[int]:
    """Pin the calling thread (and the OpenMP threads it starts) to this rank's cores; one torch thread per core."""
    mine = rank_cores(rank, world, cores)
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))
    return mine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _rank_device(device: str, rank: int) -> str:
    return f"cuda:{rank}" if device == "cuda" else device


def _on_device(batch: ForwardBatch, device: str) -> ForwardBatch:
    if device == "cpu":
        return batch
    moved = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return ForwardBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive the engine (kill -9 of the server included): Linux's parent-death signal."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def _worker(rank: int, world: int, init_method: str, cores: list[int], parent: int, kwargs: dict) -> None:
    _die_with_parent(parent)
    logging.basicConfig(level=logging.WARNING, format=f"tp rank {rank}: %(levelname)s %(name)s: %(message)s")
    pin_threads(rank, world, cores)
    kwargs = {**kwargs, "dtype": getattr(torch, kwargs["dtype"]), "device": _rank_device(kwargs["device"], rank)}
    if kwargs["device"].startswith("cuda"):
        torch.cuda.set_device(kwargs["device"])
    group = TensorParallelGroup(rank, world, init_method, _backend(kwargs["device"]))
    runner = ModelRunner(**kwargs, sharding=Shard(rank, world, group))
    while True:
        command = group.broadcast()
        if command is None:
            break
        kind, payload = command
        if kind == "forward":
            runner.execute(_on_device(payload, runner.device))
        elif kind == "hidden":
            runner.hidden_states(payload)
        elif kind == "copy":
            runner.copy_blocks(payload)
    group.close()


def _spawn(rank: int, world: int, init_method: str, cores: list[int], kwargs: dict) -> subprocess.Popen:
    """A fresh interpreter per rank (`python -m` this module): no fork of a threaded server, and no re-import of
    the caller's __main__, so `LLM(..., tensor_parallel_size=2)` needs no `if __name__ == "__main__"` guard."""
    spec = {"rank": rank, "world": world, "init_method": init_method, "cores": cores, "parent": os.getpid(),
            "kwargs": {**kwargs, "dtype": str(kwargs["dtype"]).removeprefix("torch.")}}  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", __name__, json.dumps(spec)])


class TensorParallelRunner(ModelRunner):
    """ModelRunner for rank 0: the engine calls it exactly as a single-process runner."""

    def __init__(self, model_path: str | Path, tensor_parallel_size: int, **kwargs):
        world = tensor_parallel_size
        check_partition(model_args_from_config(read_config(Path(model_path))), world)  # fail before spawning
        cores = sorted(os.sched_getaffinity(0))
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        kwargs = {**kwargs, "model_path": str(model_path)}
        device = kwargs.get("device", "cpu")
        self.workers = [_spawn(rank, world, init_method, cores, kwargs) for rank in range(1, world)]
        self._stopping = threading.Event()  # set before the workers are told to stop: their exit is expected
        threading.Thread(target=_watch, args=(self.workers, self._stopping), name="tp-watch", daemon=True).start()
        self.cores = pin_threads(0, world, cores)
        self.group = TensorParallelGroup(0, world, init_method, _backend(device))
        self._closer = weakref.finalize(self, _shutdown, self.group, self.workers, self._stopping)
        super().__init__(**{**kwargs, "device": _rank_device(device, 0)}, sharding=Shard(0, world, self.group))
        self.tensor_parallel_size = world
        log.info("tensor parallel: %d ranks, rank 0 on cores %s, workers %s", world, self.cores,
                 [w.pid for w in self.workers])  # fmt: skip

    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        self.group.broadcast(("forward", batch))
        return super().execute(batch)

    def hidden_states(self, batch: ForwardBatch) -> torch.Tensor:
        self.group.broadcast(("hidden", batch))
        return super().hidden_states(batch)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            self.group.broadcast(("copy", pairs))
        super().copy_blocks(pairs)

    def close(self) -> None:
        self._closer()


def _watch(workers: list[subprocess.Popen], stopping: threading.Event) -> None:
    """A rank that dies takes the model with it (its shard is gone, and the next all-reduce would wait for it):
    say which one and end this process, as vLLM does, so a supervisor (Ray, systemd, Kubernetes) restarts it."""
    for w in workers:
        code = w.wait()
        if not stopping.is_set():
            log.critical("tensor-parallel worker (pid %d) exited with code %s: the engine cannot go on", w.pid, code)
            logging.shutdown()
            os._exit(1)


def _shutdown(group: TensorParallelGroup, workers: list[subprocess.Popen], stopping: threading.Event) -> None:
    """Tell the workers to stop, wait a little, then make sure they are gone (also at interpreter exit)."""
    stopping.set()
    try:
        if all(w.poll() is None for w in workers):
            group.broadcast(None)
    except Exception:  # a worker already died: the broadcast may fail, the waits below still clean up
        pass
    for w in workers:
        try:
            w.wait(timeout=10)
        except subprocess.TimeoutExpired:
            w.kill()
    group.close()


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    _worker(spec["rank"], spec["world"], spec["init_method"], spec["cores"], spec["parent"], spec["kwargs"])
