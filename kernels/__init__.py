"""sparsebench kernels: block-sparse attention, attention statistics, layout helpers.

Import after setting ``TRITON_INTERPRET=1`` if you want the Triton kernels on CPU.
"""
from .attention_stats import AttentionStatsAccumulator, attention_stats
from .block_sparse_attention import HAS_TRITON, block_sparse_attention, block_sparse_attention_reference, resolve_backend
from .errors import KernelArgumentError
from .layout import (
    LayoutLUT,
    bigbird_layout,
    build_lut,
    causal_block_mask,
    clear_lut_cache,
    dense_mask_from_layout,
    get_lut,
    layout_density,
    local_layout,
    longformer_layout,
    random_layout,
    slice_layout,
    strided_layout,
    validate_layout,
)
from .masks import (
    PackedMask,
    block_sparse_flops,
    causal_element_mask,
    fully_pruned_rows,
    layout_from_element_mask,
    mask_sparsity,
    pack_element_mask,
)
from .moe_ffn import MoEDispatch, moe_dispatch, moe_ffn, moe_ffn_flops, moe_ffn_reference, permute_hidden

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "resolve_backend",
    "attention_stats",
    "AttentionStatsAccumulator",
    "HAS_TRITON",
    "LayoutLUT",
    "validate_layout",
    "build_lut",
    "get_lut",
    "clear_lut_cache",
    "dense_mask_from_layout",
    "random_layout",
    "local_layout",
    "longformer_layout",
    "bigbird_layout",
    "strided_layout",
    "layout_density",
    "causal_block_mask",
    "slice_layout",
    "KernelArgumentError",
    "PackedMask",
    "pack_element_mask",
    "causal_element_mask",
    "layout_from_element_mask",
    "mask_sparsity",
    "fully_pruned_rows",
    "block_sparse_flops",
]
