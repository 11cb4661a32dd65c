"""Encoder-decoder Transformer (pre-LN) with pluggable attention, plus greedy and beam decoding.

Every attention layer gets its core from the method (``AttentionSpec.max_len`` = query length, ``max_len_kv`` =
key length where it differs):
- encoder self-attention: ``AttentionSpec(kind="self", stack="encoder", causal=False)``, ``max_len`` = the
  layer's input length (``max_src_len``, or less after a pooler);
- decoder self-attention: ``AttentionSpec(kind="decoder_self", stack="decoder", causal=True)``, ``max_len=max_tgt_len``;
- cross-attention:        ``AttentionSpec(kind="cross", stack="decoder", causal=False)``, ``max_len=max_tgt_len``,
  ``max_len_kv`` = the encoder's output length (``max_src_len`` after its poolers): queries are target
  positions, keys the encoder memory (Lq != Lk).
Every FFN comes from ``method.ffn(FFNSpec(stack="encoder"|"decoder", max_len=<the layer's length>), default)``.

Embeddings: ``sqrt(d) * Emb(tokens) + sinusoidal(position)`` (Vaswani et al.), so any source length works
(long-document summarization uses 2k-16k source tokens); with ``tie_embeddings`` one matrix is shared by the
encoder input, the decoder input and the output projection (joint vocabulary).

Incremental decoding keeps per-layer caches: decoder self-attention K/V grow by one position per step, and
cross-attention K/V are computed once from the memory. At a step the core is called with ``q`` of length 1
against ``t + 1`` cached keys and the layer's causal spec: **a causal core must align the causal diagonal to
the end when Lq != Lk** (query i sees keys ``<= i + Lk - Lq``), as ``methods/dense.py``'s eager, SDPA and
flex cores do (``tests/models/test_seq2seq.py`` checks cached == full recompute for each).
Decoder self-attention gets no key-padding mask: targets are right-padded, so with the causal mask a real
query never sees a padding key (padded query rows are ignored by the loss).

Encoder pooling hook (token-dropping methods such as Pyramidion/top-k pooling): when
``method.pooler(PoolerSpec(layer=i, d_model, max_len))`` (``bench/method.py``) returns a module, it runs after
encoder layer ``i`` as ``x, mask = pooler(x, mask)`` and may shorten the sequence to at most
``pooler.output_length(max_len)`` positions, the length later encoder layers (and the cross-attention keys) are
built for; the decoder cross-attends to what comes out (with its mask).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.method import AttentionSpec, FFNSpec, PoolerSpec
from bench.models.layers import MultiHeadAttention, PreLNBlock, apply_pooler, method_ffn


@dataclass(frozen=True)
class Seq2SeqConfig:
    n_enc_layers: int = 2
    n_dec_layers: int = 2
    d_model: int = 64
    n_heads: int = 2
    d_ff: int = 128
    dropout: float = 0.1
    max_src_len: int = 128  # sources are truncated to this many tokens
    max_tgt_len: int = 128  # targets (with BOS/EOS) are truncated to this many tokens
    tie_embeddings: bool = True  # one matrix for encoder input, decoder input and output (joint vocabulary)
    label_smoothing: float = 0.1


def sinusoidal_positions(length: int, d: int, device=None, offset: int = 0) -> torch.Tensor:
    """(length, d) sinusoidal table for positions offset..offset+length-1 (sin on even, cos on odd dims)."""
    pos = torch.arange(offset, offset + length, dtype=torch.float32, device=device)[:, None]
    i = torch.arange(0, d, 2, dtype=torch.float32, device=device)
    angle = pos * torch.exp(-math.log(10000.0) * i / d)[None]
    pe = torch.zeros(length, d, device=device)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)[:, : d // 2]
    return pe


def _heads(mha: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    return mha._heads(x)


def _attend(mha: MultiHeadAttention, q_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Query projection, the method's core on (B, H, L, D) k/v already projected, output projection."""
    q = mha._heads(mha.q(q_in))
    o = mha.core(q, k, v, mask)
    B, H, L, D = o.shape
    return mha.drop(mha.out(o.transpose(1, 2).reshape(B, L, H * D)))


