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
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import BenchError
from bench.method import AttentionCore, AttentionSpec, Method
from bench.registry import register_method
from kernels import AttentionStatsAccumulator, block_sparse_attention, layout_density
from methods.dense import masked_sdpa


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


# spion.md §4.1: (block size, flood-fill quantile, SPION-C density) per LRA task
PAPER_SETTINGS = {
    "listops": (64, 0.98, 0.04),
    "text": (64, 0.99, 0.03),
    "retrieval": (64, 0.99, 0.021),
    "image": (32, 0.96, 0.04),
    "pathfinder": (32, 0.96, 0.05),
}
TINY_BLOCK = 16  # smallest block the kernels support; gives nb >= 4 at the tiny presets' lengths (128-256)


def _task_key(task_name: str) -> str | None:
    name = task_name.lower().removeprefix("lra_").removeprefix("lra-")
    return next((k for k in PAPER_SETTINGS if name.startswith(k)), None)


def _preset_max_len(task_name: str, scale: str) -> int | None:
    try:
        from bench import registry

        return int(registry.get_task(task_name).presets(scale)[0].max_len)
    except Exception:  # task not registered (yet): the caller falls back to a safe value
        return None


def lra_block_size(task_name: str, scale: str) -> tuple[int, str]:
    """SPION's block size for a task at a scale, and a note when it differs from the paper's."""
    key = _task_key(task_name)
    block = PAPER_SETTINGS[key][0] if key else 64
    if scale != "tiny":
        return block, "" if key else f"{task_name}: not an LRA task of spion.md §4.1; block size {block}"
    L = _preset_max_len(task_name, scale)
    if L is not None and L // block >= 4:
        return block, ""
    return TINY_BLOCK, (f"tiny scale: block_size {block} -> {TINY_BLOCK} so that nb = L / B >= 4 "
                        f"(L = {L if L is not None else 'unknown'})")


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

    def _attend(self, q, k, v, key_padding_mask):
        if self.layout is not None:  # phase C: fixed per-layer layout, broadcast over heads
            return block_sparse_attention(q, k, v, self.layout, block_size=self.cfg.block_size,
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
    family = "sparse"
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
        self._pending_phase: str | None = None
        self.check_every = cfg.check_every

    @classmethod
    def default_config(cls, task_name: str, scale: str) -> SpionConfig:
        key = _task_key(task_name)
        _, q, density = PAPER_SETTINGS[key] if key else PAPER_SETTINGS["listops"]
        block, note = lra_block_size(task_name, scale)
        check_every = 0
        if scale == "tiny":  # a smoke test must reach the sparse phase: check 3 comes at step 3*check_every - 1
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
    def on_train_start(self, trainer) -> None:
        trainer.phase = "dense"
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
        if self._pending_phase:  # flipped here so the eval at the transition step is labelled dense (it was)
            trainer.phase, self._pending_phase = self._pending_phase, None
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

    def _check(self, trainer, step: int) -> None:
        maps = [core.take_map() for core in self.cores]
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
            self.layer_facts.append({"layer": core.spec.layer, "density": layout_density(lay[None]), **facts})
        self.transition_step, self.transition_check, self.forced = step, self.criterion.n_checks, forced
        trainer.note("spion transition", transition_step=step, check=self.criterion.n_checks, forced=forced,
                     density_per_layer=[round(f["density"], 4) for f in self.layer_facts])
        if self.restart:
            # the original keeps its OneCycle(total = all steps) and restarts its index at 0 (warm-up
            # included), so the anneal never finishes: a fresh schedule of the full length reproduces that
            trainer.restart_schedule(trainer.cfg.train.steps)
            trainer.note("spion LR schedule restarted", total_steps=trainer.cfg.train.steps)
        self._pending_phase = "sparse"

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


@register_method("spion_cf")
class SpionCF(_Spion):
    kind = "cf"


@register_method("spion_c")
class SpionC(_Spion):
    kind = "c"


@register_method("spion_f")
class SpionF(_Spion):
    kind = "f"
