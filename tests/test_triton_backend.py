"""The ``triton`` backend through prune_layer: availability, reconstruction error vs the torch backend, patterns."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import (
    assert_exact_sparsity,
    check_backend_like_torch,
    correlated_inputs,
    hessian_of,
    problem_without_near_ties,
    recon_error,
    spec_of,
)

import sparsegpt_kernels as sk
from sparsegpt_kernels.backends import available_backends, select_backend
from sparsegpt_kernels.backends._triton import BACKEND as _triton


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
def cuda_compiled(fn):
    """A compiled-kernel test: marked ``gpu`` (the second, non-interpreted pytest run of scripts/test.sh on a CUDA
    machine selects these) and skipped without a CUDA device or under the interpreter."""
    skip = pytest.mark.skipif(
        not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
        reason="needs a CUDA device and TRITON_INTERPRET=0 (compiled kernels)",
    )
    return pytest.mark.gpu(skip(fn))

# prune_layer modes of the Triton backend (cols: 199 for unstructured (a partial last block of 7), 200 for N:M and
# grouped quantization)
MODES = {
    "50%": dict(sparsity=0.5),
    "70%": dict(sparsity=0.7),
    "2:4": dict(pattern="2:4"),
    "4:8": dict(pattern="4:8"),
    "50%+4bit": dict(sparsity=0.5, quant_bits=4),
    "2:4+4bit/g40": dict(pattern="2:4", quant_bits=4, quant_group_size=40),
}


def _cols(kw: dict) -> int:
    return 200 if ("pattern" in kw or "quant_group_size" in kw) else 199


@pytest.mark.parametrize("mode", list(MODES))
def test_prune_layer_like_torch(mode, poison_empty):
    """Under the interpreter: same masks, exact counts, same loss as the torch backend; one dead input column."""
    kw = MODES[mode]
    check_backend_like_torch("triton", "cpu", kw, rows=33, cols=_cols(kw), block_size=64, dead=1)


def test_ties_broken_like_the_reference(poison_empty):
    _check_ties("cpu")


def _check_ties(device: str) -> None:
    """A diagonal Hessian (no updates between columns) and integer weights: every score is exact and many are equal,
    so the tie rules alone decide, and the sweep must equal the reference's bit for bit. Both sweeps get the same
    factor: the GPU's own (cuSOLVER through ATen) can differ from LAPACK's in the last bit of one diagonal entry
    (column 0 on the H200), which turns those exact ties into near-ties decided by rounding. On the CPU the whole
    prune_layer call is compared too (both backends factor with the same LAPACK there)."""
    from sparsegpt_kernels import reference
    from sparsegpt_kernels.spec import SweepSpec

    cols = 64
    H = torch.diag(torch.tensor([4.0, 1.0] * (cols // 2)))
    U = reference.inverse_factor(H, 0.01)
    for seed in range(4):
        W = torch.randint(-2, 3, (9, cols), generator=torch.Generator().manual_seed(seed)).float()
        for kw, spec in (({"sparsity": 0.5}, SweepSpec(0.5, None, None, 32)),
                         ({"sparsity": 0.3}, SweepSpec(0.3, None, None, 32)),
                         ({"pattern": "2:4"}, SweepSpec(0.5, 2, 4, 32)),
                         ({"pattern": "1:4"}, SweepSpec(0.75, 1, 4, 32))):
            Wk, Wt = W.to(device, copy=True), W.clone()
            loss_k = _triton.sweep(Wk, U.to(device), spec)
            loss_t = reference.sweep(Wt, U, spec)
            assert torch.equal(Wk.cpu(), Wt), (seed, kw)
            assert loss_k == pytest.approx(loss_t, rel=1e-6), (seed, kw)
            if device == "cpu":
                Wk, Wt = W.clone(), W.clone()
                sk.prune_layer(Wk, H, block_size=32, backend="triton", **kw)
                sk.prune_layer(Wt, H, block_size=32, backend="torch", **kw)
                assert torch.equal(Wk, Wt), (seed, kw)


def test_float64_layer_is_computed_in_float32():
    """The Triton backend solves a float64 layer in float32 and casts back (its module docstring says so): the same
    masks as the float64 torch solve on a problem without near-ties, the weights off by float32 rounding (not
    float64's), and the reconstruction error within 1% either way."""
    X, W64, H, _, _ = problem_without_near_ties(48, 128, spec_of({"pattern": "2:4"}, 64), seed=5)
    Wt, Wk = W64.clone(), W64.clone()
    sk.prune_layer(Wt, H, pattern="2:4", block_size=64, backend="torch")
    sk.prune_layer(Wk, H, pattern="2:4", block_size=64, backend="triton")
    assert Wk.dtype == torch.float64
    assert_exact_sparsity(Wk, block_size=64, pattern="2:4")
    assert torch.equal(Wk == 0, Wt == 0)
    rel = float((Wk - Wt).abs().max() / Wt.abs().max())
    assert 1e-12 < rel <= 1e-4, rel
    ratio = recon_error(X, W64, Wk) / recon_error(X, W64, Wt)
    assert 0.99 <= ratio <= 1.01, ratio


def test_block_size_limit(monkeypatch):
    """The sweep holds a block in registers: wider blocks are refused up front, with the weight untouched."""
    from sparsegpt_kernels.ops import sweep

    limit = sweep.SWEEP_MAX_BLOCK
    W = torch.randn(8, 2 * limit)
    W0 = W.clone()
    H = hessian_of(correlated_inputs(4 * limit, 2 * limit))
    factored = []
    monkeypatch.setattr(_triton, "factor", lambda *a: factored.append(1))
    with pytest.raises(ValueError, match=f"wider than the triton backend supports \\({limit} columns\\)"):
        sk.prune_layer(W, H, block_size=limit + 1, backend="triton")
    assert torch.equal(W, W0) and not factored  # refused before any work
    with pytest.raises(ValueError, match="above its limit"):
        torch.ops.sparsegpt_kernels.sweep_block(W, torch.eye(2 * limit), 0, limit + 16, 0.5, 0, 0, None, None, 0, 0)
    assert torch.equal(W, W0)


def test_autotune_candidates_fit_every_allowed_block():
    """Every block width up to the limit keeps at least two candidates whose tile fits in registers; the next power
    of two keeps none (which is why the limit is where it is)."""
    from sparsegpt_kernels.ops import sweep

    for bp in (16, 32, 64, 128, sweep.SWEEP_MAX_BLOCK):
        fits = sweep._fitting_sweep_configs(sweep.SWEEP_CONFIGS, {}, BP=bp)
        assert len(fits) >= 2 and all(sweep.sweep_config_fits(c, bp) for c in fits), bp
    assert len(sweep._fitting_sweep_configs(sweep.SWEEP_CONFIGS, {}, BP=128)) == len(sweep.SWEEP_CONFIGS)
    assert sweep._fitting_sweep_configs(sweep.SWEEP_CONFIGS, {}, BP=2 * sweep.SWEEP_MAX_BLOCK) == []


# --------------------------------------------------------------------------------------------------------------------
# Compiled kernels on a GPU (second pytest process of scripts/test.sh on a CUDA machine, and benchmarks/gpu_check.sh)
# --------------------------------------------------------------------------------------------------------------------
@cuda_compiled
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_prune_layer_like_torch(mode, rows, poison_empty):
    kw = MODES[mode]
    check_backend_like_torch("triton", "cuda", kw, rows=rows, cols=_cols(kw), block_size=64, dead=1, seed=rows)


@cuda_compiled
@pytest.mark.parametrize("mode", ["50%", "2:4", "50%+4bit"])
def test_cuda_many_rows(mode, poison_empty):
    """777 rows (partial row tiles for every candidate), default block size: exact counts, loss, error; on this many
    decisions a few near-ties are expected, so masks may differ in at most 0.1% of the weights."""
    kw = MODES[mode]
    cols = _cols(kw)
    X = correlated_inputs(4 * cols, cols, seed=11).cuda()
    H = hessian_of(X)
    W = torch.randn(777, cols, device="cuda", generator=torch.Generator("cuda").manual_seed(11))
    Wt, Wk = W.clone(), W.clone()
    rt = sk.prune_layer(Wt, H, backend="torch", **kw)
    rk = sk.prune_layer(Wk, H, backend="triton", **kw)
    assert rk.backend == "triton"
    assert_exact_sparsity(Wk, block_size=128, sparsity=kw.get("sparsity", 0.5), pattern=kw.get("pattern"),
                          quantized="quant_bits" in kw)
    assert abs(rk.loss - rt.loss) <= 1e-3 * rt.loss
    assert float(((Wk == 0) != (Wt == 0)).float().mean()) <= 1e-3
    e_k, e_t = recon_error(X, W, Wk), recon_error(X, W, Wt)
    assert abs(e_k - e_t) <= 0.01 * e_t


@cuda_compiled
def test_cuda_ties_broken_like_the_reference(poison_empty):
    _check_ties("cuda")


@cuda_compiled
def test_cuda_autotuned_loss_is_not_overcounted(poison_empty):
    """The first launch of a new autotune key tries every config on the real buffers; the loss must still be the
    loss of the chosen launch alone (a fresh key: a row count used nowhere else)."""
    from sparsegpt_kernels import reference
    from sparsegpt_kernels.ops.sweep import sweep_triton

    X = correlated_inputs(1024, 256, seed=12).cuda()
    U = reference.inverse_factor(hessian_of(X), 0.01).contiguous()
    W = torch.randn(1237, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(12))
    first, second = W.clone(), W.clone()
    l1 = float(sweep_triton(first, U, sparsity=0.5, n=None, m=None, block_size=128))  # tunes
    l2 = float(sweep_triton(second, U, sparsity=0.5, n=None, m=None, block_size=128))  # cached config
    assert torch.equal(first, second) and l1 == l2


_COMPILE_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sparsegpt_kernels.ops import nm_mask, sweep

def jit_fn(k):
    while not isinstance(k, triton.runtime.jit.JITFunction):
        k = k.fn
    return k

def compile_for_sm90(kernel, types, consts, num_warps):
    fn = jit_fn(kernel)
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps})

