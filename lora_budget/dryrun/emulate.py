"""CUDA behaviours emulated in a CPU trace (fake or real), so that the trace counts what a CUDA step allocates.

Each emulation is a patch that is active only inside ``CudaEmulation`` (a context manager), plus op hooks for the
:class:`~lora_budget.dryrun.tracker.StorageTracker`.  The same emulation is applied to a real CPU run and to a
FakeTensor run, so the two stay byte-comparable.  ``CudaEmulation.lines`` lists what was emulated (one line each)
for ``DryRunResult.emulations``; ``NOT_EMULATED`` lists known CUDA allocations a CPU trace cannot see.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

#: CUDA allocations no CPU trace sees (reported with every result).
NOT_EMULATED = (
    "not emulated: CUDA context, cuBLAS/cuBLASLt workspaces, NCCL buffers and allocator fragmentation "
    "(reserved - allocated); the numbers are torch.cuda.max_memory_allocated-style tensor bytes",
    "not emulated: kernel-internal scratch buffers (e.g. the fp32 dq accumulator of the flash-attention backward, "
    "the mem-efficient backward's delta) - fused kernels allocate them inside one op",
)


# ---- dropout -----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def cuda_dropout():
    """CUDA dropout (``at::dropout`` -> fused ``native_dropout``) saves a **bool** mask; CPU saves an input-dtype
    float mask.  Route ``F.dropout`` through ``torch.native_dropout`` exactly when CUDA would (training,
    0 < p < 1, non-empty, not in-place)."""
    import torch.nn.functional as F

    orig = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if training and not inplace and 0.0 < p < 1.0 and input.numel() > 0 and not torch.jit.is_scripting():
            return torch.native_dropout(input, p, True)[0]
        return orig(input, p, training, inplace)

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = orig


# ---- torch.is_autocast_enabled() ---------------------------------------------------------------------------------
@contextlib.contextmanager
def cuda_is_autocast_enabled():
    """``torch.is_autocast_enabled()`` without a device means CUDA.  peft's bnb LoRA layers use it to skip their
    fp32 input casts under autocast; on a CPU trace the (CPU) autocast state is what CUDA's would be."""
    orig = torch.is_autocast_enabled

    def is_autocast_enabled(device_type=None):
        if device_type is None:
            return orig("cpu")
        return orig(device_type)

    torch.is_autocast_enabled = is_autocast_enabled
    try:
        yield
    finally:
        torch.is_autocast_enabled = orig


# ---- packed-sequence detection (needed for fake tensors; harmless for real ones) -----------------------------------
@contextlib.contextmanager
def no_packed_sequences():
    """transformers looks for packed sequences in ``position_ids`` when ``use_cache=False``; with fake tensors it
    cannot read the values and assumes packing (a dense mask, no GQA in SDPA).  Real unpacked batches give None."""
    import transformers.masking_utils as mu

    orig = mu.find_packed_sequence_indices
    mu.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        mu.find_packed_sequence_indices = orig


# ---- grouped_mm dtypes (MoE experts) -------------------------------------------------------------------------------
@contextlib.contextmanager
def cuda_grouped_mm_dtypes(on_use=None):
    """``aten::_grouped_mm`` on CUDA (aten/src/ATen/native/cuda/GroupedBlas.cpp) takes bf16, fp16 and fp32: bf16 runs
    the CUTLASS kernel, the others ``_grouped_mm_fallback`` (an ``mm_out`` per group into the one output tensor, no
    other device buffer).  The meta kernel that fake tensors run (``torch/_meta_registrations.py``) accepts bf16
    only, so MoE experts kept in fp32 (QLoRA's ``prepare_model_for_kbit_training``, fp32 training) could not be
    traced.  Same output shape and dtype as CUDA; the bf16 path is untouched.  ``on_use`` is called each time the
    relaxed path runs."""
    import torch._meta_registrations as mr

    orig = mr._meta_grouped_mm_common

    def common(mat_a, mat_b, scale_a, scale_b, offs=None, bias=None, scale_result=None, out_dtype=None,
               use_fast_accum=False):
        if (scale_a is None and scale_b is None and mat_a.dtype == mat_b.dtype
                and mat_a.dtype in (torch.float32, torch.float16)):
            torch._check(mat_a.dim() in (2, 3) and mat_b.dim() in (2, 3), lambda: "Multiplicands must be 2D or 3D")
            if on_use is not None:
                on_use(mat_a.dtype)
            return mr._create_grouped_mm_output_tensor(mat_a, mat_b, offs, out_dtype or mat_a.dtype)
        return orig(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype, use_fast_accum)

    mr._meta_grouped_mm_common = common
    try:
        yield
    finally:
        mr._meta_grouped_mm_common = orig


