"""RMSNorm and RoPE kernels (kernels/pointwise.c) against the torch code they replace on the
CPU, and their refusals of tensors they would misread."""

from __future__ import annotations

import pytest
import torch

from serving.engine import kernels
from serving.engine.rope import apply_rope
from tests.native_support import native_lib


@pytest.fixture(scope="module")
def lib():
    return native_lib(kernels.pointwise_lib)  # module fixtures set up before autouse ones


def _hf_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("rows", [0, 1, 33])
@pytest.mark.parametrize("dim", [64, 100, 512])
def test_rmsnorm_matches_hf(lib, rows: int, dim: int) -> None:
    g = torch.Generator().manual_seed(rows * dim)
    x = torch.randn(rows, dim + 7, generator=g)[:, :dim] * 3  # rows strided, as views may be
    w = torch.randn(dim, generator=g)
    torch.testing.assert_close(kernels.rmsnorm(lib, x, w, 1e-6), _hf_rmsnorm(x, w, 1e-6),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("heads", "head_dim"), [(1, 2), (8, 64), (3, 10)])
def test_rope_matches_the_torch_path(lib, monkeypatch, heads: int, head_dim: int) -> None:
    g = torch.Generator().manual_seed(heads)
    x = torch.randn(17, heads, head_dim, generator=g)
    angle = torch.randn(17, head_dim // 2, generator=g).repeat(1, 2)
    cos, sin = angle.cos(), angle.sin()
    ours = apply_rope(x, cos, sin)
    with monkeypatch.context() as m:
        m.setattr(kernels, "pointwise_lib", lambda: None)
        ref = apply_rope(x, cos, sin)
    assert ours.data_ptr() != x.data_ptr()  # a new tensor: x is left as it was
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def test_bfloat16_rmsnorm_is_hf_with_its_casts(lib, monkeypatch) -> None:
    """HF's bf16 LlamaRMSNorm: normalise in float32, round to bf16, times the bf16 weight; the
    kernel rounds at the same points, so it differs only where the float32 sum of squares (in
    another order) lands the normalised value on the other side of a bf16 rounding."""
    from serving.engine.model import RMSNorm

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(33, 512 + 3, generator=g)[:, :512] * 3).bfloat16()
    norm = RMSNorm(512, 1e-6, torch.bfloat16, "cpu")
    with torch.no_grad():
        norm.weight.copy_(torch.randn(512, generator=g))
    ours = kernels.rmsnorm(lib, x, norm.weight, 1e-6)
    with monkeypatch.context() as m:
        m.setattr(kernels, "pointwise_lib", lambda: None)
        ref = norm(x)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, atol=0, rtol=2**-7)
    assert (ours != ref).float().mean() < 0.01


def test_bfloat16_rope_is_the_torch_ops_exactly(lib, monkeypatch) -> None:
    """Torch's bf16 RoPE rounds each product and their sum; the kernel rounds at the same
    points, so the results are equal bit for bit."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(17, 8, 64, generator=g).bfloat16()
    angle = torch.randn(17, 32, generator=g).repeat(1, 2)
    cos, sin = angle.cos().bfloat16(), angle.sin().bfloat16()
    ours = apply_rope(x, cos, sin)
    with monkeypatch.context() as m:
        m.setattr(kernels, "pointwise_lib", lambda: None)
        ref = apply_rope(x, cos, sin)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, ref)


def test_shapes_that_would_be_misread_are_refused(lib) -> None:
    with pytest.raises(ValueError, match="do not match"):
        kernels.rmsnorm(lib, torch.randn(4, 8), torch.randn(7), 1e-6)
    with pytest.raises(ValueError, match="do not match"):
        kernels.rmsnorm(lib, torch.randn(4, 8), torch.randn(16)[::2], 1e-6)
    with pytest.raises(ValueError, match="do not match"):
        kernels.rope(lib, torch.randn(4, 2, 8), torch.randn(4, 6), torch.randn(4, 6))
    with pytest.raises(ValueError, match="do not match"):
        kernels.rope(lib, torch.randn(4, 2, 7), torch.randn(4, 7), torch.randn(4, 7))
    bf = torch.bfloat16  # one dtype for all: the kernel reads each by x's
    with pytest.raises(ValueError, match="do not match"):
        kernels.rmsnorm(lib, torch.randn(4, 8, dtype=bf), torch.randn(8), 1e-6)
    with pytest.raises(ValueError, match="do not match"):
        kernels.rope(lib, torch.randn(4, 2, 8, dtype=bf), torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="do not match"):
        kernels.rmsnorm(lib, torch.randn(4, 8).double(), torch.randn(8).double(), 1e-6)


def test_only_float32_or_bfloat16_cpu_tensors_outside_autograd() -> None:
    assert kernels.pointwise_usable(torch.randn(2, 4))
    assert kernels.pointwise_usable(torch.randn(2, 4, dtype=torch.bfloat16))
    assert not kernels.pointwise_usable(torch.randn(2, 4, dtype=torch.float64))
    assert not kernels.pointwise_usable(torch.randn(2, 4), torch.randn(4, dtype=torch.bfloat16))
    assert not kernels.pointwise_usable(torch.randn(4, 2).T)
    needs_grad = torch.randn(2, 4, requires_grad=True)
    assert not kernels.pointwise_usable(needs_grad)
    with torch.no_grad():
        assert kernels.pointwise_usable(needs_grad)
    assert kernels.pointwise_lib_for(torch.randn(2, 4, dtype=torch.float16)) is None
