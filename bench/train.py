"""One training run: optimise, evaluate periodically, keep the best dev checkpoint, test it, measure.

Methods act on the run only through their hooks (``bench/method.py``): a dense->sparse switch, a
calibration pass or a distillation loss never needs an edit here. ``Trainer.run()`` returns the record.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Any

import numpy as np
import torch

from bench import env as envmod
from bench.config import RunConfig, TrainConfig
from bench.measure import PeakMemory, StepTimer, time_inference
from bench.records import RunRecord


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


class Trainer:
    def __init__(self, cfg: RunConfig, task, method, device: torch.device, progress: bool = True, log=print):
        self.cfg, self.task, self.method, self.device = cfg, task, method, device
        self.progress, self.log = progress, log
        self.step = 0
        self.phase = "train"  # methods may rename phases (e.g. "dense", "sparse"); step times are grouped by it
        self.history: list[dict] = []
        self.events: list[dict] = []  # method phase changes etc., copied into the record

    # ---- helpers methods may call from hooks ------------------------------------------------
    def autocast(self):
        amp = self.cfg.train.amp
        if amp == "auto":
            amp = "bf16" if self.device.type == "cuda" else "off"
        if amp == "off":
            return contextlib.nullcontext()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        return torch.autocast(self.device.type, dtype=dtype)

    def restart_schedule(self, total_steps: int) -> None:
        """Start a fresh LR schedule of ``total_steps`` (SPION-C/CF restart OneCycle at the switch)."""
        for g in self.optimizer.param_groups:
            g["lr"] = g.get("initial_lr", self.cfg.train.lr)
        self.scheduler = make_scheduler(self.optimizer, self.cfg.train, total_steps)

    def note(self, event: str, **info: Any) -> None:
        self.events.append({"step": self.step, "event": event, **info})
        self.log(f"[step {self.step}] {event} {info if info else ''}".rstrip())

    def evaluate(self, split: str, max_batches: int = 0) -> dict:
        self.model.eval()
        with self.autocast():
            metrics = self.task.evaluate(self.model, split, max_batches)
        self.model.train()
        return metrics

    # ---- the run --------------------------------------------------------------------------
    def run(self) -> RunRecord:
        cfg, tc, task, method = self.cfg, self.cfg.train, self.task, self.method
        t_start = time.perf_counter()
        gen = seed_everything(cfg.seed)
        task.prepare()
        self.model = model = task.build_model(method).to(self.device)
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            (no_decay if p.ndim < 2 else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tc.lr, betas=tc.adam_betas, eps=tc.adam_eps,
        )
        self.scheduler = make_scheduler(self.optimizer, tc, tc.steps)
        scaler = torch.amp.GradScaler(enabled=(tc.amp == "fp16" and self.device.type == "cuda"))
        main, hib = task.MAIN_METRIC, task.METRICS[task.MAIN_METRIC]
        best_val, best_state, best_step, best_dev = None, None, -1, {}
        best_by_phase: dict[str, tuple] = {}  # phase -> (dev value, step, CPU copy of the weights)
        timer, mem = StepTimer(self.device, tc.timing_warmup_steps), PeakMemory(self.device)
        batches = task.train_batches(gen)
        method.on_train_start(self)
        mem.phase = self.phase  # a method may start in its own phase (SPION: "dense")
        mem.reset()
        model.train()
        loss_acc, loss_n = 0.0, 0
        bar = _progress(tc.steps, f"{cfg.task}/{cfg.method} s{cfg.seed}", self.progress)
        for step in range(tc.steps):
            self.step = step
            batch = task.to_device(next(batches), self.device)
            method.before_step(self, step)
            mem.set_phase(self.phase)  # syncs only when the phase changed
            handle = timer.start()
            with self.autocast():
                loss, out = task.loss(model, batch)
                extra = method.extra_loss(self, batch, out)
                if extra is not None:
                    loss = loss + extra
            self.optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if tc.grad_clip > 0:
                scaler.unscale_(self.optimizer)
                if tc.grad_clip_mode == "value":
                    torch.nn.utils.clip_grad_value_(model.parameters(), tc.grad_clip)
                else:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            scaler.step(self.optimizer)
            scaler.update()
            step_lr = self.optimizer.param_groups[0]["lr"]  # the LR this step used; after the last step
            self.scheduler.step()                            # OneCycle extrapolates past its end (< 0)
            timer.stop(handle, self.phase)
            loss_acc += loss.detach().float()
            loss_n += 1
            method.after_step(self, step)
            bar.update(1)
            last = step == tc.steps - 1
            if (step + 1) % tc.eval_every == 0 or last:
                timer.flush()
                train_loss = (loss_acc / max(loss_n, 1)).item() if torch.is_tensor(loss_acc) else loss_acc
                loss_acc, loss_n = 0.0, 0
                if not math.isfinite(train_loss):
                    self.note("non-finite training loss", loss=train_loss)
                dev = self.evaluate("dev", tc.eval_batches)
                method.on_eval(self, step, dev)
                self.history.append({"step": step + 1, "train_loss": train_loss, "lr": step_lr,
                                     "phase": self.phase, **{f"dev_{k}": v for k, v in dev.items()}})
                bar.set_postfix(loss=f"{train_loss:.3f}", **{main: f"{dev[main]:.3f}"})
                val = dev[main]
                if is_better(val, best_by_phase.get(self.phase, (None,))[0], hib):
                    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                    best_by_phase[self.phase] = (val, step + 1, state)
                    if is_better(val, best_val, hib):
                        best_val, best_step, best_dev, best_state, best_phase = val, step + 1, dev, state, self.phase
        bar.close()
        steps_run = tc.steps
        measurements = {**timer.summary(), **mem.summary()}
        if best_state is not None:
            model.load_state_dict(best_state)
        test = self.evaluate("test")
        # A run with phases (e.g. SPION dense -> sparse) also tests each other phase's best checkpoint, with the
        # attention the method has at the end: the overall best may predate the switch (spion.md pitfall 12).
        self.phase_tests = {}
        for phase, (val, step_, state) in sorted(best_by_phase.items()):
            if state is not None and phase != best_phase:
                model.load_state_dict(state)
                self.phase_tests[phase] = {"step": step_, "dev": val, "test": self.evaluate("test")}
        measurements.update(self._throughput())
        return self._record(test, best_dev, best_step, best_phase if best_state is not None else None,
                            steps_run, measurements, time.perf_counter() - t_start)

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
            "steps_planned": cfg.train.steps,
            "eval_every": cfg.train.eval_every,
            "evals_run": len(self.history),
            "reduced": cfg.scale != "paper",
            "note": "; ".join(cfg.notes) if cfg.notes else ("" if cfg.scale == "paper" else f"{cfg.scale} scale"),
            "data_notes": list(getattr(task, "data_notes", ())),  # e.g. "generated, not the LRA release"
            "test_examples": int(test.get("n_examples", 0)),
        }
        return RunRecord(
            kind="run", task=cfg.task, method=cfg.method, scale=cfg.scale, seed=cfg.seed,
            config=cfg.to_dict(), config_hash=cfg.hash, metrics=metrics, higher_is_better=higher,
            measurements=measurements, budget=budget, method_info=info,
            env=envmod.environment(str(self.device)), git=envmod.git_state(), date=envmod.now_utc(),
            wall_time_s=wall, history=self.history,
        )


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not enabled)
