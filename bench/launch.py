"""``run_all.py --launcher submitit``: every planned (task, method, seed) run becomes one submitit job.

A job calls ``bench.cli.execute_run`` -- the very function the local sweep calls for one run -- so records, their
locks and atomic writes, ``--resume`` and the artifact cache behave as in a local sweep (and a job and a local sweep
may share one ``--out``). ``submitit.AutoExecutor(folder=<out>/.submitit)`` picks SLURM on a cluster, else its
local executor: there this module runs one job per GPU group (``--gpus-per-job`` of the visible GPUs, each job
seeing only its own through ``CUDA_VISIBLE_DEVICES``) or, without a GPU, ``--max-parallel`` jobs at a time. A failed
job is one line with its log path; the others go on.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
import traceback
from pathlib import Path

from bench.errors import BenchError

ENV_PREFIXES = ("SPARSEBENCH_", "HF_", "OMP_NUM_THREADS", "TRANSFORMERS_", "NCCL_")  # passed on to every job
POLL_S = {"local": 1.0, "slurm": 15.0}


def job_main(run, settings, tag: str, at_start, cwd: str, env: dict, gpus: str | None, threads: int | None):
    """The body of one job (top level, so that it pickles by reference): the parent's working directory and
    environment (``--artifacts`` is ``$SPARSEBENCH_ARTIFACTS``), its GPU group, then ``execute_run``."""
    os.chdir(cwd)  # --out, --data-dir and the record paths may be relative
    os.environ.update(env)
    if gpus is not None:  # local executor: this job's GPUs (set before CUDA initialises)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    import torch

    if threads:
        torch.set_num_threads(threads)
    device = settings.device
    if getattr(device, "type", "cpu") == "cuda":  # the job sees only its own GPUs: the first is cuda:0
        settings = dataclasses.replace(settings, device=torch.device("cuda"))
    from bench.cli import execute_run

    return execute_run(run, settings, tag, at_start, announce=f"{tag}: running")


def _executor(args):
    try:
        import submitit
    except ImportError:
        raise BenchError("--launcher submitit needs the submitit package: pip install submitit (or pip install -e "
                         "'.[launch]')") from None
    folder = Path(args.out) / ".submitit"
    kind = args.submitit_executor
    try:
        ex = submitit.AutoExecutor(folder=folder, cluster=None if kind == "auto" else kind)
    except (RuntimeError, ValueError) as e:
        raise BenchError(f"--launcher submitit: no executor ({e})") from None
    params = {"name": "sparsebench", "timeout_min": int(args.slurm_time)}
    if ex.cluster == "slurm":
        params["gpus_per_node"] = int(args.gpus_per_job) if args.gpus_per_job > 0 else None
        if args.slurm_partition:
            params["slurm_partition"] = args.slurm_partition
    ex.update_parameters(**params)
    return ex


def _visible_gpus() -> list[str]:
    """GPU ids this process may use, as CUDA_VISIBLE_DEVICES values (its own list if it has one)."""
    import torch

    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in env.split(",") if x.strip()] if env else []
    return ids[: torch.cuda.device_count()] if ids else [str(i) for i in range(torch.cuda.device_count())]


def _slots(args, cluster: str, device) -> list:
    """What one job at a time may hold: a GPU group (CUDA_VISIBLE_DEVICES string) per local GPU job, None per local
    CPU job; SLURM (and the in-process debug executor) schedules itself: one slot per run."""
    if cluster != "local":
        return []
    if getattr(device, "type", "cpu") == "cuda":
        gpus, k = _visible_gpus(), max(1, args.gpus_per_job)
        groups = [",".join(gpus[i:i + k]) for i in range(0, len(gpus) - k + 1, k)]
        if not groups:
            raise BenchError(f"--gpus-per-job {k}: only {len(gpus)} GPU(s) visible here")
        return groups
    if args.max_parallel < 1:
        raise BenchError(f"--max-parallel {args.max_parallel}: must be at least 1")
    return [None] * args.max_parallel


def _threads(slots: list) -> int | None:
    """CPU threads per local job: the cores shared among the jobs running at once."""
    if not slots:
        return None
    from bench.env import usable_cores

    return max(1, usable_cores() // len(slots))


def error_line(exc: BaseException) -> str:
    """The exception a job died of, in one line (submitit wraps it with the whole remote traceback)."""
    text = str(exc)
    if "----------------------" in text:  # FailedJobError: '<header>\n-----\n<traceback>\n-----\n<where logs are>'
        trace = text.split("----------------------")[1]
        lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
        if lines:
            return lines[-1][:300]
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return (f"{type(exc).__name__}: {first}" if first else type(exc).__name__)[:300]


def submitit_sweep(args, plan, settings, at_start: dict) -> tuple[list[Path], int, set, int]:
    """Submit the plan's runs as jobs (at most one per slot at a time on the local executor), print one line per
    finished job; returns (record paths done, runs held by another sweep, tasks without data, failed jobs)."""
    ex = _executor(args)
    cluster = ex.cluster
    settings = dataclasses.replace(settings, progress=False)  # no terminal in a job
    slots = _slots(args, cluster, plan.device)
    free = list(slots)
    threads = _threads(slots) if getattr(plan.device, "type", "cpu") == "cpu" else None
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    cwd = os.getcwd()
    n = len(plan.runs)
    where = {"slurm": "SLURM", "local": f"local processes ({len(slots)} at a time)",
             "debug": "this process (debug executor)"}.get(cluster, cluster)
    print(f"submitit: {n} job(s) on {where}; logs under {Path(args.out) / '.submitit'}/", flush=True)
    pending = list(enumerate(plan.runs, 1))
    running: dict = {}  # job -> (index, run, slot)
    done_paths, elsewhere, data_failed, failed, finished = [], 0, set(), 0, 0
    try:
        while pending or running:
            while pending and (free or not slots):
                i, r = pending.pop(0)
                slot = free.pop(0) if slots else None
                tag = f"{r.task} {r.method.label} seed {r.seed}"
                job = ex.submit(job_main, r, settings, tag, at_start[r.path], cwd, env, slot, threads)
                running[job] = (i, r, slot, tag)
                if cluster == "slurm":
                    print(f"[{i}/{n}] {tag}: submitted as SLURM job {job.job_id}", flush=True)
            job = _next_finished(running, cluster)
            i, r, slot, tag = running.pop(job)
            if slots:
                free.append(slot)
            finished += 1
            head = f"[{finished}/{n} finished]"
            exc = job.exception()
            if exc is not None:
                failed += 1
                log = job.paths.stderr
                if cluster == "debug":  # the debug executor writes no log: keep the traceback where it says
                    log.parent.mkdir(parents=True, exist_ok=True)
                    log.write_text("".join(traceback.format_exception(exc)))
                print(f"{head} {tag}: FAILED ({error_line(exc)}); log: {log}", flush=True)
                continue
            o = job.result()
            for note in o.notes:
                print(note)
            if o.status == "data":
                if r.task not in data_failed:
                    print(o.line, flush=True)
                data_failed.add(r.task)
                continue
            if o.status == "elsewhere":
                elsewhere += 1
            else:
                done_paths.append(o.path)
            print(f"{head} {o.line}", flush=True)
    except KeyboardInterrupt:
        if cluster == "local":
            for job in running:
                job.cancel(check=False)
        else:
            print(f"interrupted: {len(running)} submitted job(s) go on running (SLURM); rerun with --resume later",
                  file=sys.stderr)
        raise
    return done_paths, elsewhere, data_failed, failed


def _next_finished(running: dict, cluster: str):
    """The next job that is done. The debug executor runs a job when asked for it, in submission order (its
    ``done()`` would open a debugger on a failure, so it is never polled)."""
    if cluster == "debug":
        return next(iter(running))  # the caller's job.exception() runs it (once)
    while True:
        for job in running:
            if job.done():
                return job
        time.sleep(POLL_S.get(cluster, 5.0))