# ---- autocast policy ---------------------------------------------------------------------------------------------
# CUDA's autocast lists (aten/src/ATen/autocast_mode.h, AT_FORALL_*) where the CPU lists differ.  linear, matmul,
# mm, bmm, addmm, baddbmm and scaled_dot_product_attention are lower-precision on both.
_CUDA_LOWER_ONLY = ("einsum", "addmv", "addr", "mv", "chain_matmul", "linalg_multi_dot")
_CUDA_FP32 = ("acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
              "rsqrt", "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus",
              "layer_norm", "native_layer_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm",
              "nuclear_norm.dim", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss",
              "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
              "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
              "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm",
              "logsumexp")
_CUDA_FP32_SET_OPT_DTYPE = ("prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum",
                            "linalg_vector_norm", "linalg_matrix_norm", "sum", "sum.dim_IntList")
_CUDA_PROMOTE = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sampler", "index_put",
                 "tensordot", "scatter_add")


def _map_tensors(x, fn):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_map_tensors(y, fn) for y in x)
    return x


def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.device.type == "cpu"


def _overload(name: str):
    op, _, ovl = name.partition(".")
    packet = getattr(torch.ops.aten, op)
    return getattr(packet, ovl or "default")


@contextlib.contextmanager
def cuda_autocast_policy(lower_dtype):
    """Register Python ``AutocastCPU`` kernels that apply CUDA's cast policy for the ops where the CPU lists differ
    (fp32 ops such as layer_norm / softmax / pow, fp32-output reductions, promote ops, and CUDA-only lower-precision
    ops).  Removed again on exit (the C++ kernels come back)."""
    ks = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
    lib = torch.library.Library("aten", "IMPL")

    def make(op, policy):
        schema_args = [a.name for a in op._schema.arguments]

        def kernel(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(ks):
                if policy == "fp32":
                    f = lambda t: t.float() if _eligible(t) else t  # noqa: E731
                    args, kwargs = _map_tensors(args, f), {k: _map_tensors(v, f) for k, v in kwargs.items()}
                elif policy == "lower":
                    f = lambda t: t.to(lower_dtype) if _eligible(t) else t  # noqa: E731
                    args, kwargs = _map_tensors(args, f), {k: _map_tensors(v, f) for k, v in kwargs.items()}
                elif policy == "promote":
                    flat = [t for t in torch.utils._pytree.tree_flatten((args, kwargs))[0] if _eligible(t)]
                    to = torch.float32 if any(t.dtype == torch.float32 for t in flat) else lower_dtype
                    f = lambda t: t.to(to) if _eligible(t) else t  # noqa: E731
                    args, kwargs = _map_tensors(args, f), {k: _map_tensors(v, f) for k, v in kwargs.items()}
                elif policy == "set_opt_dtype":
                    if args and _eligible(args[0]):
                        i = schema_args.index("dtype")
                        if len(args) > i:
                            if args[i] is None:
                                args = (*args[:i], torch.float32, *args[i + 1:])
                        elif kwargs.get("dtype") is None:
                            kwargs = {**kwargs, "dtype": torch.float32}
                return op(*args, **kwargs)

        return kernel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for names, policy in ((_CUDA_LOWER_ONLY, "lower"), (_CUDA_FP32, "fp32"),
                              (_CUDA_FP32_SET_OPT_DTYPE, "set_opt_dtype"), (_CUDA_PROMOTE, "promote")):
            for name in names:
                try:
                    op = _overload(name)
                except (AttributeError, RuntimeError):
                    continue
                lib.impl(name, make(op, policy), "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()


# ---- SDPA: CUDA backend choice --------------------------------------------------------------------------------------
def cuda_sdpa_backend(q, k, v, attn_mask) -> str:
    """Which backend CUDA's SDPA picks (default priority flash > mem-efficient > math, sm80+)."""
    same_d = q.shape[-1] == k.shape[-1] == v.shape[-1]
    if attn_mask is None and q.dtype in (torch.float16, torch.bfloat16) and same_d and q.shape[-1] <= 256:
        return "flash"
    align = 8 if q.dtype in (torch.float16, torch.bfloat16) else 4
    if q.shape[-1] % align == 0 and v.shape[-1] % align == 0 and q.shape[-1] == k.shape[-1]:
        return "efficient"
    return "math"


def _sdpa_cpu_hook(tr, func, args, kwargs):
    """CPU SDPA runs a flash kernel that saves out + fp32 logsumexp [B, H, S].  CUDA's mem-efficient kernel (used with
    a mask or fp32 inputs) saves its logsumexp padded to a multiple of 32 in the sequence dim (kAlignLSE)."""
    out = func(*args, **kwargs)
    q, k, v = args[0], args[1], args[2]
    mask = kwargs.get("attn_mask")
    output, lse = out[0], out[1]
    tr.register(output)
    backend = cuda_sdpa_backend(q, k, v, mask)
    if backend == "efficient" and lse.dim() == 3:
        b, h, s = lse.shape
        tr.register(lse, nbytes=b * h * (-(-s // 32) * 32) * 4, desc="sdpa_efficient.logsumexp")
    else:
        tr.register(lse)
    tr.register_outputs(out)
    return out


# ---- bitsandbytes gemm_4bit: CUDA dequant + F.linear fallback ------------------------------------------------------
def _gemm_4bit_hook(tr, func, args, kwargs):
    """On CUDA, ``gemm_4bit`` with training-size M (> 512 rows for >= 4M-element weights, and most shapes on
    sm90/sm100) dequantizes the weight into an N x K buffer in the input dtype and calls F.linear
    (``backends/cuda/ops.py: _dequant_linear_fallback``); the CPU op hides that buffer.  Decompose the same way."""
    names = ("A", "B", "shapeB", "absmax", "blocksize", "quant_type", "bias", "absmax_8bit", "absmax_code",
             "absmax_offset")
    a = dict(zip(names, args))
    a.update(kwargs)
    A, B, absmax = a["A"], a["B"], a["absmax"]
    if a.get("absmax_8bit") is not None:
        absmax_dq = torch.ops.bitsandbytes.dequantize_blockwise.default(a["absmax_8bit"], absmax, a["absmax_code"],
                                                                       256, torch.float32)
        tr.register(absmax_dq, desc="gemm_4bit.absmax_dq")
        absmax = absmax_dq + a["absmax_offset"]
        tr.register(absmax, desc="gemm_4bit.absmax")
    B_dq = torch.ops.bitsandbytes.dequantize_4bit.default(B, absmax, a["blocksize"], a["quant_type"],
                                                          list(a["shapeB"]), A.dtype)
    tr.register(B_dq, desc="gemm_4bit.dequantized_weight")
    out = torch.nn.functional.linear(A, B_dq, a.get("bias"))
    tr.register(out, desc="gemm_4bit.out")
    return out


class CudaEmulation:
    """Installs the CUDA emulations for one traced run (``cuda=False`` installs only what fake tensors need)."""

    def __init__(self, cfg, *, cuda: bool = True, mixed_dtype=None):
        self.cfg = cfg
        self.cuda = cuda
        self.mixed_dtype = mixed_dtype
        self.lines: list[str] = []
        self._stack = contextlib.ExitStack()

    def op_hooks(self) -> dict:
        hooks = {}
        if self.cuda:
            hooks[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default] = _sdpa_cpu_hook
            if self.cfg.method == "qlora":
                import bitsandbytes  # noqa: F401  (registers the ops)

                hooks[torch.ops.bitsandbytes.gemm_4bit.default] = _gemm_4bit_hook
        return hooks

    def _note_grouped_mm(self, dtype):
        line = (f"grouped_mm (MoE experts) in {str(dtype).replace('torch.', '')}: CUDA's per-group mm fallback "
                "(same output tensor; the meta kernel of fake tensors accepts bf16 only)")
        if line not in self.lines:
            self.lines.append(line)

    def __enter__(self):
        st = self._stack
        st.enter_context(no_packed_sequences())
        st.enter_context(cuda_grouped_mm_dtypes(self._note_grouped_mm))
        if self.cuda:
            st.enter_context(cuda_dropout())
            self.lines.append("dropout: F.dropout -> torch.native_dropout (bool mask, as CUDA's fused dropout)")
            st.enter_context(cuda_is_autocast_enabled())
            self.lines.append("torch.is_autocast_enabled() (CUDA) reports the autocast state of the trace "
                              "(peft bnb LoRA layers skip their fp32 casts under autocast)")
            self.lines.append("SDPA: CPU flash kernel; where CUDA would run the mem-efficient kernel (padding mask, "
                              "fp32, head_dim > 256) its logsumexp is counted padded to a multiple of 32 "
                              "(flash > efficient > math priority; cuDNN attention, preferred on some sm90/sm100 "
                              "builds, saves the same out + unpadded stats as flash)")
            if self.cfg.method == "qlora":
                self.lines.append("bnb gemm_4bit: CUDA dequantize + F.linear fallback (N x K weight buffer in the "
                                  "compute dtype, + fp32 absmax with double quant) instead of the fused CPU op")
            if self.mixed_dtype is not None:
                st.enter_context(cuda_autocast_policy(self.mixed_dtype))
                self.lines.append(f"autocast: torch.autocast('cpu', {str(self.mixed_dtype).replace('torch.', '')}) "
                                  "with CUDA's cast policy re-registered where the CPU lists differ (fp32: "
                                  "layer_norm, softmax/log_softmax/sum output dtype, pow, exp, ...; promote ops; "
                                  "einsum/addmv/mv lower precision without the weight cache); linear/matmul/mm/bmm/"
                                  "baddbmm/sdpa are lower-precision with the fp32-leaf weight cache on both")
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False
