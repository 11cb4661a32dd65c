"""One training run: the method's stages in order, periodic evals, the best dev checkpoint tested, measured.

Methods act on the run only through their hooks and stages (``bench/method.py``, ``bench/stages.py``): a
dense->sparse switch, a statistics pass, frozen parameters or a distillation loss never need an edit here.

- Steps are global over the run (``trainer.step``): the eval cadence (``train.eval_every``), logs and step-time
  statistics use them. A ``Train`` stage has its own budget, optimizer over the parameters it names (the others
  frozen: ``requires_grad`` False, not in the optimizer), LR schedule, phase name (its ``name``: step times, peak
  memory and best dev checkpoints are grouped by it) and may end early (``trainer.end_stage()``).
- Stage outputs with an ``artifact`` kind are cached (``bench/artifacts.py``) under the hash of what produced them;
  a cached ``Train`` stage is not rerun: its weights, RNG state and history are restored and the batch stream is
  advanced past its steps, so what follows is exactly what a fresh run would compute.
- A run of several stages saves its state after each finished stage; a killed run resumes after the last one.
- After the last stage: the best dev checkpoint of the candidate stages is tested, then every other stage's best
  (spion.md pitfall 12), throughput and forward cost are measured, and ``Sweep`` stages evaluate operating points.

- Under torchrun (WORLD_SIZE > 1, ``bench/distributed.py``) each rank trains its contiguous share of the same global
  batch through DDP; rank 0 evaluates (the others receive its dev metrics), tests, measures and returns the record.

``Trainer.run()`` returns the record (None on a torchrun rank > 0).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from typing import Any

import numpy as np
import torch

from bench import distributed as distmod
from bench import env as envmod
from bench.artifacts import ArtifactStore, artifact_key
from bench.config import FULL_BUDGET_SCALES, RunConfig, TrainConfig
from bench.errors import BenchError
from bench.measure import BUSY_AFTER, BusyProfiler, PeakMemory, StepTimer, time_inference
from bench.records import RunRecord
from bench.stages import Compute, Sweep, Train


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def is_better(a: float, b: float | None, higher: bool) -> bool:
    """Is dev score ``a`` an improvement on the best so far ``b`` (None: nothing yet)? A non-finite score never
    is, and any finite one beats a non-finite best: a NaN eval must not become a permanent "best"."""
    if a is None or not math.isfinite(a):
        return False
    if b is None or not math.isfinite(b):
        return True
    return a > b if higher else a < b


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Multiplier of the peak LR at each step: linear warm-up, then the named decay."""
    warm = max(cfg.warmup_steps, 0)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "rsqrt":
            return math.sqrt(max(warm, 1) / max(step + 1, 1))
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown schedule {cfg.schedule!r}; valid: linear, cosine, rsqrt, constant, onecycle")

    return f


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.schedule == "onecycle":  # SPION/Skyformer: OneCycle, linear anneal, cycles Adam beta1 too
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=max(total_steps, 2), pct_start=min(0.99, cfg.warmup_steps / max(total_steps, 1)),
            anneal_strategy="linear",
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))


def _rng_state(gen: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(), "numpy": np.random.get_state(), "batches": gen.get_state()}


