"""The Triton kernels, one family per file (ddim_fast.kernels): the layer just
above the base; they import triton and torch, nothing of ddim_fast.

    ddim_step        the fused DDIM step (and the graph loop's step-counter advance)
    predict_x0       x̂₀ prediction plus clamp
    group_norm_silu  GroupNorm + SiLU (with the ResNet block's time-embedding bias)
    layer_norm       a transformer layer's residual add + LayerNorm
    geglu            GEGLU's GELU and product after its projection
"""
