"""The autotuned Triton launchers with every config tried, on the CPU.

On a GPU the autotuner runs every candidate config on the real arguments before the chosen one, so anything a trial
launch writes and the chosen launch does not is left behind (a GPU-only class of bug: under the interpreter the
launchers normally use one fixed config). Here the interpreter runs the autotuners themselves, with Triton's GPU timer
replaced by a CPU one, and with a rigged timer that makes each config the winner in turn: the results must equal the
untuned path bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from helpers import correlated_inputs, hessian_of

from sparsegpt_kernels import reference
from sparsegpt_kernels.ops import _common, nm_mask, sweep

pytestmark = pytest.mark.skipif(
    not _common.interpreting(), reason="runs the autotuners under the Triton interpreter (needs TRITON_INTERPRET=1)"
)


class RiggedBench:
    """Triton's ``do_bench`` replaced: runs each trial once (so its side effects happen) and reports the config at
    position ``winner`` of the candidate list as the fastest. The autotuner times its candidates in list order, once
    per new tuning key."""

    def __init__(self, n_configs: int, winner: int):
        self.n, self.winner, self.calls = n_configs, winner, 0

    def __call__(self, fn, quantiles=None):
        i = self.calls % self.n
        self.calls += 1
        fn()
        t = 1.0 if i == self.winner else 2.0
        return [t, t, t]


def _layer(rows: int, cols: int, seed: int = 0):
    X = correlated_inputs(4 * cols, cols, seed=seed)
    U = reference.inverse_factor(hessian_of(X), 0.01).contiguous()
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return W, U


MODES = {
    "50%": dict(sparsity=0.5, n=None, m=None),
    "2:4": dict(sparsity=0.5, n=2, m=4),
    "50%+4bit/g8": dict(sparsity=0.5, n=None, m=None, quant=(4, 8)),
}


def _sweep(W, U, mode):
    kw = dict(mode)
    quant = kw.pop("quant", None)
    if quant is not None:
        g = reference.make_quant_grid(W, *quant)
        kw.update(qscale=g.scale, qzero=g.zero, maxq=g.maxq, qgroup=g.group_size)
    Wk = W.clone()
    loss = sweep.sweep_triton(Wk, U, block_size=16, **kw)
    return Wk, float(loss)


_LARGEST_TILE = max(range(len(sweep.SWEEP_CONFIGS)), key=lambda i: sweep.SWEEP_CONFIGS[i].kwargs["BR"])


@pytest.mark.parametrize(
    "mode,winner",
    [("50%", i) for i in range(len(sweep.SWEEP_CONFIGS))] + [(m, _LARGEST_TILE) for m in MODES if m != "50%"],
)
def test_sweep_with_each_config_chosen(mode, winner, poison_empty):
    W, U = _layer(41, 32)  # 41 rows: a partial row tile for every candidate BR; two column blocks of 16
    W_untuned, loss_untuned = _sweep(W, U, MODES[mode])
    bench = RiggedBench(len(sweep.SWEEP_CONFIGS), winner)
    with _common.autotune_under_interpreter(bench):
        W_tuned, loss_tuned = _sweep(W, U, MODES[mode])
        chosen = sweep._sweep_block_kernel.best_config
    assert bench.calls == len(sweep.SWEEP_CONFIGS)  # one tuning round (both blocks share the key), every config
    want = sweep.SWEEP_CONFIGS[winner]
    assert (chosen.kwargs, chosen.num_warps) == (want.kwargs, want.num_warps)
    assert torch.equal(W_tuned, W_untuned)  # W is restored after every trial
    assert loss_tuned == loss_untuned  # no partial loss of a trial survives


def test_sweep_with_the_cpu_timer():
    W, U = _layer(37, 48, seed=1)
    W_untuned, loss_untuned = _sweep(W, U, MODES["2:4"])
    with _common.autotune_under_interpreter():
        W_tuned, loss_tuned = _sweep(W, U, MODES["2:4"])
    assert torch.equal(W_tuned, W_untuned) and loss_tuned == loss_untuned


@pytest.mark.parametrize("winner", range(len(nm_mask.CONFIGS)))
def test_nm_mask_with_each_config_chosen(winner, poison_empty):
    s = torch.randint(0, 4, (70, 136)).float()  # ties; 136 columns: partial column tiles for every candidate
    bench = RiggedBench(len(nm_mask.CONFIGS), winner)
    with _common.autotune_under_interpreter(bench):
        keep = nm_mask.nm_keep_mask_triton(s, 2, 4)
        chosen = nm_mask._nm_keep_mask_kernel.best_config
    assert bench.calls == len(nm_mask.CONFIGS) and chosen.kwargs == nm_mask.CONFIGS[winner].kwargs
    assert torch.equal(keep, reference.nm_keep_mask(s, 2, 4))


def test_autotune_switch_is_scoped():
    with _common.autotune_under_interpreter(RiggedBench(len(sweep.SWEEP_CONFIGS), 0)):
        assert _common.launchable(sweep._sweep_block_kernel)[1] == {}
    kernel, meta = _common.launchable(sweep._sweep_block_kernel)
    assert kernel is sweep._sweep_block_kernel.fn and meta["BR"] == sweep.SWEEP_INTERPRET_CONFIG.kwargs["BR"]
