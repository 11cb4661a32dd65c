"""Seeded randomized kernel arguments (issue 10, "done when"): every call of ``block_sparse_attention`` either
matches the independent fp64 dense oracle of test_block_sparse_attention.py, or raises the kernel's one-line
``KernelArgumentError`` naming an argument; never another exception, never an odd result. Whether a case is valid
is decided here, from the documented contract, not by asking the kernel."""
import math
import random

import pytest
import torch

from kernels.errors import KernelArgumentError
from kernels.block_sparse_attention import block_sparse_attention
from test_block_sparse_attention import dense_attention

NAN = float("nan")
# per argument: (valid values, invalid values); the validity of a case is decided here, from the contract
POOLS = {
    "block_size": ([16, 32, 64], [16.0, True, 48, 0, -16, "16", None, 8]),
    "causal": ([False, True], ["False", 1, 0, None, "yes"]),
    "softmax_mode": (["renorm", "renorm", "phantom_zero"], ["softmax", None, "RENORM"]),
    "sm_scale": ([None, 0.25, 2, 0.0, -0.5], [NAN, math.inf, "0.1", True]),
    "backend": (["torch", "auto"], ["cuda", None, "TORCH"]),
    "empty_rows": (["zero"], ["uniform_fallback", None]),
    "dtype": ([torch.float32, torch.float64], [torch.int32]),
    "B": ([1, 2], [0]),
    "D": ([16, 32], [24]),
    "layout": (["ok", "ok_shared", "empty"], ["wrong_nb", "float", "list", "heads3"]),
    "key_padding_mask": (["none", "ok"], ["wrong_shape", "float"]),
}
NAMES = ("q", "k, v", "q, k", "layout", "block_size", "causal", "softmax_mode", "empty_rows", "sm_scale",
         "backend", "key_padding_mask")


def _case(seed):
    rnd = random.Random(seed)
    bad = set(rnd.sample(sorted(POOLS), rnd.choice([0, 0, 1, 1, 1, 2, 3])))  # which arguments get a bad value
    a = {name: rnd.choice(pools[name in bad]) for name, pools in POOLS.items()}
    valid = not bad
    valid &= not (a["softmax_mode"] == "phantom_zero" and a["causal"] is True)  # SPION's mode is non-causal
    valid &= not (a["dtype"] == torch.float64 and a["backend"] != "torch")  # float64: the torch reference only
    B, H, L, D = a["B"], rnd.choice([1, 2]), rnd.randint(1, 80), a["D"]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for _ in range(3))
    bs = a["block_size"] if "block_size" not in bad else 16
    nb = math.ceil(L / bs)
    hl = 1 if a["layout"] == "ok_shared" else H
    lay = torch.rand(hl, nb, nb, generator=g) < 0.5
    lay = {"empty": torch.zeros_like(lay), "wrong_nb": torch.ones(hl, nb + 1, nb + 1, dtype=torch.bool),
           "float": lay.float(), "list": lay.tolist(),
           "heads3": torch.ones(3, nb, nb, dtype=torch.bool)}.get(a["layout"], lay)
    kpm = {"none": None, "ok": torch.rand(B, L, generator=g) > 0.3,
           "wrong_shape": torch.ones(B + 1, L, dtype=torch.bool), "float": torch.ones(B, L)}[a["key_padding_mask"]]
    kw = {n: a[n] for n in ("block_size", "causal", "softmax_mode", "sm_scale", "backend", "empty_rows")}
    return q, k, v, lay, a["dtype"], {**kw, "key_padding_mask": kpm}, valid


@pytest.mark.parametrize("chunk", range(4))
def test_randomized_kernel_arguments_match_the_oracle_or_are_one_line_errors(chunk):
    n_valid = n_rejected = 0
    for seed in range(chunk * 100, chunk * 100 + 100):
        q, k, v, lay, dtype, kw, valid = _case(seed)
        case = f"seed {seed}: {q.shape[:4]}, {dtype}, { {a: b for a, b in kw.items() if a != 'key_padding_mask'} }"
        qs, ks, vs = (x.to(dtype) for x in (q, k, v))
        try:
            out = block_sparse_attention(qs, ks, vs, lay, **kw)
        except KernelArgumentError as e:
            msg = str(e).strip()
            assert not valid, f"{case}: a valid call was rejected: {msg}"
            assert msg and "\n" not in msg and msg.split(":")[0] in NAMES, (case, msg)
            n_rejected += 1
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{case}: {type(e).__name__} from deep inside instead of KernelArgumentError: {e}")
        assert valid, f"{case}: an invalid call was accepted"
        ref = dense_attention(q, k, v, lay, kw["block_size"], kw["causal"], kw["key_padding_mask"],
                              kw["softmax_mode"], kw["sm_scale"])
        assert out.shape == q.shape and out.dtype == dtype, case
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol, msg=case)
        n_valid += 1
    assert n_valid >= 5 and n_rejected >= 50, (n_valid, n_rejected)
