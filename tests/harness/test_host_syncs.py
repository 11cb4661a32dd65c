"""Issue 15: no host synchronisation inside an LRA training step. On CPU, ``bench.host_sync`` counts the calls that
would sync on CUDA (device-to-host reads, data-dependent shapes, blocking host<->device copies) inside the
Trainer's step (forward, loss, backward, clip, optimizer, scheduler, the method's hooks; not the batch fetch, not
the eval), for each LRA method on tiny generated ListOps, after one warm-up step of the phase.

The sparse methods run twice: ``backend=triton`` (the path a GPU runs; Triton's CPU interpreter, slow, so marked
``slow``) and their CPU default (the torch reference). Before issue 15's fixes (docs/perf.md): ``dense`` 1 sync per
step (``has_padding``'s ``bool(mask.all())``), every block-sparse method on the Triton path 2 (one per layer: the
LUT lookup read a layout kept on the device).
"""
from __future__ import annotations

import pytest
import torch

from bench.attention import has_padding
from bench.cli import build_run_config, parse_method_spec
from bench.host_sync import STAND_IN, HostSyncCounter, StopTraining, watch_trainer_steps
from bench.method import AttentionSpec
from bench.registry import get_method, get_task
from bench.task import Task
from bench.train import Trainer
from kernels import block_sparse_attention, local_layout

# Syncs a method may keep, with the reason: {method spec: {"<kind> <op> <site substring>": "one-line reason"}}.
# Empty: every LRA method's step is sync-free on the host side (what ATen does inside CUDA kernels is not seen
# here: measure that on a GPU with torch.cuda.set_sync_debug_mode, bench.host_sync.watch_trainer_steps(cuda_debug=)).
ALLOWED: dict[str, dict[str, str]] = {}

SPION_SPARSE = "check_every=1,max_dense_steps=1"  # forced switch after step 0: steps 1.. run sparse

# (method spec, phase counted); the block-sparse methods once on their CPU default (torch reference) and once on
# the Triton path (what CUDA runs)
QUICK = [("eager", None), ("dense", None), ("local", None), ("strided", None), ("bigbird", None),
         ("longformer", None), (f"spion_cf:{SPION_SPARSE}", "sparse")]
TRITON = [("local:backend=triton", None), ("strided:backend=triton", None), ("bigbird:backend=triton", None),
          ("longformer:backend=triton", None), (f"spion_cf:backend=triton,{SPION_SPARSE}", "sparse")]

# tiny ListOps, shrunk further: the counts are per call site (per layer), not per token
OVERRIDES = ["train.steps=40", "train.eval_every=1000", "train.batch_size=1", "model.max_len=64", "data.max_len=64",
             "data.min_length=20", "data.max_length=60", "data.n_train=32", "data.n_dev=8", "data.n_test=8"]
STEPS = 3


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSEBENCH_CACHE", str(tmp_path_factory.mktemp("listops")))
        mp.setenv("SPARSEBENCH_ARTIFACTS", str(tmp_path_factory.mktemp("artifacts")))
        yield


def count_step_syncs(spec: str, phase: str | None, steps: int = STEPS,
                     extra: tuple = ()) -> tuple[HostSyncCounter, list[str]]:
    """Run the method on tiny ListOps with the Trainer on the stand-in device; count ``steps`` steps of ``phase``
    after one warm-up step of it."""
    ms = parse_method_spec(spec)
    cfg = build_run_config("lra_listops", ms, "tiny", 0, "cpu", [*OVERRIDES, *extra])
    task = get_task("lra_listops")(cfg, None)
    cls = get_method(ms.name)
    reason = cls.unavailable_reason(torch.device("cpu"))
    if reason:
        pytest.skip(f"{ms.name}: {reason}")
    trainer = Trainer(cfg, task, cls(cfg.method_cfg, task), STAND_IN, progress=False, log=lambda s: None)
    counter = HostSyncCounter()
    state = watch_trainer_steps(trainer, counter, phase=phase, skip=1, steps=steps)
    with counter:
        with pytest.raises(StopTraining):
            trainer.run()
    assert len(state["labels"]) == steps, f"{spec}: counted {state['labels']}, expected {steps} steps of {phase}"
    assert counter.backward_traced
    return counter, state["labels"]


def _check(spec, phase, extra=()):
    counter, labels = count_step_syncs(spec, phase, extra=extra)
    per_step = [counter.per_label().get(label, 0) for label in labels]
    allowed = ALLOWED.get(spec, {})
    left = [e for e in counter.events if not any(all(w in f"{e.kind} {e.op} {e.site}" for w in key.split())
                                                 for key in allowed)]
    print(f"\n{spec} ({phase or 'first phase'}): host syncs per step {per_step}\n{counter.report()}")
    assert not left, f"{spec}: would-be host syncs per step {per_step}:\n{counter.report()}"


@pytest.mark.parametrize("spec, phase", QUICK, ids=[s for s, _ in QUICK])
def test_no_host_sync_in_a_training_step(cache, spec, phase):
    _check(spec, phase)


@pytest.mark.slow
@pytest.mark.parametrize("spec, phase", TRITON, ids=[s for s, _ in TRITON])
def test_no_host_sync_in_a_training_step_triton_path(cache, spec, phase):
    _check(spec, phase)


