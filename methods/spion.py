"""SPION: dense training, then one block-sparse layout per layer from the attention map (spec spion.md).

Three registered variants share one implementation (they differ only in the pattern generator and the LR
schedule at the switch, spion.md §2.3-2.4):

- ``spion_cf``: 31x31 diagonal filter -> B x B average pooling -> greedy "flood fill" paths -> diagonal;
- ``spion_c``:  filter -> pooling -> top-k blocks (k = int(nb^2 * density - nb)) -> diagonal;
- ``spion_f``:  pooling -> flood fill -> diagonal (no filter); keeps the LR schedule running (no restart).

Phase A (dense): attention is plain softmax attention (SDPA). At check steps (every ``check_every`` steps,
by default the eval interval, as the original checks at its eval steps) each core also accumulates the
batch- and head-mean of the post-softmax map of the *current training batch* with
``kernels.attention_stats`` (never a (B, H, L, L) tensor), and the transition criterion of §2.2 runs.
Phase B (once): the layouts are built on the CPU in fp32 from those maps. Phase C (sparse): every layer runs
``block_sparse_attention`` with its fixed layout, shared by all heads, and SPION's ``phantom_zero`` softmax
by default. Layouts are non-persistent buffers: they stay out of the state_dict, so reloading the best
checkpoint at the end keeps the sparse layouts and the test runs sparse if the run transitioned (pitfall 12).
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bench import distributed as distmod
from bench.attention import masked_sdpa
from bench.blocks import block_size, lra_task_key
from bench.errors import BenchError
from bench.method import AttentionCore, AttentionSpec, Method, MethodContext
from bench.registry import register_method
from bench.stages import Train
from kernels import AttentionStatsAccumulator, block_sparse_attention, block_sparse_flops, layout_density, resolve_backend


# ---- configuration ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpionConfig:
    block_size: int = 64  # B: layout granularity (nb = L / B)
    quantile: float = 0.98  # q: flood-fill threshold = torch.quantile(pooled scores, q), per layer
    density: float = 0.04  # SPION-C: k = int(nb^2 * density - nb) top blocks, then the diagonal
    filter_size: int = 31  # F of the F x F identity filter (hard-coded 31 in the original)
    softmax_mode: str = "phantom_zero"  # phantom_zero (SPION's CUDA kernel, faithful) | renorm (standard)
    check_every: int = 0  # steps between transition checks; 0 = train.eval_every (the original's behaviour)
    tolerance_pct: int = 15  # transition when int(delta %) < this in every layer (hard-coded 15 originally)
    restart_schedule: bool | None = None  # restart the LR schedule at the switch; None = per variant (C/CF yes, F no)
    max_dense_steps: int = 0  # opt-in safeguard (not in the original): force the switch at the first check >= this
    avg_over_k_batches: int = 1  # documented deviation: average the maps over the k batches ending at a check
    attention_dropout: float = 0.0  # the original's CUDA kernels apply none (pitfall 8)
    attention_fp32: bool = False  # run attention in fp32 as the original (off: the suite's common precision policy)
    backend: str = "auto"  # kernels backend for statistics and block-sparse attention: auto | triton | torch
    note: str = ""  # filled by default_config when a value differs from the paper (e.g. tiny-scale block size)


# spion.md §4.1: the original's eval_frequency per LRA task, where its transition checks run
PAPER_EVAL_EVERY = {"listops": 500, "text": 200, "retrieval": 200, "image": 500, "pathfinder": 500}

# spion.md §4.1: (flood-fill quantile, SPION-C density) per LRA task; the block sizes of that table (64; Image and
# Pathfinder 32) and the tiny-scale rule are ``bench.blocks``', shared with the fixed patterns
PAPER_SETTINGS = {
    "listops": (0.98, 0.04),
    "text": (0.99, 0.03),
    "retrieval": (0.99, 0.021),
    "image": (0.96, 0.04),
    "pathfinder": (0.96, 0.05),
}


# ---- phase B: the pattern generator (spion.md §2.3), all fp32 ----------------------------------------------
def diagonal_filter(A: torch.Tensor, filter_size: int = 31) -> torch.Tensor:
    """conv2d(A, I_F, padding='same'): C[i, j] = sum_{|t| <= F//2} A[i+t, j+t], zeros outside. (L, L) -> (L, L).
    As the original (identity kernel, zero padding). TF32 is off so a GPU map is filtered in true fp32."""
    kernel = torch.eye(filter_size, dtype=torch.float32, device=A.device)[None, None]  # (1, 1, F, F)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        return F.conv2d(A.float()[None, None], kernel, padding="same")[0, 0]


def pool_blocks(C: torch.Tensor, block_size: int) -> torch.Tensor:
    """B x B average pooling: (L, L) -> (nb, nb) block means."""
    return F.avg_pool2d(C[None, None], block_size, block_size)[0, 0]


def block_threshold(pooled: torch.Tensor, q: float) -> torch.Tensor:
    """theta = torch.quantile over the nb^2 pooled scores (linear interpolation), one per layer."""
    return torch.quantile(pooled.flatten().float(), q)


def flood_fill(pooled, theta) -> np.ndarray:
    """SPION's greedy "flood fill" (iterative form of the original recursive routine), bool (nb, nb).

    From every top-row cell (0, k) and left-column cell (k, 0) one path walks right, down or diagonally
    toward the larger neighbour (strict comparisons; ties go diagonal, and right beats down when equal)
    until it reaches the zero padding row/column; cells it enters with a score > theta are kept. The start
    cell is not marked. The diagonal is forced afterwards. Not a region-growing fill (pitfall 1)."""
    P = np.asarray(pooled.detach().cpu().numpy() if torch.is_tensor(pooled) else pooled, dtype=np.float32)
    th = np.float32(theta.item() if torch.is_tensor(theta) else theta)
    nb = P.shape[0]
    T = np.zeros((nb + 1, nb + 1), dtype=np.float32)  # one zero row/column of padding, as the original
    T[:nb, :nb] = P
    keep = np.zeros((nb, nb), dtype=bool)
    starts = [(0, k) for k in range(nb)] + [(k, 0) for k in range(nb)]
    for x, y in starts:
        while x < nb and y < nb:
            down, right, diag = T[x + 1, y], T[x, y + 1], T[x + 1, y + 1]
            if down > right:
                nx, ny = (x + 1, y) if down > diag else (x + 1, y + 1)
            else:
                nx, ny = (x, y + 1) if right > diag else (x + 1, y + 1)
            if nx < nb and ny < nb and T[nx, ny] > th:
                keep[nx, ny] = True
            x, y = nx, ny
    np.fill_diagonal(keep, True)
    return keep


def topk_blocks(pooled: torch.Tensor, density: float) -> np.ndarray:
    """SPION-C: the top k = int(nb^2 * density - nb) pooled scores, then the diagonal; bool (nb, nb).
    k < 0 (tiny nb) would crash torch.topk in the original; we clamp to 0 (diagonal only)."""
    nb = pooled.shape[0]
    k = max(0, int(nb * nb * density - nb))
    keep = torch.zeros(nb * nb, dtype=torch.bool)
    if k:
        keep[torch.topk(pooled.flatten().cpu(), k).indices] = True
    keep = keep.view(nb, nb).numpy().copy()
    np.fill_diagonal(keep, True)
    return keep


def spion_layout(A: torch.Tensor, kind: str, block_size: int, quantile: float, density: float,
                 filter_size: int = 31) -> tuple[torch.Tensor, dict]:
    """One layer's layout from its (L, L) mean attention map: bool (nb, nb) on the CPU, and facts to log.
    kind: 'c' (filter + top-k), 'f' (flood fill), 'cf' (filter + flood fill)."""
    C = diagonal_filter(A, filter_size) if kind in ("c", "cf") else A.float()
    pooled = pool_blocks(C, block_size).cpu()  # (nb, nb) fp32 on the CPU: phase B is CPU fp32 (pitfall 17)
    if kind == "c":
        keep = topk_blocks(pooled, density)
        facts = {"topk": max(0, int(pooled.shape[0] ** 2 * density - pooled.shape[0]))}
    else:
        theta = block_threshold(pooled, quantile)
        keep = flood_fill(pooled, theta)
        facts = {"threshold": float(theta), "n_above_threshold": int((pooled > theta).sum())}
    return torch.from_numpy(keep), facts


# ---- phase A: the transition criterion (spion.md §2.2) -----------------------------------------------------
class TransitionCriterion:
    """The original's check, quirks included: check 1 sets R; check 2 sets d_prev and does NOT update R;
    check k >= 3 computes delta = 100 |d_cur - d_prev| / d_prev, sets d_prev = d_cur, and fires when
    int(delta) < tolerance in every layer, else sets R = current map in every layer."""

    def __init__(self, tolerance_pct: int = 15):
        self.tolerance = tolerance_pct
        self.n_checks = 0
        self.ref: list[torch.Tensor] | None = None
        self.d_prev: list[float] | None = None

    @staticmethod
    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.sqrt(torch.sum(torch.pow(a.float() - b.float(), 2))))  # Frobenius, fp32, as the original

    def update(self, maps: list[torch.Tensor]) -> tuple[bool, list[float] | None]:
        """Feed one check's per-layer maps; returns (transition now?, per-layer delta % or None)."""
        self.n_checks += 1
        if self.n_checks == 1:
            self.ref = [m.detach().clone() for m in maps]
            return False, None
        d_cur = [self.distance(r, m) for r, m in zip(self.ref, maps)]
        if self.n_checks == 2:
            self.d_prev = d_cur  # the reference map is deliberately left alone (the original's quirk)
            return False, None
        # d_prev == 0 only if the maps stopped changing at all; the original would crash (int(nan or inf))
        deltas = [100.0 * abs(c - p) / p if p > 0 else (0.0 if c == 0 else math.inf)
                  for c, p in zip(d_cur, self.d_prev)]
        self.d_prev = d_cur
        if all(math.isfinite(d) and int(d) < self.tolerance for d in deltas):
            return True, deltas
        self.ref = [m.detach().clone() for m in maps]
        return False, deltas


# ---- the attention core ------------------------------------------------------------------------------------
class SpionCore(AttentionCore):
    def __init__(self, spec: AttentionSpec, cfg: SpionConfig):
        super().__init__(spec)
        self.cfg = cfg
        self.L = spec.max_len  # the padded length: layouts and phantom counts are built for it
        self.nb = self.L // cfg.block_size
        # (1, nb, nb) bool once sparse; a non-persistent buffer: follows .to(device), stays out of state_dict
        self.register_buffer("layout", None, persistent=False)
        self._host: tuple = ()  # (weakref to self.layout, its _version, the same layout on the CPU)
        self.stats: AttentionStatsAccumulator | None = None
        self.capture = False  # take statistics from the next training forward (Retrieval: document 0 only)

    def arm(self) -> None:
        if self.stats is None:
            self.stats = AttentionStatsAccumulator(per_head=False, backend=self.cfg.backend)
        self.capture = True

    def take_map(self) -> torch.Tensor | None:
        """The accumulated (L, L) fp32 mean map (None if nothing was captured); resets the accumulator."""
        acc, self.stats, self.capture = self.stats, None, False
        return acc.mean() if acc is not None and acc.count else None

    def forward(self, q, k, v, key_padding_mask=None):  # (B, H, L, D) each; mask (B, L), True = real
        L = q.shape[2]
        if L != self.L:
            raise BenchError(f"spion: layer {self.spec.layer} was built for padded length {self.L} but got {L}; "
                             "inputs must be padded to model.max_len (a power of two, spion.md pitfall 11)")
        dtype = q.dtype
        if self.cfg.attention_fp32:  # the original runs attention in fp32 with autocast disabled
            q, k, v = q.float(), k.float(), v.float()
        ctx = torch.autocast(q.device.type, enabled=False) if self.cfg.attention_fp32 else contextlib.nullcontext()
        with ctx:
            out = self._attend(q, k, v, key_padding_mask)
        return out.to(dtype)

    def flops(self, q, k, key_padding_mask=None) -> float:  # dense until the switch, then whole kept blocks
        if self.layout is None:
            return super().flops(q, k, key_padding_mask)
        B, H, L, D = q.shape
        return float(block_sparse_flops(self.host_layout(), self.cfg.block_size, B, D, lq=L, lk=L, n_heads=H))

    def density(self) -> float:
        return 1.0 if self.layout is None else layout_density(self.host_layout())

    def host_layout(self) -> torch.Tensor:
        """``self.layout`` on the CPU, copied once per layout change (none at the switch: ``remember_host``)."""
        lay, c = self.layout, self._host
        if c and c[0]() is lay and c[1] == lay._version:
            return c[2]
        host = lay if lay.device == torch.device("cpu") else lay.cpu()
        self._host = (weakref.ref(lay), lay._version, host)
        return host

    def remember_host(self, host: torch.Tensor) -> None:
        """``self.layout`` was just made from the CPU tensor ``host`` (same content): keep it as the host copy."""
        self._host = (weakref.ref(self.layout), self.layout._version, host)

    def _attend(self, q, k, v, key_padding_mask):
        if self.layout is not None:  # phase C: fixed per-layer layout, broadcast over heads
            if self.layout.device != q.device:  # restored on the CPU by a resumed run
                host = self.layout
                self.layout = self.layout.to(q.device)
                self.remember_host(host)
            # The Triton path reads the layout's bytes on the host on every call to find its LUT: a CUDA layout
            # there is one device-to-host sync per layer per step (issue 15), a CPU copy none; the torch reference
            # computes with the layout on q's device.
            lay = self.host_layout() if resolve_backend(self.cfg.backend, q) == "triton" else self.layout
            return block_sparse_attention(q, k, v, lay, block_size=self.cfg.block_size,
                                          key_padding_mask=key_padding_mask, softmax_mode=self.cfg.softmax_mode,
                                          backend=self.cfg.backend)
        if self.training and self.capture:  # phase A check step: mean_{b,h} softmax, no dropout
            self.capture = False  # only the first call of the step (Retrieval: document 0, as the original)
            self.stats.update(q, k, key_padding_mask)
        p_drop = self.cfg.attention_dropout if self.training else 0.0
        return masked_sdpa(q, k, v, key_padding_mask, dropout_p=p_drop)  # the dense baseline's SDPA path


# ---- the method --------------------------------------------------------------------------------------------
class _Spion(Method):
    Config = SpionConfig
    family = "learned_pattern"
    suites = ("lra",)
    kind = "cf"  # c | f | cf

    def __init__(self, cfg: SpionConfig, task=None):
        super().__init__(cfg, task)
        if cfg.softmax_mode not in ("phantom_zero", "renorm"):
            raise BenchError(f"{self.name}: softmax_mode={cfg.softmax_mode!r}; valid: phantom_zero, renorm")
        self.criterion = TransitionCriterion(cfg.tolerance_pct)
        self.transition_step: int | None = None
        self.transition_check: int | None = None
        self.forced = False
        self.delta_trace: list[dict] = []
        self.layer_facts: list[dict] = []
        self.eval_phases: list[dict] = []  # (step, phase the dev eval actually ran in, main metric)
        self.check_every = cfg.check_every

    @classmethod
    def default_config(cls, ctx: MethodContext) -> SpionConfig:
        key = lra_task_key(ctx.task)
        q, density = PAPER_SETTINGS[key] if key else PAPER_SETTINGS["listops"]
        block, note = block_size(ctx)
        check_every = 0
        if ctx.scale == "tiny":  # a smoke test must reach the sparse phase: check 3 comes at step 3*check_every - 1
            check_every = 10
            note = "; ".join(n for n in (note, "tiny scale: transition checked every 10 steps (not at eval steps)") if n)
        return SpionConfig(block_size=block, quantile=q, density=density, note=note, check_every=check_every)

    @property
    def restart(self) -> bool:
        return self.cfg.restart_schedule if self.cfg.restart_schedule is not None else self.kind in ("c", "cf")

    def make_attention(self, spec: AttentionSpec) -> AttentionCore:
        L, B = spec.max_len, self.cfg.block_size
        if spec.causal or spec.kind == "cross":
            raise BenchError(f"{self.name}: SPION is defined for non-causal self-attention (LRA encoders) only")
        if L & (L - 1):
            raise BenchError(f"{self.name}: the padded sequence length must be a power of two (spion.md pitfall 11: "
                             f"2000 -> 2048, 4000 -> 4096), got model.max_len={L}; set model.max_len and "
                             f"data.max_len to {1 << (L - 1).bit_length()} (CLS pooling adds a token: use mean pooling)")
        if L % B or L // B < 2:
            raise BenchError(f"{self.name}: block_size={B} must divide the padded length {L} into >= 2 blocks")
        return SpionCore(spec, self.cfg)

    # ---- hooks -------------------------------------------------------------------------------------------
    def stages(self, trainer) -> list:
        """Dense until the transition criterion fires (the dense stage then ends early), sparse for the rest of the
        budget on the same optimizer; C/CF start a fresh OneCycle of the full length at the switch (see _transition)."""
        return [Train("dense"),
                Train("sparse", steps="rest", optimizer="continue",
                      lr_schedule="new" if self.restart else "continue", schedule_steps=trainer.cfg.train.steps)]

    def on_train_start(self, trainer) -> None:
        self.check_every = self.cfg.check_every or trainer.cfg.train.eval_every
        if self.cfg.note:
            trainer.note("spion config note", note=self.cfg.note)

    def _is_check_step(self, step: int) -> bool:
        return (step + 1) % self.check_every == 0

    @staticmethod
    def _is_eval_step(trainer, step: int) -> bool:
        tc = trainer.cfg.train
        return (step + 1) % tc.eval_every == 0 or step == tc.steps - 1

    def before_step(self, trainer, step: int) -> None:
        if self.transition_step is not None:
            return
        k = min(max(1, self.cfg.avg_over_k_batches), self.check_every)
        next_check = (step // self.check_every + 1) * self.check_every - 1
        if next_check - step < k:
            for core in self.cores:
                core.arm()

    def after_step(self, trainer, step: int) -> None:
        # the original checks after validation; when the check step is no eval step, check right away
        if self.transition_step is None and self._is_check_step(step) and not self._is_eval_step(trainer, step):
            self._check(trainer, step)

    def on_eval(self, trainer, step: int, dev_metrics: dict) -> None:
        main = getattr(self.task or trainer.task, "MAIN_METRIC", "")
        self.eval_phases.append({"step": step + 1, "phase": "sparse" if self.transition_step is not None else "dense",
                                 "dev": dev_metrics.get(main)})
        if self.transition_step is None and self._is_check_step(step):
            self._check(trainer, step)

    def _take_maps(self, trainer) -> list[torch.Tensor | None]:
        """Each layer's mean map over the sequences captured since the last check (resets the accumulators).

        Under torchrun each rank captured only its share of every batch: the sums and sequence counts of all ranks
        are added first (one all-reduce), so every rank gets the map of the whole global batch -- the single-process
        map -- and the criterion fires at the same step with the same layouts on every rank (a rank switching alone
        would leave DDP waiting on the others)."""
        if distmod.info() is None:
            return [core.take_map() for core in self.cores]
        sums, counts = [], []
        for core in self.cores:
            acc, core.stats, core.capture = core.stats, None, False
            n = acc.count if acc is not None else 0
            sums.append(acc.sum.reshape(-1).float() if n else torch.zeros(core.L * core.L, device=trainer.device))
            counts.append(float(n))
        flat = distmod.sum_over_ranks(torch.cat([s.to(trainer.device) for s in sums]
                                                + [torch.tensor(counts, device=trainer.device)]))
        total = flat[-len(self.cores):].tolist()
        return [flat[i * c.L * c.L:(i + 1) * c.L * c.L].view(c.L, c.L) / n if n else None
                for i, (c, n) in enumerate(zip(self.cores, total))]

    def _check(self, trainer, step: int) -> None:
        maps = self._take_maps(trainer)
        if any(m is None for m in maps):  # no training forward captured statistics (should not happen)
            trainer.note("spion check skipped: no attention statistics captured")
            return
        fire, deltas = self.criterion.update(maps)
        n = self.criterion.n_checks
        if deltas is not None:
            self.delta_trace.append({"step": step, "check": n, "delta_pct": [round(d, 4) for d in deltas]})
            trainer.note("spion check", check=n, delta_pct=[round(d, 2) for d in deltas])
        forced = not fire and self.cfg.max_dense_steps > 0 and step + 1 >= self.cfg.max_dense_steps
        if forced:
            trainer.note("spion max_dense_steps safeguard fired (not in the original)",
                         max_dense_steps=self.cfg.max_dense_steps)
        if fire or forced:
            self._transition(trainer, step, maps, forced)

    def _transition(self, trainer, step: int, maps: list[torch.Tensor], forced: bool) -> None:
        cfg = self.cfg
        for core, A in zip(self.cores, maps):
            lay, facts = spion_layout(A, self.kind, cfg.block_size, cfg.quantile, cfg.density, cfg.filter_size)
            core.layout = lay[None].to(A.device)  # (1, nb, nb): one layout per layer, shared by all heads
            core.remember_host(lay[None])  # the kernel's copy on the host: no device-to-host read at any step
            self.layer_facts.append({"layer": core.spec.layer, "density": layout_density(lay[None]), **facts})
        self.transition_step, self.transition_check, self.forced = step, self.criterion.n_checks, forced
        trainer.note("spion transition", transition_step=step, check=self.criterion.n_checks, forced=forced,
                     density_per_layer=[round(f["density"], 4) for f in self.layer_facts])
        if self.restart:
            # the original keeps its OneCycle(total = all steps) and restarts its index at 0 (warm-up
            # included), so the anneal never finishes: the sparse stage's fresh schedule of the full length does that
            trainer.note("spion LR schedule restarted", total_steps=trainer.cfg.train.steps)
        trainer.end_stage()  # the eval at the transition step ran dense and is labelled so; sparse starts next step

    def state_dict(self) -> dict:
        return {"layouts": [None if c.layout is None else c.layout.cpu() for c in self.cores],
                "transition": (self.transition_step, self.transition_check, self.forced),
                "delta_trace": self.delta_trace, "layer_facts": self.layer_facts, "eval_phases": self.eval_phases,
                "n_checks": self.criterion.n_checks}

    def load_state_dict(self, state: dict) -> None:
        for core, lay in zip(self.cores, state["layouts"]):
            core.layout = lay
        self.transition_step, self.transition_check, self.forced = state["transition"]
        self.delta_trace, self.layer_facts, self.eval_phases = state["delta_trace"], state["layer_facts"], state["eval_phases"]
        self.criterion.n_checks = state["n_checks"]

    # ---- record ------------------------------------------------------------------------------------------
    def info(self) -> dict:
        layouts = [c.layout for c in self.cores if c.layout is not None]
        nb = self.cores[0].nb if self.cores else None
        out = {
            "spion_variant": self.name, "softmax_mode": self.cfg.softmax_mode, "block_size": self.cfg.block_size,
            "nb": nb, "check_every": self.check_every, "lr_restart": self.restart,
            "transition_step": self.transition_step, "transition_check": self.transition_check,
            "n_checks": self.criterion.n_checks, "forced_transition": self.forced, "delta_trace": self.delta_trace,
            "density_per_layer": [layout_density(l) for l in layouts],
            "layer_facts": self.layer_facts,
            "tested_with": "sparse" if self.transition_step is not None else "dense",
            "eval_phases": self.eval_phases,
        }
        best = _best_eval(self.eval_phases, self.task)  # the Trainer's pick and the phase its dev eval ran in
        if best is not None:
            out["best_checkpoint_eval_phase"] = best["phase"]
        if layouts and nb is not None and nb <= 64:
            out["layouts"] = [l[0].to(torch.uint8).cpu().tolist() for l in layouts]
        if self.cfg.note:
            out["note"] = self.cfg.note
        return out

    # ---- report ------------------------------------------------------------------------------------------
    @classmethod
    def report_section(cls, runs, ctx) -> tuple[list[str], list]:
        """The SPION section of a suite's report (one for spion_c, spion_f and spion_cf: ``ctx.methods``)."""
        return _report_section(runs, ctx)


def _best_eval(evals: list[dict], task) -> dict | None:
    """The eval the Trainer keeps as best (first strict improvement), to report which phase it ran in."""
    main = getattr(task, "MAIN_METRIC", "")
    higher = getattr(task, "METRICS", {}).get(main, True)
    from bench.train import is_better

    best = None
    for e in evals:
        if is_better(e["dev"], None if best is None else best["dev"], higher):
            best = e
    return best


# ---- report section (``Method.report_section``): imports bench.report (pandas, matplotlib) only when called --------
_SECTION_INTRO = (
    "Per run: the transition step (0-based step after which the dense phase ends; the original has no "
    "fallback, so a run whose criterion never fired stays dense), the number of transition checks, the "
    "achieved per-layer block density, and the median train step time of each phase "
    "(`train_step_ms_median_by_phase`). The sparse-phase time is compared with the fastest dense method "
    "and the fastest fixed-pattern method (sparse family, not SPION) of the task; the fixed pattern's mean "
    "density is given next to the ratio (the densities differ), and with the fixed pattern whose mean density "
    "is nearest to the run's (run fixed patterns with `density=` to make that an equal-density comparison, "
    "e.g. `--methods local:density=0.05`). A training step mixes attention with everything else; for "
    "attention alone at each run's shape, time its layouts next to equal-density patterns with "
    "`run_all.py --suite kernels sweep.record_layouts=<record.json>` (kernels report).\n")


def _nearest_density(fixed: dict[str, tuple[float, float]], density: list) -> tuple[str | None, float, float]:
    """The fixed pattern (label -> (mean ms, mean density)) whose mean density is closest to ``density``'s mean."""
    from bench import report as R

    cand = {k: v for k, v in fixed.items() if not R.is_missing(v[1]) and not R.is_missing(v[0])}
    if not density or not cand:
        return None, math.nan, math.nan
    target = float(np.mean(density))
    label = min(sorted(cand), key=lambda k: abs(cand[k][1] - target))
    return label, *cand[label]


def _report_row(r, dense_ms: float, fixed_ms: float, fixed_d: float, fixed_all: dict) -> dict:
    """One SPION run's row: transition, densities, per-phase times vs the fastest dense and fixed patterns."""
    from bench import report as R

    info, sparse_ms = r.info, r.by_phase.get("sparse")
    ts = info.get("transition_step")
    if ts is None:
        trans = "no transition" + (f" in {r.steps_run} steps" if r.steps_run is not None else "")
    else:
        trans = str(ts) + (f" (check {info['transition_check']})" if info.get("transition_check") is not None else "")
        trans += " forced (not in the original)" if info.get("forced_transition") else ""
        if r.steps_run is not None and ts >= r.steps_run - 1:
            trans += " = last step: no sparse training"
    phase = R.best_ckpt_phase(info)
    best = R.NA if phase is None else f"{phase} @ {(info.get('best_checkpoint') or {}).get('step', '?')}"
    if R.ckpt_phase_differs(info):
        best += f" {R.DENSE_CKPT}"
    dens = info.get("density_per_layer") or []
    near_lab, near_ms, near_d = _nearest_density(fixed_all, dens)
    return {
        "method": r.label, "seed": str(r.seed), "variant": info.get("spion_variant", R.NA),
        "softmax": info.get("softmax_mode", R.NA), "transition step": trans, "checks": str(info.get("n_checks", R.NA)),
        "density per layer": ", ".join(f"{v:.3g}" for v in dens) or R.NA,
        "dense-phase ms": R.fmt_num(r.by_phase.get("dense")),
        "sparse-phase ms": R.fmt_num(sparse_ms, R.NA if ts is None else "none timed"),
        "sparse-phase peak MiB": R.fmt_num((r.mem_by_phase or {}).get("sparse"), R.NA),
        "sparse / fastest dense": R.fmt_ratio_or_na(None if sparse_ms is None else sparse_ms / dense_ms),
        "sparse / fastest fixed (its density)": R.NA if sparse_ms is None or R.is_missing(fixed_ms) else
        f"{R.fmt_ratio(sparse_ms / fixed_ms)} (d={R.fmt_num(fixed_d, R.NA)})",
        "sparse / nearest-density fixed": R.NA if sparse_ms is None or near_lab is None else
        f"{R.fmt_ratio(sparse_ms / near_ms)} ({near_lab}, d={R.fmt_num(near_d)})",
        "best ckpt (phase @ step)": best,
        "test attention": info.get("tested_with", R.NA) + (f" {R.NEVER_SPARSE}" if R.never_switched(info) else ""),
        # the Trainer also tests every other phase's best checkpoint (pitfall 12): "main metric, phase ckpt"
        "test with other phase's best": ", ".join(
            f"{R.fmt_num(v)} ({k.rsplit('_best_', 1)[1]})" for k, v in sorted(r.metrics.items())
            if k.startswith(f"{r.main_metric}_best_")) or R.NA,
    }


def _report_section(s, ctx) -> tuple[list[str], list]:
    """SPION runs of one scale (``s``: every method's runs; ours are ``ctx.methods``): transition, densities,
    per-phase step time vs the fastest dense and fixed-pattern methods, layouts (ours and the fixed patterns')."""
    import pandas as pd

    from bench import report as R

    mine = s.method.isin(ctx.methods)
    if not mine.any():
        return [], []
    ctx.add_note(R.NOTE_CKPT_PHASE, " (the original code's behaviour; spion.md pitfall 12): see the SPION section for "
                                    "each phase's best checkpoint tested")
    ctx.add_note(R.NOTE_PHASED, "; per-phase numbers are in the SPION section")
    md = ["### SPION\n", _SECTION_INTRO]
    precision = _precision_sentence(s[mine])
    md += [precision] if precision else []
    written, ckpt_note, never_note = [], False, False
    for task, t in s[s.task.isin(s[mine].task)].groupby("task", sort=True):
        ours, fixed = t.method.isin(ctx.methods), t.family.eq("fixed_pattern")
        dense_lab, dense_ms = R.fastest(t, t.dense, hardware_of=ours)
        fixed_lab, fixed_ms = R.fastest(t, fixed, hardware_of=ours)
        fixed_d = R.mean_density(t[t.label == fixed_lab].density) if fixed_lab else math.nan
        md.append(f"#### {task}\n")
        checks = _check_interval_sentence(t[ours], task)
        md += [checks] if checks else []
        md.append(f"Fastest dense: {f'**{dense_lab}** ({R.fmt_num(dense_ms)} ms/step)' if dense_lab else 'none measured'}; "
                  f"fastest fixed pattern: " + (f"**{fixed_lab}** ({R.fmt_num(fixed_ms)} ms/step, mean density "
                                                f"{R.fmt_num(fixed_d, R.NA)})" if fixed_lab else "none measured") + ".\n")
        fixed_all = {lab: (float(g.step_ms.mean()), R.mean_density(g.density))
                     for lab, g in t[fixed].groupby("label", sort=True)}
        rows = [_report_row(r, dense_ms, fixed_ms, fixed_d, fixed_all) for r in t[ours].itertuples()]
        ckpt_note |= any(R.DENSE_CKPT in r["best ckpt (phase @ step)"] for r in rows)
        never_note |= any(R.NEVER_SPARSE in r["test attention"] for r in rows)
        md.append(R.md_table(pd.DataFrame(rows)))
        figs = []
        for r in t[ours].itertuples():
            if r.info.get("layouts"):
                title = f"{task} / {r.label} (seed {r.seed}): layout per layer"
                figs += ctx.save(R.layout_figure(r.info["layouts"], title), task, r.label, f"s{r.seed}", "layouts")
        for label, g in t[fixed].groupby("label", sort=True):
            r = next(g.itertuples())
            if r.info.get("layout_layer0"):
                figs += ctx.save(R.layout_figure([r.info["layout_layer0"]], f"{task} / {label} (seed {r.seed}): layer 0"),
                                 task, label, f"s{r.seed}", "layout0")
        written += figs
        md.append(R.figure_links(figs))
    if ckpt_note:
        md.append(f"{R.DENSE_CKPT} The best dev checkpoint is from the dense phase (before the transition): the "
                  "reported test metric uses those dense-phase weights with the attention in `test attention`.\n")
    if never_note:
        md.append(f"{R.NEVER_SPARSE} The run never switched to sparse attention: its test metric is the dense "
                  "phase's (dense weights, dense attention).\n")
    return md, written


def _amp_of(config: dict) -> str | None:
    """The autocast dtype a record's run used (``train.amp``; ``auto`` = bf16 on CUDA, off on CPU), or None."""
    amp = (config.get("train") or {}).get("amp")
    if amp is None:
        return None
    if amp == "auto":
        return "bf16" if str(config.get("device", "")).startswith("cuda") else "off"
    return amp


def _precision_sentence(runs) -> str:
    """What precision SPION's attention ran in, from the records' configs (``train.amp``, ``device``,
    ``method_cfg.attention_fp32``), next to the original's fp32 attention (spion.md §2.4); "" if they do not say."""
    kinds: dict[str, int] = {}
    for cfg in runs.config:
        amp, fp32 = _amp_of(cfg or {}), ((cfg or {}).get("method_cfg") or {}).get("attention_fp32")
        if amp is None or fp32 is None:
            continue
        key = "fp32 (attention_fp32)" if fp32 else "fp32 (no autocast)" if amp == "off" else amp
        kinds[key] = kinds.get(key, 0) + 1
    if not kinds:
        return ""
    n = sum(kinds.values())
    parts = []
    for key, k in sorted(kinds.items()):
        if key in ("bf16", "fp16"):
            parts.append(f"in {key} under autocast (`attention_fp32=False`, the suite's common precision policy) in "
                         f"{k} of {n} runs, where the original runs attention in fp32 with autocast disabled "
                         "(spion.md §2.4; `method.attention_fp32=true` does that)")
        elif key == "fp32 (attention_fp32)":
            parts.append(f"in fp32 with autocast disabled, as the original (`attention_fp32=True`), in {k} of {n} runs")
        else:
            parts.append(f"in fp32 (no autocast: `train.amp` off or a CPU run) in {k} of {n} runs")
    return "Precision: SPION's attention ran " + "; ".join(parts) + ".\n"


def _check_interval_sentence(runs, task: str) -> str:
    """How often the transition was checked in these runs (``method_cfg.check_every``, 0 = ``train.eval_every``,
    read from the records' configs) next to the original's interval (its eval_frequency, spion.md §4.1)."""
    seen = []
    for cfg in runs.config:
        cfg = cfg or {}
        every = (cfg.get("train") or {}).get("eval_every")
        own = ((cfg.get("method_cfg") or {}).get("check_every")) or 0
        if every is None:
            continue
        item = (own or every, every, bool(own))
        seen += [item] if item not in seen else []
    if not seen:
        return ""
    paper = PAPER_EVAL_EVERY.get(lra_task_key(task) or "")
    said = []
    for check, every, own in sorted(seen):
        said.append(f"every {check} steps (`method.check_every`; the eval interval `train.eval_every` is {every})"
                    if own else f"every {check} steps, at each eval (`train.eval_every` = {every})")
    ref = (f"; the paper checks at its eval steps, every {paper} steps for this task (500 for ListOps, Image and "
           "Pathfinder, 200 for Text and Retrieval)" if paper else "")
    return f"Transition checked {' / '.join(said)}{ref}.\n"


@register_method("spion_cf")
class SpionCF(_Spion):
    kind = "cf"


@register_method("spion_c")
class SpionC(_Spion):
    kind = "c"


@register_method("spion_f")
class SpionF(_Spion):
    kind = "f"