class DecoderLayer(nn.Module):
    """x + SelfAttn(LN(x)); x + CrossAttn(LN(x), memory); x + MLP(LN(x)). ``mem_len``: the longest memory
    (encoder output) the cross-attention sees; default ``cfg.max_src_len``."""

    def __init__(self, cfg: Seq2SeqConfig, method, layer: int, mem_len: int | None = None):
        super().__init__()
        d, h = cfg.d_model, cfg.n_heads
        hd = d // h
        self.ln1 = nn.LayerNorm(d)
        self.self_attn = MultiHeadAttention(
            d, h, method,
            AttentionSpec(layer=layer, n_heads=h, head_dim=hd, max_len=cfg.max_tgt_len, causal=True,
                          kind="decoder_self", stack="decoder"),
            cfg.dropout,
        )
        self.ln2 = nn.LayerNorm(d)
        self.cross_attn = MultiHeadAttention(
            d, h, method,
            AttentionSpec(layer=layer, n_heads=h, head_dim=hd, max_len=cfg.max_tgt_len, causal=False,
                          kind="cross", stack="decoder", max_len_kv=mem_len or cfg.max_src_len),
            cfg.dropout,
        )
        self.ln3 = nn.LayerNorm(d)
        self.mlp, default = method_ffn(
            method, FFNSpec(layer=layer, stack="decoder", d_model=d, d_ff=cfg.d_ff, activation="gelu",
                            max_len=cfg.max_tgt_len), cfg.dropout)
        self._ffn_default = (default,)

    def forward(self, x, memory, memory_mask):
        x = x + self.self_attn(self.ln1(x))
        x = x + self.cross_attn(self.ln2(x), memory_mask, memory=memory)
        return x + self.mlp(self.ln3(x))

    def cross_kv(self, memory):
        a = self.cross_attn
        return _heads(a, a.k(memory)), _heads(a, a.v(memory))

    def step(self, x, cache: dict, memory_mask):
        """One new position x (N, 1, d); ``cache`` holds 'k','v' (self, grown here) and 'ck','cv' (cross)."""
        a = self.self_attn
        h = self.ln1(x)
        k_new, v_new = _heads(a, a.k(h)), _heads(a, a.v(h))
        if cache.get("k") is None:
            cache["k"], cache["v"] = k_new, v_new
        else:
            cache["k"] = torch.cat([cache["k"], k_new], 2)
            cache["v"] = torch.cat([cache["v"], v_new], 2)
        x = x + _attend(a, h, cache["k"], cache["v"], None)
        x = x + _attend(self.cross_attn, self.ln2(x), cache["ck"], cache["cv"], memory_mask)
        return x + self.mlp(self.ln3(x))