def test_cls_pooling_keeps_the_host_known_padding(cache):
    """The CLS token makes a new mask inside the model; it hides a key exactly when the batch's does."""
    _check("dense", None, extra=("model.pooling=cls",))


def test_flex_is_skipped_on_cpu():
    reason = get_method("flex").unavailable_reason(torch.device("cpu"))
    assert reason and "CPU" in reason  # FlexAttention has no CPU backward: counted on a GPU only


# ---- the counter sees what it should (so that the zeros above mean something) ------------------------------
def test_counter_sees_reads_shapes_and_copies_of_device_tensors_only():
    c = HostSyncCounter()
    with c:
        x = torch.ones(4, device=STAND_IN)  # a device tensor: made on the stand-in device
        h = torch.arange(4)  # a host tensor
        assert x.device == STAND_IN and h.device == torch.device("cpu")
        with c.counting("r"):
            bool(x.any()), float(x.sum()), x.tolist(), x.cpu(), torch.nonzero(x), x[x > 0], torch.unique(x)
            torch.tensor([1, 2], device=x.device), h.to(x.device), x.to(torch.float64), x.to("cpu", non_blocking=True)
            bool(h.any()), float(h.sum()), h.tolist(), torch.nonzero(h), h.to(torch.float64)
            (x * 2).sum().item()  # computed from a device tensor
    kinds = sorted(e.kind for e in c.events)
    assert kinds == sorted(["read"] * 4 + ["d2h"] + ["shape"] * 3 + ["h2d"] * 2), c.report()
    assert all("test_host_syncs.py:" in e.site for e in c.events), c.report()  # the call site, not torch's


def test_counter_sees_inside_custom_backward():
    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            ctx.save_for_backward(a)
            return a * 2

        @staticmethod
        def backward(ctx, g):
            (a,) = ctx.saved_tensors
            if a.any():  # a sync in a backward function
                pass
            return g * 2

    c = HostSyncCounter()
    with c:
        p = torch.nn.Parameter(torch.randn(3))
        c.mark_device(p)
        with c.counting("step"):
            Twice.apply(p).sum().backward()
    assert [(e.kind, e.op) for e in c.events] == [("read", "Tensor.__bool__")], c.report()


def test_has_padding_reads_the_host_for_batch_masks_only():
    c = HostSyncCounter()
    with c:
        kpm = torch.ones(2, 8, dtype=torch.bool)
        kpm[1, 6:] = False
        batch = Task.to_device(None, {"mask": kpm, "tokens": torch.zeros(2, 8)}, STAND_IN)
        fresh = torch.ones(2, 8, dtype=torch.bool, device=STAND_IN)
        with c.counting("batch mask"):
            assert has_padding(batch["mask"]) and has_padding(batch["mask"])
        with c.counting("device-made mask"):
            assert not has_padding(fresh)  # nothing known on the host: one device read (then cached per batch)
            assert not has_padding(fresh)
        batch["mask"][0, 0] = False  # edited on the device: the host's answer is stale, ask the device
        with c.counting("edited"):
            assert has_padding(batch["mask"])
    assert c.per_label() == {"device-made mask": 1, "edited": 1}, c.report()


def _qkv(L=32, B=1, H=2, D=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, L, D, generator=g, device=STAND_IN).requires_grad_() for _ in range(3)]


def test_triton_path_reads_a_device_layout_but_not_a_host_one():
    """The LUT lookup reads the layout's bytes on the host: a device layout is a sync per call, a host one none."""
    c = HostSyncCounter()
    with c:
        q, k, v = _qkv()
        host = local_layout(2, 0)
        dev = host.to(STAND_IN)
        block_sparse_attention(q, k, v, host, block_size=16, backend="triton")  # builds the LUT (warm-up)
        with c.counting("device layout"):
            block_sparse_attention(q, k, v, dev, block_size=16, backend="triton")
        with c.counting("host layout"):
            block_sparse_attention(q, k, v, host, block_size=16, backend="triton").sum().backward()
    assert c.per_label() == {"device layout": 1}, c.report()


@pytest.mark.parametrize("name", ["local", "spion_cf"])
def test_sparse_cores_hand_the_triton_path_a_host_layout(name):
    cls = get_method(name)
    extra = {} if name == "local" else {"softmax_mode": "renorm"}
    method = cls(cls.Config(block_size=16, backend="triton", **extra))
    core = method.attention(AttentionSpec(layer=0, n_heads=2, head_dim=16, max_len=32))
    c = HostSyncCounter()
    with c:
        core.to(STAND_IN)
        if name == "spion_cf":  # as _transition sets it: the layout on the device, its CPU copy remembered
            lay = torch.eye(2, dtype=torch.bool)[None]
            core.layout = lay.to(STAND_IN)
            core.remember_host(lay)
        q, k, v = _qkv()
        core(q, k, v)  # warm-up: layouts and LUTs built
        with c.counting("step"):
            core(q, k, v).sum().backward()
        if name == "spion_cf":
            core.layout = core.layout.clone()  # a new layout tensor: one read to make its host copy, then none
            with c.counting("new layout"):
                core(q, k, v)
                core(q, k, v)
    assert c.per_label() == ({} if name == "local" else {"new layout": 1}), c.report()
