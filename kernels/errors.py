"""The kernels' argument error (kernels/ must not import bench/, so it has its own class).

``KernelArgumentError`` is both a ``ValueError`` and a ``TypeError``: callers that catch either keep working,
and the message is one line that names the argument, what was expected and what was got (the style of
``bench.errors.BenchError``).
"""


class KernelArgumentError(ValueError, TypeError):
    """A bad argument to a kernels/ entry point; the one-line message names it and says what to pass."""


def describe(x) -> str:
    """Short description of a value for an error message: dtype/shape/device for tensors, repr otherwise."""
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    except Exception:  # pragma: no cover - torch is always there in practice
        pass
    r = repr(x)
    if len(r) > 60:
        r = r[:57] + "..."
    return f"{r} ({type(x).__name__})"
