"""A sweep's jobs spread over the GPUs of one machine, several at a time on each.

Small models leave most of a GPU idle, so a comparison of a hundred small runs finishes much sooner
with several jobs sharing each GPU. Each job runs in a process of its own, pinned to one GPU through
`CUDA_VISIBLE_DEVICES` (set with Hydra's own `hydra.job.env_set`, so the job's `.hydra/hydra.yaml`
records it); a slot takes the next job as soon as its last one ends. With `mps: auto` and more than one
job per GPU, the CUDA MPS daemon is started for the sweep when the machine has it (and is not running
one already), so the jobs' kernels run side by side instead of time-sliced; it is stopped afterwards.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

MPS_CONTROL = "nvidia-cuda-mps-control"


def visible_gpus(gpus: Sequence[int] | None) -> list[str]:
    """The GPUs to use: those given, else every one CUDA_VISIBLE_DEVICES or the driver shows."""
    if gpus is not None:
        return [str(g) for g in gpus]
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    import torch  # only here: Hydra imports this module at every start

    return [str(i) for i in range(torch.cuda.device_count())]


def _run_pickled(payload: bytes) -> JobReturn:
    """The job, in its own process: cloudpickle carries the task function, which lives in `__main__`."""
    import cloudpickle

    return cloudpickle.loads(payload)()


class LocalGPUsLauncher(Launcher):
    def __init__(self, gpus: Sequence[int] | None = None, jobs_per_gpu: int = 1, mps: str = "auto") -> None:
        if jobs_per_gpu < 1:
            raise ValueError(f"hydra.launcher.jobs_per_gpu must be >= 1 (got {jobs_per_gpu})")
        if mps not in ("auto", "off"):
            raise ValueError(f"hydra.launcher.mps must be auto or off (got {mps!r})")
        self.gpus = None if gpus is None else list(gpus)
        self.jobs_per_gpu, self.mps = jobs_per_gpu, mps
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import cloudpickle

        assert self.config is not None
        gpus = visible_gpus(self.gpus)
        if not gpus:
            raise ValueError(
                "hydra/launcher=local_gpus found no GPU: set hydra.launcher.gpus=[0,1] or use the basic launcher"
            )
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        slots = [gpu for gpu in gpus for _ in range(self.jobs_per_gpu)]
        log.info(
            "launching %d jobs on GPUs %s, %d at a time on each", len(job_overrides), ",".join(gpus), self.jobs_per_gpu
        )
        jobs: queue.Queue[tuple[int, list[str]]] = queue.Queue()
        for index, overrides in enumerate(job_overrides):
            jobs.put((initial_job_idx + index, list(overrides)))
        results: dict[int, JobReturn] = {}
        state = Singleton.get_state()

        def work(gpu: str) -> None:
            with ProcessPoolExecutor(max_workers=1, mp_context=_spawn()) as pool:
                while True:
                    try:
                        number, overrides = jobs.get_nowait()
                    except queue.Empty:
                        return
                    log.info("\t#%d on GPU %s : %s", number, gpu, " ".join(filter_overrides(overrides)))
                    payload = cloudpickle.dumps(functools.partial(self._job, overrides, number, gpu, state))
                    results[number] = pool.submit(_run_pickled, payload).result()

        with self._mps(len(slots) > len(gpus)):
            threads = [threading.Thread(target=work, args=(gpu,)) for gpu in slots]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        return [results[initial_job_idx + i] for i in range(len(job_overrides))]

    def _job(self, overrides: list[str], number: int, gpu: str, state: dict[Any, Any]) -> JobReturn:
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        setup_globals()
        Singleton.set_state(state)
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = f"{config.hydra.job.name}_{number}"
            config.hydra.job.num = number
            config.hydra.job.env_set.CUDA_VISIBLE_DEVICES = gpu
        return run_job(
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )

    def _mps(self, shared: bool):
        """A context that runs the CUDA MPS daemon for the sweep when GPUs are shared and it is available."""
        import contextlib

        control = shutil.which(MPS_CONTROL)
        if not (shared and self.mps == "auto" and control) or _mps_running():
            return contextlib.nullcontext()
        return MPSDaemon(control)


def _spawn():
    import multiprocessing

    return multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state inherited


def _mps_running() -> bool:
    """Someone's MPS daemon is up already: leave it be."""
    return subprocess.run(["pgrep", "-x", MPS_CONTROL], capture_output=True).returncode == 0


class MPSDaemon:
    """The CUDA MPS control daemon, started on entry and told to quit on exit."""

    def __init__(self, control: str) -> None:
        self.control = control

    def __enter__(self) -> None:
        subprocess.run([self.control, "-d"], check=False)
        log.info("started the CUDA MPS daemon for this sweep")

    def __exit__(self, *exc: object) -> None:
        subprocess.run([self.control], input=b"quit\n", check=False)