class Seq2SeqTransformer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, method, vocab_size: int, tgt_vocab_size: int | None = None,
                 pad_id: int = 0, bos_id: int = 1, eos_id: int = 2):
        super().__init__()
        self.cfg = cfg
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        tgt_vocab_size = tgt_vocab_size or vocab_size
        if cfg.tie_embeddings and tgt_vocab_size != vocab_size:
            raise ValueError("tie_embeddings needs one joint vocabulary (vocab_size == tgt_vocab_size)")
        d = cfg.d_model
        self.src_emb = nn.Embedding(vocab_size, d, padding_idx=pad_id)
        nn.init.normal_(self.src_emb.weight, 0.0, d ** -0.5)
        if cfg.tie_embeddings:
            self.tgt_emb = self.src_emb
        else:
            self.tgt_emb = nn.Embedding(tgt_vocab_size, d, padding_idx=pad_id)
            nn.init.normal_(self.tgt_emb.weight, 0.0, d ** -0.5)
        with torch.no_grad():
            self.src_emb.weight[pad_id].zero_()
            self.tgt_emb.weight[pad_id].zero_()
        self.drop = nn.Dropout(cfg.dropout)
        hd = d // cfg.n_heads
        enc, poolers = [], []
        length = cfg.max_src_len  # longest sequence the next encoder layer sees (shortened by poolers)
        for i in range(cfg.n_enc_layers):
            enc.append(PreLNBlock(d, cfg.n_heads, cfg.d_ff, method,
                                  AttentionSpec(layer=i, n_heads=cfg.n_heads, head_dim=hd, max_len=length,
                                                causal=False, kind="self", stack="encoder"),
                                  cfg.dropout))
            pooler = method.pooler(PoolerSpec(layer=i, d_model=d, max_len=length, stack="encoder"))
            poolers.append(pooler)
            if pooler is not None:
                length = pooler.output_length(length)
        self.enc = nn.ModuleList(enc)
        self.poolers = nn.ModuleList(p if p is not None else nn.Identity() for p in poolers)
        self._has_pooler = [p is not None for p in poolers]
        self.mem_len = length  # longest encoder output (memory) the decoder cross-attends to
        self.enc_ln = nn.LayerNorm(d)
        self.dec = nn.ModuleList(DecoderLayer(cfg, method, i, self.mem_len) for i in range(cfg.n_dec_layers))
        self.dec_ln = nn.LayerNorm(d)
        self.out_proj = None if cfg.tie_embeddings else nn.Linear(d, tgt_vocab_size, bias=False)

    # ---- pieces -----------------------------------------------------------------------------
    def _embed(self, emb: nn.Embedding, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        L = tokens.shape[1]
        x = emb(tokens) * math.sqrt(self.cfg.d_model)
        return self.drop(x + sinusoidal_positions(L, self.cfg.d_model, tokens.device, offset).to(x.dtype)[None])

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dec_ln(x)
        return x @ self.tgt_emb.weight.t() if self.out_proj is None else self.out_proj(x)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src, src_mask (B, Ls) -> memory (B, Lm, d), memory_mask (B, Lm); Lm < Ls only with a pooler."""
        x = self._embed(self.src_emb, src)
        mask = src_mask
        for blk, pool, has in zip(self.enc, self.poolers, self._has_pooler):
            x = blk(x, mask)
            if has:
                x, mask = apply_pooler(pool, x, mask)
        return self.enc_ln(x), mask

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: tgt_in (B, Lt) -> logits (B, Lt, V)."""
        x = self._embed(self.tgt_emb, tgt_in)
        for layer in self.dec:
            x = layer(x, memory, memory_mask)
        return self._logits(x)

    def forward(self, src, src_mask, tgt_in):
        memory, mmask = self.encode(src, src_mask)
        return self.decode(tgt_in, memory, mmask)

    # ---- incremental decoding ---------------------------------------------------------------
    def init_cache(self, memory: torch.Tensor) -> list[dict]:
        caches = []
        for layer in self.dec:
            ck, cv = layer.cross_kv(memory)
            caches.append({"k": None, "v": None, "ck": ck, "cv": cv})
        return caches

    @staticmethod
    def reorder_cache(caches: list[dict], index: torch.Tensor) -> None:
        """Select rows (beam reordering) of the growing self-attention caches; cross K/V stay put because
        ``index`` only permutes hypotheses of the same source."""
        for c in caches:
            if c["k"] is not None:
                c["k"] = c["k"].index_select(0, index)
                c["v"] = c["v"].index_select(0, index)

    def decode_step(self, tokens: torch.Tensor, caches: list[dict], memory_mask: torch.Tensor, step: int) -> torch.Tensor:
        """tokens (N,) at position ``step`` -> logits (N, V), updating ``caches`` in place."""
        x = self._embed(self.tgt_emb, tokens[:, None], offset=step)
        for layer, cache in zip(self.dec, caches):
            x = layer.step(x, cache, memory_mask)
        return self._logits(x)[:, 0]

    @torch.no_grad()
    def greedy(self, src, src_mask, max_len: int, min_len: int = 0) -> list[list[int]]:
        """Greedy decoding; returns token ids per source, without BOS and EOS. ``max_len`` counts EOS."""
        memory, mmask = self.encode(src, src_mask)
        B = src.shape[0]
        caches = self.init_cache(memory)
        tok = torch.full((B,), self.bos_id, dtype=torch.long, device=src.device)
        out = torch.full((B, max_len), self.pad_id, dtype=torch.long, device=src.device)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        for t in range(max_len):
            logits = self.decode_step(tok, caches, mmask, t).float()
            if t < min_len:
                logits[:, self.eos_id] = float("-inf")
            if t == max_len - 1:  # last position: EOS (as in beam_search), so both return <= max_len-1 tokens
                logits[:, torch.arange(logits.shape[-1], device=logits.device) != self.eos_id] = float("-inf")
            tok = logits.argmax(-1)
            tok = torch.where(done, torch.full_like(tok, self.pad_id), tok)
            out[:, t] = tok
            done = done | (tok == self.eos_id)
            if bool(done.all()):
                break
        res = []
        for row in out.tolist():
            seq = []
            for t in row:
                if t in (self.eos_id, self.pad_id):
                    break
                seq.append(t)
            res.append(seq)
        return res

    @torch.no_grad()
    def beam_search(self, src, src_mask, beam_size: int, max_len: int, length_penalty: float = 1.0,
                    min_len: int = 0) -> list[list[int]]:
        """Beam search (fairseq-style): a hypothesis ending in EOS is finished with score
        ``sum log p / len ** length_penalty`` (len counts EOS); a source is done when ``beam_size``
        hypotheses have finished; at ``max_len`` the alive beams are finished as they are.
        Returns the best token ids per source, without BOS/EOS. ``beam_size=1`` equals ``greedy``."""
        K = beam_size
        memory, mmask = self.encode(src, src_mask)
        B = src.shape[0]
        dev = src.device
        memory = memory.repeat_interleave(K, 0)
        mmask = mmask.repeat_interleave(K, 0) if mmask is not None else None
        caches = self.init_cache(memory)
        scores = torch.zeros(B, K, device=dev)
        scores[:, 1:] = float("-inf")  # the first step expands beam 0 only
        tok = torch.full((B * K,), self.bos_id, dtype=torch.long, device=dev)
        hyps: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        done = [False] * B
        for t in range(max_len):
            logp = F.log_softmax(self.decode_step(tok, caches, mmask, t).float(), -1)  # (B*K, V)
            V = logp.shape[-1]
            if t < min_len:
                logp[:, self.eos_id] = float("-inf")
            if t == max_len - 1:  # last position: only EOS may follow
                keep = logp[:, self.eos_id].clone()
                logp.fill_(float("-inf"))
                logp[:, self.eos_id] = keep
            cand = (scores.view(B * K, 1) + logp).view(B, K * V)
            top_s, top_i = cand.topk(min(2 * K, K * V), dim=1)
            top_s_l, top_i_l = top_s.tolist(), top_i.tolist()
            new_hyps: list[list[list[int]]] = []
            ns_l = [[float("-inf")] * K for _ in range(B)]  # next scores, source beam, next token
            sb_l = [[0] * K for _ in range(B)]
            nt_l = [[self.pad_id] * K for _ in range(B)]
            for b in range(B):
                alive: list[list[int]] = []
                if not done[b]:
                    for rank, (s, idx) in enumerate(zip(top_s_l[b], top_i_l[b])):
                        if s == float("-inf"):
                            break
                        beam, w = divmod(idx, V)
                        if w == self.eos_id:
                            if rank < K:  # only EOS among the top K candidates finishes a hypothesis
                                finished[b].append((s / (t + 1) ** length_penalty, list(hyps[b][beam])))
                        else:
                            j = len(alive)
                            ns_l[b][j], sb_l[b][j], nt_l[b][j] = s, beam, w
                            alive.append(hyps[b][beam] + [w])
                        if len(alive) == K or len(finished[b]) >= K:
                            break
                    if len(finished[b]) >= K or not alive:
                        done[b] = True
                alive += [[] for _ in range(K - len(alive))]
                new_hyps.append(alive)
            if all(done):
                break
            scores = torch.tensor(ns_l, device=dev)
            hyps = new_hyps
            flat = (torch.tensor(sb_l, device=dev) + torch.arange(B, device=dev)[:, None] * K).view(-1)
            self.reorder_cache(caches, flat)
            tok = torch.tensor(nt_l, device=dev).view(-1)
        out = []
        for b in range(B):
            if not finished[b]:  # cannot normally happen (the last step forces EOS); keep a safe fallback
                finished[b].append((0.0, hyps[b][0]))
            out.append(max(finished[b], key=lambda x: x[0])[1])
        return out


def label_smoothed_nll(logits: torch.Tensor, target: torch.Tensor, eps: float, ignore_index: int = 0) -> torch.Tensor:
    """Mean over non-ignored tokens of (1-eps)*NLL + eps*mean_v(-log p_v) (fairseq-style smoothing)."""
    logp = F.log_softmax(logits.float(), -1)
    keep = target != ignore_index
    nll = -logp.gather(-1, target.clamp_min(0)[..., None])[..., 0]
    smooth = -logp.mean(-1)
    loss = (1.0 - eps) * nll + eps * smooth
    n = keep.sum().clamp_min(1)
    return (loss * keep).sum() / n
