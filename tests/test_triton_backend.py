"""The ``triton`` backend through prune_layer: availability, reconstruction error vs the torch backend, patterns."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import correlated_inputs, hessian_of, recon_error

import sparsegpt_kernels as sk
from sparsegpt_kernels.backends import _triton, available_backends, select_backend


def test_package_import_does_not_import_triton():
    code = "import sys, sparsegpt_kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_availability(monkeypatch):
    assert _triton.unavailable_reason(torch.device("cuda")) is None  # only a string check: touches no GPU
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _triton.unavailable_reason(torch.device("cpu")) is None
    assert "triton" in available_backends("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = _triton.unavailable_reason(torch.device("cpu"))
    assert "TRITON_INTERPRET=1" in reason
    with pytest.raises(sk.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        select_backend("triton", "cpu")


# Compiled-kernel checks on a GPU. Run them with TRITON_INTERPRET=0 (conftest sets 1 by default, which would send CUDA
# tensors through the interpreter), e.g. ``TRITON_INTERPRET=0 pytest tests/test_triton_backend.py -k cuda``.
cuda_compiled = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA device and TRITON_INTERPRET=0 (compiled kernels)",
)

CASES = {
    "50%": dict(sparsity=0.5),
    "2:4": dict(pattern="2:4"),
    "4:8": dict(pattern="4:8"),
    "2:4+4bit": dict(pattern="2:4", quant_bits=4),
    "50%+4bit/g32": dict(sparsity=0.5, quant_bits=4, quant_group_size=32),
}


@pytest.fixture(scope="module")
def layer():
    X = correlated_inputs(512, 128, seed=5)
    H = hessian_of(X)
    H[7, :] = 0  # one dead input
    H[:, 7] = 0
    g = torch.Generator().manual_seed(5)
    return X, H, torch.randn(48, 128, generator=g)


@pytest.mark.parametrize("case", list(CASES))
def test_prune_layer_matches_torch(layer, case, poison_empty):
    X, H, W = layer
    kw = CASES[case]
    Wt, Wk = W.clone(), W.clone()
    rt = sk.prune_layer(Wt, H, block_size=64, backend="torch", **kw)
    rk = sk.prune_layer(Wk, H, block_size=64, backend="triton", **kw)
    assert rk.backend == "triton" and rk.dead_columns == 1 and bool((Wk[:, 7] == 0).all())
    e_t, e_k = recon_error(X, W, Wt), recon_error(X, W, Wk)
    assert e_k <= 1.01 * e_t, (e_k, e_t)
    assert abs(rk.loss - rt.loss) <= 1e-3 * rt.loss
    if "pattern" in kw:
        n, m = sk.parse_pattern(kw["pattern"])
        kept = (Wk != 0).reshape(48, 128 // m, m).sum(-1)
        assert bool((kept <= n).all())
        if "quant_bits" not in kw:  # without quantization a kept weight is never exactly 0
            assert bool((kept == n).all()) and rk.sparsity == 1 - n / m
    else:
        assert rk.sparsity >= 0.5
        if "quant_bits" not in kw:
            assert rk.sparsity == rt.sparsity == 0.5


def test_float64_layer_is_computed_in_float32(layer):
    X, H, W = layer
    W64 = W.double()
    Wt, Wk = W64.clone(), W64.clone()
    sk.prune_layer(Wt, H.double(), pattern="2:4", block_size=64, backend="torch")
    sk.prune_layer(Wk, H.double(), pattern="2:4", block_size=64, backend="triton")
    assert Wk.dtype == torch.float64
    assert recon_error(X, W64, Wk) <= 1.01 * recon_error(X, W64, Wt)


@cuda_compiled
@pytest.mark.parametrize("case", ["50%", "2:4", "2:4+4bit"])
def test_prune_layer_on_cuda(case):
    X = correlated_inputs(2048, 512, seed=6).cuda()
    H = hessian_of(X)
    W = torch.randn(384, 512, device="cuda")
    Wt, Wk = W.clone(), W.clone()
    sk.prune_layer(Wt, H, backend="torch", **CASES[case])
    rk = sk.prune_layer(Wk, H, backend="triton", **CASES[case])
    assert rk.backend == "triton"
    assert recon_error(X, W, Wk) <= 1.01 * recon_error(X, W, Wt)


_COMPILE_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sparsegpt_kernels.ops import hinv, nm_mask, sweep

def jit_fn(k):
    while not isinstance(k, triton.runtime.jit.JITFunction):
        k = k.fn
    return k

def compile_for_sm90(kernel, types, consts, num_warps):
    fn = jit_fn(kernel)
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps})

F, I8, I32 = "*fp32", "*i8", "*i32"
cfg = hinv.GPU_CONFIG
BS, BT, BK, WD, WM = cfg["BS"], cfg["BT"], cfg["BK"], cfg["num_warps_diag"], cfg["num_warps_dot"]
compile_for_sm90(hinv._prepare_kernel, dict(h_ptr=F, a_ptr=F, lam_ptr=F), dict(BT=BT), WM)
compile_for_sm90(hinv._chol_diag_kernel, dict(a_ptr=F, dinv_ptr=F, info_ptr=I32), dict(BS=BS), WD)
compile_for_sm90(hinv._chol_panel_kernel, dict(a_ptr=F, dinv_ptr=F), dict(BS=BS, BM=BS, BK=BK), WM)
compile_for_sm90(hinv._chol_update_kernel, dict(a_ptr=F), dict(BS=BS, BT=BT, BK=BK), WM)
compile_for_sm90(hinv._trinv_t_kernel, dict(a_ptr=F, t_ptr=F), dict(BS=BS, BK=BK), WM)
compile_for_sm90(hinv._trinv_apply_kernel, dict(a_ptr=F, t_ptr=F, dinv_ptr=F), dict(BS=BS, BK=BK), WM)
compile_for_sm90(hinv._rotate_kernel, dict(a_ptr=F), dict(BT=BT), WM)
c = nm_mask.CONFIGS[0]
compile_for_sm90(nm_mask._nm_keep_mask_kernel, dict(s_ptr=F, out_ptr=I8), dict(N=2, M=4, **c.kwargs), c.num_warps)
sel = dict(src_ptr=F, d_ptr=F, state_ptr=I32, hist_ptr=I32, ties_ptr=I32, tie_prefix_ptr=I32, mask_ptr=I8)
BR = sweep.SELECT_BR_GPU
compile_for_sm90(sweep._radix_hist_kernel, sel, dict(PASS=1, HAS_D=True, BR=BR, BC=128), 4)
compile_for_sm90(sweep._radix_pick_kernel, sel, dict(PASS=1), 4)
compile_for_sm90(sweep._tie_count_kernel, sel, dict(HAS_D=True, BR=BR, BC=128), 4)
compile_for_sm90(sweep._prune_mask_kernel, sel, dict(HAS_D=True, BR=BR, BC=128), 4)
sw = dict(w_ptr=F, u_ptr=F, mask_ptr=I8, e_ptr=F, loss_ptr=F, qs_ptr=F, qz_ptr=F)
c = sweep.SWEEP_CONFIGS[0]
for mode in (dict(N=0, M=0, UNSTRUCT=True, QUANT=False), dict(N=2, M=4, UNSTRUCT=False, QUANT=True)):
    compile_for_sm90(sweep._sweep_block_kernel, sw, dict(**mode, BP=128, **c.kwargs), c.num_warps)
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """Every kernel compiles for a Hopper GPU (Triton's own ptxas; no GPU needed): catches code that only the
    interpreter accepts."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-4000:]


@cuda_compiled
def test_cuda_graph_sweep_matches_eager():
    from sparsegpt_kernels import reference
    from sparsegpt_kernels.ops.sweep import sweep_triton

    X = correlated_inputs(2048, 512, seed=7).cuda()
    U = reference.inverse_factor(hessian_of(X), 0.01).contiguous()
    for mode in (dict(sparsity=0.5, n=None, m=None), dict(sparsity=0.5, n=2, m=4)):
        for layer in range(3):  # first call captures, later ones replay
            W = torch.randn(384, 512, device="cuda", generator=torch.Generator("cuda").manual_seed(layer))
            We, Wg = W.clone(), W.clone()
            le = sweep_triton(We, U, block_size=128, cuda_graph=False, **mode)
            lg = sweep_triton(Wg, U, block_size=128, cuda_graph=True, **mode)
            assert torch.equal(We, Wg) and float(le) == float(lg)


@cuda_compiled
@pytest.mark.parametrize("c", [1, 130, 1000, 4096])
def test_cuda_hinv_matches_reference(c):
    from sparsegpt_kernels import reference
    from sparsegpt_kernels.ops.hinv import hinv_factor

    X = correlated_inputs(max(2 * c, 64), c, seed=8, dtype=torch.float64).cuda()
    X[:, :2] = 0  # dead inputs
    H = hessian_of(X)
    truth = reference.inverse_factor(H, 0.01)
    ref32 = reference.inverse_factor(H.float(), 0.01)
    U = hinv_factor(H.float(), 0.01)
    scale = truth.abs().max()
    torch_err = float((ref32.double() - truth).abs().max() / scale)
    err = float((U.double() - truth).abs().max() / scale)
    assert err <= 4 * torch_err + 1e-6, (err, torch_err)
    assert hinv_factor(-torch.eye(c, device="cuda"), 0.01) is None


@cuda_compiled
def test_cuda_masks_match_reference():
    from sparsegpt_kernels import reference
    from sparsegpt_kernels.ops.nm_mask import nm_keep_mask_triton
    from sparsegpt_kernels.ops.sweep import unstructured_prune_mask_triton

    s = torch.randint(0, 5, (1031, 1024), device="cuda").float()
    for n, m in [(2, 4), (1, 4), (2, 8), (4, 8)]:
        assert torch.equal(nm_keep_mask_triton(s, n, m), reference.nm_keep_mask(s, n, m))
    for k in [1, 12345, s.numel() // 2, s.numel() - 1]:
        assert torch.equal(unstructured_prune_mask_triton(s, k), reference.unstructured_prune_mask(s, k))
    r = torch.randn(1031, 1024, device="cuda")
    assert torch.equal(unstructured_prune_mask_triton(r, 5000), reference.unstructured_prune_mask(r, 5000))


@cuda_compiled
@pytest.mark.parametrize("mode", ["50%", "2:4", "4:8"])
def test_cuda_sweep_matches_reference(mode):
    from sparsegpt_kernels import reference
    from sparsegpt_kernels.ops.sweep import sweep_triton
    from sparsegpt_kernels.spec import SweepSpec

    kw = {"50%": dict(sparsity=0.5, n=None, m=None), "2:4": dict(sparsity=0.5, n=2, m=4),
          "4:8": dict(sparsity=0.5, n=4, m=8)}[mode]
    X = correlated_inputs(2048, 1000, seed=9).cuda()
    U = reference.inverse_factor(hessian_of(X), 0.01).contiguous()
    W = torch.randn(777, 1000, device="cuda")
    Wr, Wk = W.clone(), W.clone()
    loss_ref = reference.sweep(Wr, U, SweepSpec(block_size=128, **kw))
    loss = float(sweep_triton(Wk, U, block_size=128, **kw))
    assert abs(loss - loss_ref) <= 1e-3 * loss_ref
    assert recon_error(X, W, Wk) <= 1.01 * recon_error(X, W, Wr)
    assert float(((Wk == 0) != (Wr == 0)).float().mean()) <= 0.01


@cuda_compiled
def test_cuda_opcheck():
    from sparsegpt_kernels import reference

    ops = torch.ops.sparsegpt_kernels
    s = torch.randn(64, 128, device="cuda")
    torch.library.opcheck(ops.nm_keep_mask.default, (s, 2, 4))
    torch.library.opcheck(ops.unstructured_prune_mask.default, (s, 1000))
    X = correlated_inputs(512, 128, seed=10).cuda()
    H = hessian_of(X)
    torch.library.opcheck(ops.hinv_factor.default, (H, 0.01))
    U = reference.inverse_factor(H, 0.01).contiguous()
    W = torch.randn(64, 128, device="cuda")
    torch.library.opcheck(ops.sweep_block.default, (W, U, 0, 64, 0.5, 2, 4, None, None, 0, 0))