F, I8, I32 = "*fp32", "*i8", "*i32"
c = nm_mask.CONFIGS[0]
compile_for_sm90(nm_mask._nm_keep_mask_kernel, dict(s_ptr=F, out_ptr=I8), dict(N=2, M=4, **c.kwargs), c.num_warps)
sel = dict(src_ptr=F, d_ptr=F, hist_ptr=I32, ties_ptr=I32, mask_ptr=I8)
BR = sweep.SELECT_BR_GPU
for p in (0, 3):
    compile_for_sm90(sweep._radix_hist_kernel, sel, dict(PASS=p, HAS_D=True, BR=BR, BC=128), 4)
compile_for_sm90(sweep._tie_count_kernel, sel, dict(HAS_D=True, BR=BR, BC=128), 4)
for sum_ties in (0, sweep.SUM_TIES_MAX):
    compile_for_sm90(sweep._prune_mask_kernel, sel, dict(HAS_D=True, BR=BR, BC=128, SUM_TIES=sum_ties), 4)
sw = dict(w_ptr=F, u_ptr=F, mask_ptr=I8, e_ptr=F, loss_ptr=F, qs_ptr=F, qz_ptr=F)
c = sweep.SWEEP_CONFIGS[0]
for mode in (dict(N=0, M=0, UNSTRUCT=True, QUANT=False), dict(N=2, M=4, UNSTRUCT=False, QUANT=True)):
    compile_for_sm90(sweep._sweep_block_kernel, sw, dict(**mode, BP=128, **c.kwargs), c.num_warps)