def _set_rng_state(s: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    gen.set_state(s["batches"])


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _fits(model: torch.nn.Module, state: dict) -> bool:
    own = model.state_dict()
    return own.keys() == state.keys() and all(own[k].shape == state[k].shape for k in own)


# Train settings that do not change what a stage computes (they are left out of artifact keys)
_KEY_EXCLUDED = ("steps", "timing_warmup_steps", "throughput_batches")


class Trainer:
    def __init__(self, cfg: RunConfig, task, method, device: torch.device, progress: bool = True, log=print,
                 artifacts: ArtifactStore | None = None):
        self.cfg, self.task, self.method, self.device = cfg, task, method, device
        self.progress, self.log = progress, log
        self.artifacts = artifacts if artifacts is not None else ArtifactStore(log=log)
        self.step = 0
        self.phase = "train"  # the running stage's name (a method may still rename it); results are grouped by it
        self.stage: Train | Compute | Sweep | None = None
        self.history: list[dict] = []
        self.events: list[dict] = []  # method phase changes etc., copied into the record
        self.stage_records: list[dict] = []
        self.artifacts_used: list[dict] = []
        self.operating_points: list[dict] = []
        self.optimizer = self.scheduler = None
        self._end_requested = False
        self.dist = distmod.info()  # None unless torchrun started this process with WORLD_SIZE > 1
        if self.dist:
            bs, world = cfg.train.batch_size, self.dist.world_size
            if bs % world:
                raise BenchError(f"train.batch_size={bs} is not divisible by WORLD_SIZE={world}; the global batch is "
                                 f"split evenly over the ranks")
            self.device = distmod.setup(device)

    # ---- helpers methods may call from hooks ------------------------------------------------
    def autocast(self):
        amp = self.cfg.train.amp
        if amp == "auto":
            amp = "bf16" if self.device.type == "cuda" else "off"
        if amp == "off":
            return contextlib.nullcontext()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        return torch.autocast(self.device.type, dtype=dtype)

    def end_stage(self) -> None:
        """End the running Train stage after this step (SPION: its transition ends the dense stage)."""
        self._end_requested = True

    def restart_schedule(self, total_steps: int, lr: float | None = None) -> None:
        """Start a fresh LR schedule of ``total_steps`` on the current optimizer (peak ``lr``, default train.lr)."""
        tc = self.cfg.train if lr is None else dataclasses.replace(self.cfg.train, lr=lr)
        for g in self.optimizer.param_groups:
            g.pop("initial_lr", None)
            g["lr"] = tc.lr
        self.scheduler = make_scheduler(self.optimizer, tc, total_steps)
        self._sched_spec = (tc, total_steps)

    def note(self, event: str, **info: Any) -> None:
        self.events.append({"step": self.step, "event": event, **info})
        self.log(f"[step {self.step}] {event} {info if info else ''}".rstrip())

    def evaluate(self, split: str, max_batches: int = 0) -> dict:
        self.model.eval()
        with self.autocast():
            metrics = self.task.evaluate(self.model, split, max_batches)
        self.model.train()
        return metrics

    def artifact_parts(self, index: int, stage, **resolved: Any) -> dict:
        """Everything that determines stage ``index``'s output: the key of its artifact (never the method's name)."""
        cfg = self.cfg
        train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in _KEY_EXCLUDED}
        return {"task": cfg.task, "seed": cfg.seed, "data": dataclasses.asdict(cfg.data) if dataclasses.is_dataclass(cfg.data)
                else cfg.data, "model": dataclasses.asdict(cfg.model) if dataclasses.is_dataclass(cfg.model) else cfg.model,
                "train": train, "device": self.device.type, "params": self._param_shapes,
                "stages": self._lineage + [{**self._identity(stage), **resolved}], "artifact_key": dict(stage.artifact_key)}

    # ---- the run --------------------------------------------------------------------------
    def run(self) -> RunRecord:
        cfg, tc, task, method = self.cfg, self.cfg.train, self.task, self.method
        t_start = time.perf_counter()
        self.gen = seed_everything(cfg.seed)
        task.prepare()
        self.model = model = task.build_model(method).to(self.device)
        self._param_shapes = [[n, list(p.shape)] for n, p in model.named_parameters()]
        if self.dist:  # per-rank model RNG (dropout); the batch generator stays the shared seed
            torch.manual_seed(cfg.seed + self.dist.rank)
        self.scaler = torch.amp.GradScaler(enabled=(tc.amp == "fp16" and self.device.type == "cuda"))
        self.main, self.hib = task.MAIN_METRIC, task.METRICS[task.MAIN_METRIC]
        self.best = {"val": None, "step": -1, "dev": {}, "state": None, "phase": None}
        self.best_by_phase: dict[str, tuple] = {}  # phase -> (dev value, step, CPU copy of the weights)
        self.timer, self.mem = StepTimer(self.device, tc.timing_warmup_steps), PeakMemory(self.device)
        self.busy = BusyProfiler(self.device, max(tc.timing_warmup_steps, BUSY_AFTER))  # CUDA only; not timed
        self._batches = task.train_batches(self.gen)
        self._batches_drawn = 0
        self._lineage: list[dict] = []
        self._computed: list[tuple[int, Any]] = []  # (stage index, payload) of Compute stages, replayed on resume
        stages = self._validated(method.stages(self))
        self.budget = self._budget(stages)
        self._declared = [self._identity(s) if not isinstance(s, Sweep) else {"sweep": s.name} for s in stages]
        method.on_train_start(self)
        first = next((s for s in stages if isinstance(s, Train)), None)
        self.mem.phase = first.name if first else "train"
        self.mem.reset()
        model.train()
        start = self._resume(stages)
        sweeps = []
        for index, stage in enumerate(stages):
            if index < start:
                continue
            if isinstance(stage, Sweep):
                sweeps.append(stage)
                continue
            self.stage = stage
            method.on_stage_start(self, stage)
            t0 = time.perf_counter()
            entry = self._train(index, stage, stages) if isinstance(stage, Train) else self._compute(index, stage)
            entry["wall_s"] = time.perf_counter() - t0
            self.stage_records.append(entry)
            method.on_stage_end(self, stage)
            if any(isinstance(s, (Train, Compute)) for s in stages[index + 1:]):
                if distmod.is_main():
                    self._save_run_state(index)
                self._barrier()
        self.stage = None
        measurements = {**self.timer.summary(), **self.mem.summary(), **self.busy.summary()}
        if self.dist:
            if not self._gather_measurements(measurements):
                return None  # rank > 0: rank 0 tests, measures and writes the record
        self._attach_stage_measurements(measurements)
        best = self.best
        if best["state"] is not None:
            model.load_state_dict(best["state"])
        test = self.evaluate("test")
        # A run with phases (e.g. SPION dense -> sparse) also tests each other phase's best checkpoint, with the
        # attention the method has at the end: the overall best may predate the switch (spion.md pitfall 12).
        self.phase_tests = {}
        for phase, (val, step_, state) in sorted(self.best_by_phase.items()):
            if state is not None and phase != best["phase"]:
                if not _fits(model, state):  # the model changed shape since (e.g. FFNs split into experts)
                    continue
                model.load_state_dict(state)
                self.phase_tests[phase] = {"step": step_, "dev": val, "test": self.evaluate("test")}
        measurements.update(self._throughput())
        if best["state"] is not None:
            model.load_state_dict(best["state"])
        self.cost = self._cost()
        for stage in sweeps:
            self._sweep(stage)
        self._delete_run_states(stages)
        return self._record(test, best["dev"], best["step"], best["phase"] if best["state"] is not None else None,
                            self.step, measurements, time.perf_counter() - t_start)

    # ---- stages ---------------------------------------------------------------------------
    def _validated(self, stages: list) -> list:
        if not stages or not all(isinstance(s, (Train, Compute, Sweep)) for s in stages):
            raise BenchError(f"{self.method.name}: stages() must return a non-empty list of bench.stages "
                             f"Train/Compute/Sweep, got {stages!r}")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise BenchError(f"{self.method.name}: stage names must be unique, got {names}")
        for s in stages:
            if isinstance(s, Train) and not (s.steps is None or s.steps == "rest" or (isinstance(s.steps, int) and s.steps >= 0)):
                raise BenchError(f"{self.method.name}: stage {s.name!r} steps={s.steps!r}; expected None, 'rest' or an int >= 0")
        return list(stages)

    def _budget(self, stages: list) -> int:
        """The run's step budget: train.steps if a stage takes 'what is left', else the sum of the stages' steps."""
        steps = [s.steps for s in stages if isinstance(s, Train)]
        if any(s is None or s == "rest" for s in steps):
            return self.cfg.train.steps
        return sum(steps)

    @staticmethod
    def _identity(stage) -> dict:
        if isinstance(stage, Train):
            d = {f.name: getattr(stage, f.name) for f in dataclasses.fields(stage) if f.name not in ("trainable", "artifact_key")}
            d["trainable"] = getattr(stage.trainable, "__qualname__", None) if stage.trainable else None
            return {"type": "train", **d}
        return {"type": "compute", "name": stage.name, "fn": getattr(stage.fn, "__qualname__", repr(stage.fn)),
                "artifact": stage.artifact}

    def _stage_config(self, stage: Train) -> TrainConfig:
        over = {k: getattr(stage, k) for k in ("lr", "schedule", "warmup_steps") if getattr(stage, k) is not None}
        return dataclasses.replace(self.cfg.train, **over) if over else self.cfg.train

    def _set_trainable(self, stage: Train) -> list[str]:
        names = []
        for n, p in self.model.named_parameters():
            p.requires_grad_(stage.trainable is None or bool(stage.trainable(n, p)))
            if p.requires_grad:
                names.append(n)
        if not names:
            raise BenchError(f"{self.method.name}: stage {stage.name!r} trains no parameter (its trainable() "
                             f"rejects all {len(self._param_shapes)}); give it at least one")
        return names

    def _new_optimizer(self, tc: TrainConfig) -> None:
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tc.lr, betas=tc.adam_betas, eps=tc.adam_eps,
        )

    def _next_batch(self):
        self._batches_drawn += 1
        batch = next(self._batches)
        if self.dist:  # every rank draws the same global batch and keeps its contiguous share of the rows
            batch = distmod.shard(batch, self.dist.rank, self.dist.world_size, self.cfg.train.batch_size)
        return batch

    def _barrier(self) -> None:
        if self.dist:
            torch.distributed.barrier()

    def _ddp(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model the training forward runs (DDP over the parameters this stage trains; self.model stays the
        plain module for hooks, checkpoints and evals)."""
        if not self.dist:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=True)

    def _gather_measurements(self, measurements: dict) -> bool:
        """Per-rank step time and peak memory, gathered to rank 0 (True on rank 0)."""
        mine = {"rank": self.dist.rank, "train_step_ms_median": measurements.get("train_step_ms_median"),
                "peak_mem_mib": measurements.get("peak_mem_mib")}
        got = [None] * self.dist.world_size
        torch.distributed.all_gather_object(got, mine)
        if self.dist.rank != 0:
            return False
        measurements["train_step_ms_median_per_rank"] = [g["train_step_ms_median"] for g in got]
        measurements["peak_mem_mib_per_rank"] = [g["peak_mem_mib"] for g in got]
        measurements["world_size"] = self.dist.world_size
        return True

    def _skip_batches(self, n: int) -> None:
        """Advance the batch stream as ``n`` training steps would (a reused or resumed stage)."""
        for _ in range(n):
            self._next_batch()

    def _train(self, index: int, stage: Train, stages: list) -> dict:
        tc, method, model = self.cfg.train, self.method, self.model
        steps = self.budget - self.step if stage.steps is None or stage.steps == "rest" else stage.steps
        steps = max(0, min(steps, self.budget - self.step))
        start = self.step
        self.phase = stage.name
        names = self._set_trainable(stage)
        entry = {"name": stage.name, "kind": "train", "start_step": start, "steps_planned": steps,
                 "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                 "params": sum(p.numel() for p in model.parameters())}
        key = None
        if stage.artifact:
            key = artifact_key(stage.artifact, self.artifact_parts(index, stage, start_step=start, steps_resolved=steps))
            hit = self.artifacts.load(stage.artifact, key)
            if hit is not None:
                self._restore_train_artifact(stage, hit[0])
                entry.update(steps_run=self.step - start, ended=hit[0]["ended"], reused_from=hit[1].get("run"))
                self.artifacts_used.append({"stage": stage.name, "kind": stage.artifact, "key": key, "reused": True})
                self.log(f"stage {stage.name}: reused {stage.artifact} {key[:12]} ({entry['steps_run']} steps not rerun)")
                self._lineage.append({**self._identity(stage), "steps_run": entry["steps_run"]})
                self._trainable_names = names
                return entry
        if steps == 0:
            entry.update(steps_run=0, ended="planned")
            self._lineage.append({**self._identity(stage), "steps_run": 0})
            return entry
        stc = self._stage_config(stage)
        if stage.optimizer == "continue":
            if self.optimizer is None or names != getattr(self, "_trainable_names", None):
                raise BenchError(f"{method.name}: stage {stage.name!r} continues the optimizer, but "
                                 f"{'there is none' if self.optimizer is None else 'its trainable parameters differ'}; "
                                 f"use optimizer='new'")
        else:
            self._new_optimizer(stc)
            self._opt_stage = index
        self._trainable_names = names
        if stage.optimizer == "new" or stage.lr_schedule == "new":
            self.restart_schedule(stage.schedule_steps or self._schedule_length(index, stages, start, steps), stc.lr)
        elif self.scheduler is None:
            raise BenchError(f"{method.name}: stage {stage.name!r} continues the LR schedule, but none runs yet; "
                             f"use lr_schedule='new'")
        last_train = not any(isinstance(s, Train) for s in stages[stages.index(stage) + 1:])
        history_from = len(self.history)
        self._end_requested = False
        loss_acc, loss_n = 0.0, 0
        bar = _progress(steps, f"{self.cfg.task}/{self.cfg.method} s{self.cfg.seed} {stage.name}", self.progress)
        fwd_model = self._ddp(model)
        for step in range(start, start + steps):
            self.step = step
            batch = self.task.to_device(self._next_batch(), self.device)
            method.before_step(self, step)
            self.mem.set_phase(self.phase)  # syncs only when the phase changed
            profiled = self.busy.profiling(self.phase)
            handle = None if profiled else self.timer.start()
            with self.autocast():
                task_loss, out = self.task.loss(fwd_model, batch)
                loss = method.loss(self, batch, task_loss, out)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if tc.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                if tc.grad_clip_mode == "value":
                    torch.nn.utils.clip_grad_value_(model.parameters(), tc.grad_clip)
                else:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            step_lr = self.optimizer.param_groups[0]["lr"]  # the LR this step used; after the last step
            self.scheduler.step()                            # OneCycle extrapolates past its end (< 0)
            if profiled:
                self.busy.step_done()
            else:
                self.timer.stop(handle, self.phase)
            loss_acc += loss.detach().float()
            loss_n += 1
            method.after_step(self, step)
            bar.update(1)
            stage_end = step == start + steps - 1
            final = last_train and (stage_end or self._end_requested)
            if (step + 1) % tc.eval_every == 0 or final or (stage_end and stage.eval_at_end):
                train_loss = (loss_acc / max(loss_n, 1)).item() if torch.is_tensor(loss_acc) else loss_acc
                loss_acc, loss_n = 0.0, 0
                self._eval(step, stage, train_loss, step_lr, bar)
            if self._end_requested:
                break
        bar.close()
        self.busy.close()
        self.timer.flush()
        self.step = step + 1
        ended = "early" if self._end_requested else "planned"
        self._end_requested = False
        entry.update(steps_run=self.step - start, ended=ended)
        if stage.keep_best and stage.name in self.best_by_phase:
            model.load_state_dict(self.best_by_phase[stage.name][2])
        if stage.artifact:
            nxt = stages[index + 1] if index + 1 < len(stages) else None
            payload = {"state": _cpu_state(model), "rng": _rng_state(self.gen), "steps_run": entry["steps_run"],
                       "ended": ended, "history": self.history[history_from:], "phase": stage.name,
                       "best": self.best_by_phase.get(stage.name, (None, None, None))[:2],
                       "optimizer": self.optimizer.state_dict() if isinstance(nxt, Train) and nxt.optimizer == "continue" else None}
            if distmod.is_main():
                self.artifacts.save(stage.artifact, key, payload, {"run": self._run_name(), "stage": stage.name,
                                                                   "git": envmod.git_state().get("commit")})
            self._barrier()
            self.artifacts_used.append({"stage": stage.name, "kind": stage.artifact, "key": key, "reused": False})
        self._lineage.append({**self._identity(stage), "steps_run": entry["steps_run"]})
        entry["cost"] = self._cost()  # the forward as this stage left it (e.g. dense before a switch, sparse after)
        return entry

    def _schedule_length(self, index: int, stages: list, start: int, steps: int) -> int:
        """A new schedule spans this stage and the following training stages that continue it."""
        total, pos = steps, start + steps
        for s in stages[index + 1:]:
            if not isinstance(s, Train):
                continue
            if s.lr_schedule != "continue" or s.optimizer != "continue":
                break
            n = self.budget - pos if s.steps is None or s.steps == "rest" else min(s.steps, self.budget - pos)
            total, pos = total + n, pos + n
        return total

    def _eval(self, step: int, stage: Train, train_loss: float, step_lr: float, bar) -> None:
        self.busy.close()  # a profiled window never spans an eval
        self.timer.flush()
        if not math.isfinite(train_loss):
            self.note("non-finite training loss", loss=train_loss)
        if self.dist:
            train_loss = self._mean_over_ranks(train_loss)
            dev = [self.evaluate("dev", self.cfg.train.eval_batches) if self.dist.rank == 0 else None]
            torch.distributed.broadcast_object_list(dev, src=0)  # rank 0 evaluates, the others wait for its result
            dev = dev[0]
        else:
            dev = self.evaluate("dev", self.cfg.train.eval_batches)
        self.method.on_eval(self, step, dev)
        self.history.append({"step": step + 1, "train_loss": train_loss, "lr": step_lr,
                             "phase": self.phase, **{f"dev_{k}": v for k, v in dev.items()}})
        bar.set_postfix(loss=f"{train_loss:.3f}", **{self.main: f"{dev[self.main]:.3f}"})
        val = dev[self.main]
        if is_better(val, self.best_by_phase.get(self.phase, (None,))[0], self.hib):
            state = _cpu_state(self.model)
            self.best_by_phase[self.phase] = (val, step + 1, state)
            if stage.candidate and is_better(val, self.best["val"], self.hib):
                self.best = {"val": val, "step": step + 1, "dev": dev, "state": state, "phase": self.phase}

    def _mean_over_ranks(self, x: float) -> float:
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t)
        return (t / self.dist.world_size).item()

    def _restore_train_artifact(self, stage: Train, payload: dict) -> None:
        self._skip_batches(payload["steps_run"])
        self.model.load_state_dict(payload["state"])
        _set_rng_state(payload["rng"], self.gen)
        self.step += payload["steps_run"]
        self.history.extend({**h, "reused": True} for h in payload["history"])
        val, step = payload["best"]
        if val is not None:
            state = _cpu_state(self.model) if stage.keep_best else None
            self.best_by_phase[stage.name] = (val, step, state)
            if stage.candidate and state is not None and is_better(val, self.best["val"], self.hib):
                dev = next((h for h in payload["history"] if h["step"] == step), {})
                self.best = {"val": val, "step": step, "state": state, "phase": stage.name,
                             "dev": {k[4:]: v for k, v in dev.items() if k.startswith("dev_")}}
        if payload.get("optimizer") is not None:
            self._set_trainable(stage)
            self._new_optimizer(self._stage_config(stage))
            self.optimizer.load_state_dict(payload["optimizer"])

    def _compute(self, index: int, stage: Compute) -> dict:
        entry = {"name": stage.name, "kind": "compute", "start_step": self.step}
        payload, key, reused = None, None, False
        if stage.artifact:
            key = artifact_key(stage.artifact, self.artifact_parts(index, stage))
            hit = self.artifacts.load(stage.artifact, key)
            if hit is not None:
                payload, reused = hit[0], True
                self.artifacts_used.append({"stage": stage.name, "kind": stage.artifact, "key": key, "reused": True})
                self.log(f"stage {stage.name}: reused {stage.artifact} {key[:12]}")
        if payload is None:
            payload = stage.fn(self)  # under torchrun every rank computes it (same weights; AP: the whole split)
            if stage.artifact:
                if distmod.is_main():  # rank 0 alone writes it (no collective here: a rank may have found it cached)
                    self.artifacts.save(stage.artifact, key, payload, {"run": self._run_name(), "stage": stage.name,
                                                                       "git": envmod.git_state().get("commit")})
                self.artifacts_used.append({"stage": stage.name, "kind": stage.artifact, "key": key, "reused": False})
        entry["reused"] = reused
        if stage.apply is not None:
            stage.apply(self, payload)
            entry["cost"] = self._cost()
        self.model.train()
        self._computed.append((index, payload))
        self._lineage.append(self._identity(stage))
        return entry

    def _sweep(self, stage: Sweep) -> None:
        for point in stage.points:
            facts = stage.apply(self, point)
            metrics = {}
            for split in stage.splits:
                res = self.evaluate(split, stage.eval_batches)
                metrics.update({f"{split}_{k}": float(v) for k, v in res.items() if k in self.task.METRICS})
            self.operating_points.append({"stage": stage.name, "point": point, "metrics": metrics,
                                          "facts": facts or {}, "cost": self._cost()})
            self.log(f"{stage.name} {point}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    # ---- resuming a killed multi-stage run ----------------------------------------------------
    def _run_name(self) -> str:
        return f"{self.cfg.task}/{self.cfg.method}/s{self.cfg.seed}/{self.cfg.hash}"

    def _run_state_key(self, index: int) -> str:
        # the stage declarations and the code's commit are part of the key: a changed protocol never resumes
        return artifact_key("run_state", {"run": self._run_name(), "stage": index, "params": self._param_shapes,
                                          "stages": self._declared, "git": envmod.git_state().get("commit")})

    def _save_run_state(self, index: int) -> None:
        self.timer.flush()
        state = {
            "index": index, "step": self.step, "model": _cpu_state(self.model), "rng": _rng_state(self.gen),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "opt_stage": getattr(self, "_opt_stage", None), "trainable": getattr(self, "_trainable_names", None),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "sched_spec": getattr(self, "_sched_spec", None), "scaler": self.scaler.state_dict(),
            "history": self.history, "events": self.events, "best": self.best, "best_by_phase": self.best_by_phase,
            "lineage": self._lineage, "computed": self._computed, "stage_records": self.stage_records,
            "artifacts_used": self.artifacts_used, "times_ms": dict(self.timer.times_ms), "seen": dict(self.timer._seen),
            "mem": (self.mem.phase, dict(self.mem.by_phase)), "method": self.method.state_dict(),
            "batches_drawn": self._batches_drawn, "busy": dict(self.busy.by_phase),
        }
        self.artifacts.save("run_state", self._run_state_key(index), state, {"run": self._run_name()})

    def _resume(self, stages: list) -> int:
        """Index of the first stage to run: after the last finished stage of an interrupted run, else 0."""
        for index in range(len(stages) - 1, -1, -1):
            hit = self.artifacts.load("run_state", self._run_state_key(index))
            if hit is None:
                continue
            s = hit[0]
            for i, payload in s["computed"]:
                if stages[i].apply is not None:
                    stages[i].apply(self, payload)
            self.method.load_state_dict(s["method"])
            self.model.load_state_dict(s["model"])
            self._skip_batches(s["batches_drawn"])
            _set_rng_state(s["rng"], self.gen)
            if s["optimizer"] is not None:
                self._set_trainable(stages[s["opt_stage"]])
                self._trainable_names = s["trainable"]
                self._new_optimizer(self._stage_config(stages[s["opt_stage"]]))
                self.optimizer.load_state_dict(s["optimizer"])
                self._opt_stage = s["opt_stage"]
                tc, total = s["sched_spec"]
                self.scheduler = make_scheduler(self.optimizer, tc, total)
                self.scheduler.load_state_dict(s["scheduler"])
                self._sched_spec = (tc, total)
            self.scaler.load_state_dict(s["scaler"])
            self.step, self.history, self.events = s["step"], s["history"], s["events"]
            self.best, self.best_by_phase = s["best"], s["best_by_phase"]
            self._lineage, self._computed, self.stage_records = s["lineage"], s["computed"], s["stage_records"]
            self.artifacts_used = s["artifacts_used"]
            self.timer.times_ms.update(s["times_ms"])
            self.timer._seen.update(s["seen"])
            self.mem.phase, self.mem.by_phase = s["mem"][0], dict(s["mem"][1])
            self.busy.by_phase.update(s.get("busy") or {})
            self.note("resumed an interrupted run", after_stage=stages[index].name,
                      note="step times and peak memory of the earlier stages come from the interrupted process")
            return index + 1
        return 0

    def _delete_run_states(self, stages: list) -> None:
        for index in range(len(stages)):
            self.artifacts.delete("run_state", self._run_state_key(index))

    # ---- measurements ------------------------------------------------------------------------
    def _attach_stage_measurements(self, measurements: dict) -> None:
        by_phase = measurements.get("train_step_ms_median_by_phase") or {}
        mem = measurements.get("peak_mem_mib_by_phase") or {}
        for e in self.stage_records:
            if e["kind"] == "train":
                e["train_step_ms_median"] = by_phase.get(e["name"], measurements.get("train_step_ms_median")
                                                         if len(self.stage_records) == 1 else None)
                e["peak_mem_mib"] = mem.get(e["name"], measurements.get("peak_mem_mib") if not mem else None)

    def _cost(self) -> dict | None:
        try:
            from bench.cost import forward_cost
        except ImportError:
            return None
        batch = next(iter(self.task.eval_batches("dev")), None)
        if batch is None:
            return None
        n_tokens = self.task.batch_size_tokens(batch)[1]
        b = self.task.to_device(batch, self.device)
        self.model.eval()

        def fwd():
            with self.autocast():
                return self.task.loss(self.model, b)

        try:
            return forward_cost(self.model, self.method, fwd, n_tokens)
        finally:
            self.model.train()

    def _throughput(self) -> dict:
        tc = self.cfg.train
        batches = []
        for i, b in enumerate(self.task.eval_batches("dev")):
            if i > tc.throughput_batches:
                break
            batches.append(b)
        if len(batches) > 1:
            batches = batches[:-1] if len(batches) > tc.throughput_batches else batches
        sizes = [self.task.batch_size_tokens(b) for b in batches]
        dev_batches = [self.task.to_device(b, self.device) for b in batches]
        self.model.eval()

        def fwd(b):
            with self.autocast():
                self.task.loss(self.model, b)

        out = time_inference(fwd, dev_batches, self.device, [t for _, t in sizes], [s for s, _ in sizes])
        self.model.train()
        return out

    def _env(self) -> dict:
        env = envmod.environment(str(self.device))
        if self.dist:
            env["world_size"] = self.dist.world_size
        return env

    def _record(self, test, best_dev, best_step, best_phase, steps_run, measurements, wall) -> RunRecord:
        cfg, task = self.cfg, self.task
        metrics = {k: float(v) for k, v in test.items() if k in task.METRICS}
        higher = {k: task.METRICS[k] for k in metrics}
        for k, v in best_dev.items():
            if k in task.METRICS:
                metrics[f"dev_{k}"] = float(v)
                higher[f"dev_{k}"] = task.METRICS[k]
        info = {"family": self.method.family, **self.method.info()}
        if self.method.variant:
            info["variant"] = self.method.variant
        if self.events:
            info["events"] = self.events
        info["best_checkpoint"] = {"step": best_step, "phase": best_phase}
        for phase, res in getattr(self, "phase_tests", {}).items():
            for k, v in res["test"].items():
                if k in task.METRICS:
                    metrics[f"{k}_best_{phase}"] = float(v)
                    higher[f"{k}_best_{phase}"] = task.METRICS[k]
            info.setdefault("best_checkpoint_by_phase", {})[phase] = {"step": res["step"], "dev": res["dev"]}
        budget = {
            "main_metric": task.MAIN_METRIC,
            "steps_run": steps_run,
            "steps_planned": self.budget,
            "eval_every": cfg.train.eval_every,
            "evals_run": len(self.history),
            "reduced": cfg.scale not in FULL_BUDGET_SCALES,
            "note": "; ".join(cfg.notes) if cfg.notes else ("" if cfg.scale in FULL_BUDGET_SCALES else f"{cfg.scale} scale"),
            "data_notes": list(getattr(task, "data_notes", ())),  # e.g. "generated, not the LRA release"
            "test_examples": int(test.get("n_examples", 0)),
        }
        extra = {"stages": self.stage_records, "operating_points": self.operating_points,
                 "artifacts": self.artifacts_used, "cost": self.cost}
        fields = {f.name for f in dataclasses.fields(RunRecord)}
        for k, v in extra.items():  # additive record fields (schema 1); older readers ignore them
            if k not in fields:
                info[f"_{k}"] = v
        return RunRecord(
            kind="run", task=cfg.task, method=cfg.method, scale=cfg.scale, seed=cfg.seed,
            config=cfg.to_dict(), config_hash=cfg.hash, metrics=metrics, higher_is_better=higher,
            measurements=measurements, budget=budget, method_info=info,
            env=self._env(), git=envmod.git_state(), date=envmod.now_utc(),
            wall_time_s=wall, history=self.history, **{k: v for k, v in extra.items() if k in fields},
        )


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not enabled)
