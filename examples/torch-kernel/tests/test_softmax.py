"""The kernel's own tests through lmspec's Python API (no backend registration needed)."""

import numpy as np
import pytest
from lmspec_torch_kernel.kernels import softmax

import lmspec


def test_softmax_conforms():
    # the same searches, tolerance and properties as `lmspec run`, on the bare kernel
    lmspec.assert_conforms("softmax", lmspec.adapters.torch(softmax),
                           dtypes=["bfloat16", "float32"], max_examples=10)


def test_one_bfloat16_call_is_within_the_principled_tolerance():
    import torch

    x = torch.linspace(-4, 4, 12, dtype=torch.bfloat16).reshape(3, 4)
    verdict = lmspec.assert_close("softmax", (x,), {"axis": -1}, softmax(x), "bfloat16")
    # the atol this call earns in bfloat16: 2·(baseline error) + 4·√k·u·M, here M = max|x| = 4
    # (softmax moves by p·u·max|x| when its logits are rounded), about 0.13
    assert verdict.ok and 0 < verdict.tolerances["out"] < 0.25


def test_a_wrong_kernel_is_caught():
    import torch

    def no_shift(x, axis=-1):
        e = torch.exp(x)
        return e / e.sum(dim=axis, keepdim=True)

    with pytest.raises(AssertionError, match="softmax float32 forward: fail"):
        lmspec.assert_conforms("softmax", lmspec.adapters.torch(no_shift), dtypes=["float32"],
                               checks=["forward"], max_examples=20)
    assert np.isnan(lmspec.adapters.torch(no_shift)(np.array([100.0], np.float32))).all()