# the widest tile the backend accepts, with every candidate the autotuner tries there: no register spills
import re, subprocess, tempfile
from triton.backends.nvidia.compiler import get_ptxas
ptxas = get_ptxas(90).path
BP = sweep.SWEEP_MAX_BLOCK
for c in sweep._fitting_sweep_configs(sweep.SWEEP_CONFIGS, {}, BP=BP):
    for mode in (dict(N=0, M=0, UNSTRUCT=True, QUANT=True), dict(N=2, M=4, UNSTRUCT=False, QUANT=True),
                 dict(N=4, M=8, UNSTRUCT=False, QUANT=False)):
        k = compile_for_sm90(sweep._sweep_block_kernel, sw, dict(**mode, BP=BP, **c.kwargs), c.num_warps)
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(k.asm["ptx"])
        target = re.search(r"^\.target\s+(\w+)", k.asm["ptx"], re.M).group(1)
        log = subprocess.run([ptxas, "-v", "--gpu-name", target, f.name, "-o", os.devnull], capture_output=True,
                             text=True).stderr
        spill = int(re.search(r"(\d+) bytes spill stores", log).group(1))
        assert spill == 0, f"sweep kernel BP={BP} {c} {mode}: {spill} bytes spilled\n{log}"
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """Every kernel compiles for a Hopper GPU (Triton's own ptxas; no GPU needed): catches code that only the
    interpreter accepts; and the widest sweep tile the backend accepts does not spill registers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-4000:]


@cuda_compiled
def test_cuda_graph_sweep_matches_eager(poison_empty):
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
def test_cuda_masks_match_reference(poison_empty):
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
def test_cuda_sweep_matches_reference(mode, poison_empty):
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
    assert_exact_sparsity(Wk, block_size=128, pattern=None if kw["m"] is None else f"{kw['n']}:{kw['m']}")
    e_k, e_r = recon_error(X, W, Wk), recon_error(X, W, Wr)
    assert abs(e_k - e_r) <= 0.01 * e_r
    assert float(((Wk == 0) != (Wr == 0)).float().mean()) <= 1e-3


@cuda_compiled
def test_cuda_opcheck():
    from sparsegpt_kernels import reference

    ops = torch.ops.sparsegpt_kernels
    s = torch.randn(64, 128, device="cuda")
    torch.library.opcheck(ops.nm_keep_mask.default, (s, 2, 4))
    torch.library.opcheck(ops.unstructured_prune_mask.default, (s, 1000))
    X = correlated_inputs(512, 128, seed=10).cuda()
    H = hessian_of(X)
    U = reference.inverse_factor(H, 0.01).contiguous()
    W = torch.randn(64, 128, device="cuda")
    torch.library.opcheck(ops.sweep_block.default, (W, U, 0, 64, 0.5, 2, 4, None, None, 0, 0))
