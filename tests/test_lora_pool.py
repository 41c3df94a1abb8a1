"""LoRA read in place from pool pages by the native kernel, against a per-token reference."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from serving.engine import kernels, lora_pool
from serving.engine.adapter_store import build_host_adapter, unpack
from serving.engine.layout import SHARED_INPUT, TARGET_MODULES, ModelShape
from serving.engine.lora_pool import PoolLoraContext, adapter_rows
from serving.engine.lora_worker import LoraWorker
from serving.engine.pool import ADAPTER, KV, UnifiedPool
from tests.native_support import native_lib, require_native

SHAPE = ModelShape(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4,
                   num_kv_heads=2, head_dim=8, vocab_size=50)
KEYS = [(layer, m) for layer in range(SHAPE.num_layers) for m in TARGET_MODULES]
DIMS = SHAPE.module_dims()
COST_DIM = 96


@pytest.fixture(autouse=True)
def native():
    require_native()


@pytest.fixture(scope="module")
def lib():
    return native_lib(kernels.bgmv_lib)  # module fixtures set up before autouse ones


@pytest.fixture(params=["kernel", "worker"])
def worker_for(request):
    """kernel: the engine's thread runs the BGMV kernel after each base GEMM; worker: a worker
    thread computes each group's deltas (lora_worker.py). Returns dtype -> worker or None."""
    made: list[LoraWorker] = []

    def make(dtype):
        if request.param == "kernel":
            return None
        made.append(LoraWorker(native_lib(kernels.lora_worker_lib), dtype))
        return made[-1]

    yield make
    for w in made:
        w.close()


def _context(lib, slots, rows, worker=None):
    return PoolLoraContext(lib, slots, rows, KEYS, COST_DIM, worker,
                           [DIMS[m][1] for _, m in KEYS])


def _inputs(n, dtype=torch.float32, seed=0):
    """Per key, in call order: x (one per group of modules reading the same input, as in the
    model) and y0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(SHAPE.num_layers):
        for group in SHARED_INPUT:
            x = torch.randn(n, DIMS[group[0]][0], generator=g).to(dtype)
            for m in group:
                out.append(((layer, m), x, torch.randn(n, DIMS[m][1], generator=g).to(dtype)))
    return out


def _run(ctx, key, x, y0):
    """What the model does around a target module's base GEMM."""
    ctx.begin(*key, x)
    y = ctx.apply(*key, x, y0.clone())
    return y


def _adapter(name, rank, seed, modules=TARGET_MODULES, bias=False, ranks=None):
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(SHAPE.num_layers):
        for m in modules:
            r = (ranks or {}).get(m, rank)
            d_in, d_out = DIMS[m]
            weights[(layer, m)] = (torch.randn(r, d_in, generator=g) / d_in**0.5,
                                   torch.randn(d_out, r, generator=g) / r**0.5,
                                   torch.randn(d_out, generator=g) if bias else None)
    return build_host_adapter(name, weights, SHAPE)


def _reference(adapters, slots, key, x):
    out = torch.zeros(x.shape[0], DIMS[key[1]][1], dtype=torch.float64)
    for t, s in enumerate(slots):
        if s >= 0 and key in adapters[s].layout:
            A, B, bias = unpack(adapters[s].flat, adapters[s].layout[key])
            out[t] = B.double() @ (A.double() @ x[t].double())
            if bias is not None:
                out[t] += bias.double()
    return out


def _check(ctx, adapters, slots, seed=0):
    for key, x, y0 in _inputs(len(slots), seed=seed):
        y = _run(ctx, key, x, y0)
        torch.testing.assert_close(y.double() - y0.double(), _reference(adapters, slots, key, x),
                                   atol=1e-5, rtol=1e-5)


def _mix():
    return [_adapter("r8", 8, 1), _adapter("r2-qv", 2, 2, modules=("q_proj", "v_proj")),
            _adapter("biased", 4, 3, bias=True), _adapter("r16", 16, 4),
            _adapter("patterned", 8, 5, ranks={"up_proj": 2, "o_proj": 1})]


@pytest.mark.parametrize("gemm_macs", [lora_pool.RUN_GEMM_MACS, 3_000, 1])
def test_mixed_batch_matches_reference(lib, monkeypatch, gemm_macs, worker_for):
    """Prefill chunks then decode tokens, bare tokens among them, adapters of different ranks,
    targets, rank patterns and biases; adapters with many tokens to GEMM pairs at three
    thresholds (none, some, all), on views where their tokens are consecutive (3 and 4: a
    prefill chunk only) and gathered where not (2: a chunk and decode tokens)."""
    monkeypatch.setattr(lora_pool, "RUN_GEMM_MACS", gemm_macs)
    monkeypatch.setattr(lora_pool, "RUN_GEMM_MACS_WORKER", gemm_macs)
    adapters = _mix()
    rng = random.Random(gemm_macs)
    slots = [3] * 40 + [-1] * 5 + [4] * 9 + [2] * 12
    slots += [rng.choice([-1, 0, 1, 2]) for _ in range(30)] + [2]
    rows = [adapter_rows(a, a.flat, KEYS) for a in adapters]
    ctx = _context(lib, slots, rows, worker_for(torch.float32))
    if gemm_macs == 1:
        assert all(not bool(ctx.where[m, 3].any()) for m in range(len(KEYS)))
    if gemm_macs == 3_000:
        assert any(ctx.where[m, 3].any() for m in range(len(KEYS)))
        spans = {j: type(span) for runs in ctx.runs.values() for span, j in runs}
        assert spans[3] is slice and spans[4] is slice and spans[2] is torch.Tensor
    _check(ctx, adapters, slots)
    if ctx.worker is not None:
        assert not ctx.worker.pending
        stats = ctx.worker.stats()
        assert (stats["worker_chunks"] + stats["caller_chunks"] > 0) == (gemm_macs != 1)


@pytest.mark.parametrize("gemm_macs", [lora_pool.RUN_GEMM_MACS, 1])
def test_bfloat16_batch_matches_reference(lib, monkeypatch, gemm_macs, worker_for):
    """Adapters resident in bfloat16 (a bf16 engine's pool): the kernel reads them in place and
    sums in float32, so each output is the exact delta rounded once; GEMM-pair runs (bf16 torch
    GEMMs, h rounded too) stay within bf16's own error."""
    monkeypatch.setattr(lora_pool, "RUN_GEMM_MACS", gemm_macs)
    monkeypatch.setattr(lora_pool, "RUN_GEMM_MACS_WORKER", gemm_macs)
    adapters = _mix()
    flats = [a.flat.bfloat16() for a in adapters]
    slots = [3] * 20 + [-1] * 3 + [0, 1, 2, 4, -1, 2, 0, 4, 3, 1]
    ctx = _context(lib, slots, [adapter_rows(a, f, KEYS) for a, f in
                                zip(adapters, flats, strict=True)], worker_for(torch.bfloat16))
    assert (gemm_macs == 1) == bool(ctx.runs)
    rounded = [replace(a, flat=f.float()) for a, f in zip(adapters, flats, strict=True)]
    for key, x, y0 in _inputs(len(slots), torch.bfloat16, seed=3):
        y = _run(ctx, key, x, y0)
        assert y.dtype == torch.bfloat16
        want = y0.double() + _reference(rounded, slots, key, x.float())
        if gemm_macs == 1:
            torch.testing.assert_close(y.double(), want, atol=3e-2, rtol=2e-2)
        else:  # one rounding of the exact sum: within half a bf16 ulp, plus float32's error
            torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=2**-8 + 1e-5)


def test_rank_past_one_kernel_chunk_and_strided_inputs(lib):
    """Ranks above the kernel's 256-row chunk are done in passes; x with a row stride above
    its width is read in place, and a non-unit feature stride is made contiguous first."""
    adapters = [_adapter("big", 300, 6, modules=("q_proj",)), _adapter("r3", 3, 7)]
    slots = [0, 1, -1, 0, 1]
    ctx = PoolLoraContext(lib, slots, [adapter_rows(a, a.flat, KEYS) for a in adapters], KEYS,
                          COST_DIM)
    key = (1, "q_proj")
    wide = torch.randn(len(slots), 50)
    for x in (wide[:, :32], torch.randn(32, len(slots)).T):
        y = ctx.apply(*key, x, torch.zeros(len(slots), 32))
        torch.testing.assert_close(y.double(), _reference(adapters, slots, key, x),
                                   atol=1e-4, rtol=1e-5)


def test_edge_cases_and_bad_slots(lib):
    a = _adapter("r4", 4, 8)
    rows = [adapter_rows(a, a.flat, KEYS)]
    for slots in ([], [-1, -1]):
        ctx = PoolLoraContext(lib, slots, rows, KEYS, COST_DIM)
        y = torch.randn(len(slots), 32)
        assert torch.equal(ctx.apply(0, "q_proj", torch.randn(len(slots), 32), y.clone()), y)
    ctx = PoolLoraContext(lib, [0], rows, KEYS, COST_DIM)
    y = torch.randn(1, 32)
    assert ctx.apply(9, "q_proj", torch.randn(1, 32), y) is y  # a module nobody targets
    with pytest.raises(ValueError, match="token slots"):
        PoolLoraContext(lib, [1], rows, KEYS, COST_DIM)
    with pytest.raises(ValueError, match="do not match"):
        kernels.bgmv(lib, torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="flat float32 or bfloat16"):
        adapter_rows(a, a.flat.double(), KEYS)
    with pytest.raises(ValueError, match="x is torch.float32 but y is torch.bfloat16"):
        kernels.bgmv(lib, torch.zeros(2, 4, dtype=torch.bfloat16), torch.zeros(2, 4),
                     torch.zeros(4, 2, dtype=torch.long))


def test_reads_adapters_in_place_from_consecutive_pool_pages(lib):
    """The cache's adapters take a run of consecutive pages, so their weights are one view of
    the pool: the kernel reads them there. Scattered pages (no run free) are copied once."""
    pool = UnifiedPool(64, SHAPE, block_size=16)
    a, b = _adapter("r8", 8, 1), _adapter("biased", 4, 3, bias=True)
    need = pool.pages_for(a.flat.numel())
    assert need > 1
    kv = pool.alloc(6, KV)
    pool.free(kv[1::2])  # holes of one page: a run must skip them
    pages = pool.alloc(need, ADAPTER, consecutive=True)
    assert pages == list(range(5, 5 + need))  # the lowest run: past the holes at 1 and 3
    pool.write_flat(pages, a.flat)
    flat = pool.read_flat(pages)
    assert flat.data_ptr() == pool.storage[pages[0]].data_ptr()  # a view, not a copy
    rows = adapter_rows(a, flat, KEYS)
    assert rows.valid()
    # Scattered: odd pages only, so no two are consecutive.
    spread = UnifiedPool(64, SHAPE, block_size=16)
    taken = spread.alloc(64, KV)
    spread.free(taken[1::2])
    assert spread.alloc(need, ADAPTER, consecutive=True) != list(range(need))  # falls back
    slots = [0, 1, 1, -1, 0]
    ctx = PoolLoraContext(lib, slots, [rows, adapter_rows(b, b.flat.clone(), KEYS, True)], KEYS,
                          COST_DIM)
    _check(ctx, [a, b], slots)
    # A storage that moves (share_memory_ reallocates) invalidates the addresses.
    moved = adapter_rows(b, b.flat.clone(), KEYS)
    moved.flat.share_memory_()
    assert not moved.valid()


# -- the kernel library: build, cache, fallbacks ----------------------------------------------
def test_native_is_not_taken_where_it_cannot_serve(lib):
    """float64, mixed dtypes, non-unit feature strides and tensors autograd must see keep the
    torch paths."""
    x = torch.randn(3, 4)
    assert kernels.bgmv_usable(x, x) and kernels.bgmv_usable(x.bfloat16(), x.bfloat16())
    assert not kernels.bgmv_usable(x.double()) and not kernels.bgmv_usable(x, x.bfloat16())
    assert not kernels.bgmv_usable(x.T)
    w = torch.randn(3, 4, requires_grad=True)
    assert not kernels.bgmv_usable(x, w)
    with torch.no_grad():
        assert kernels.bgmv_usable(x, w)


def test_off_by_environment(monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_NATIVE_KERNELS", "0")
    assert kernels.bgmv_lib() is None and not kernels.bgmv_usable(torch.randn(2, 4))


def test_build_is_cached_and_failures_fall_back(tmp_path, caplog):
    lib = kernels.NativeLib(tmp_path / "k")
    path = lib.build()
    assert lib.load() is not None
    mtime = path.stat().st_mtime_ns
    assert kernels.NativeLib(tmp_path / "k").build() == path and path.stat().st_mtime_ns == mtime
    # A compiler that fails, or is missing, gives None with one warning, never an exception.
    for compiler in (["false"], [str(tmp_path / "no-such-cc")]):
        bad = kernels.NativeLib(tmp_path / "bad", compiler=compiler)
        with caplog.at_level("WARNING", logger="serving.engine.kernels"):
            assert bad.load() is None and bad.load() is None
        assert sum("native LoRA kernel unavailable" in r.message for r in caplog.records) == 1
        caplog.clear()
        with pytest.raises(kernels.KernelBuildError):
            bad.build()
    assert not list(tmp_path.glob("bad/*"))  # no half-written library left behind


@pytest.mark.parametrize("spec", kernels.KERNELS, ids=lambda s: s.stem)
def test_library_of_another_abi_or_without_its_function_is_refused(tmp_path, spec):
    fn = next(iter(spec.functions))
    for abi, body in ((999, f"void {fn}(void) {{}}"), (spec.abi, "")):
        src = tmp_path / f"{abi}" / spec.source.name
        src.parent.mkdir()
        src.write_text(f"int {spec.stem}_abi(void) {{ return {abi}; }}\n{body}\n")
        assert kernels.NativeLib(tmp_path / "k", source=src, spec=spec).load() is None


def test_a_changed_header_is_a_new_build(tmp_path):
    """The kernels include elements.h: a library built before the header changed is stale."""
    src = tmp_path / "src" / "bgmv.c"
    src.parent.mkdir()
    src.write_text('#include "elements.h"\nint bgmv_abi(void) { return ABI; }\n'
                   'void bgmv_f32(void) {}\nint bgmv_bf16(void) { return 0; }\n')
    header = src.parent / "elements.h"
    header.write_text(f"#define ABI {kernels.BGMV.abi}\n")
    first = kernels.NativeLib(tmp_path / "k", source=src)
    built = first.build()
    assert first.load() is not None
    header.write_text("#define ABI 999\n")
    second = kernels.NativeLib(tmp_path / "k", source=src)
    assert second.build() != built and second.load() is None  # rebuilt, then refused


def test_prebuilt_library_serves_where_no_compiler_is(tmp_path, monkeypatch):
    """A container image builds the kernel in its build stage and ships no compiler."""
    path = kernels.NativeLib(tmp_path / "k").build()
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(kernels.sysconfig, "get_config_var", lambda name: None)
    assert not kernels.compiler_available()
    assert kernels.NativeLib(tmp_path / "k").build() == path
    assert kernels.NativeLib(tmp_path / "k").load() is not None
    with pytest.raises(kernels.KernelBuildError, match="no C compiler"):
        kernels.NativeLib(tmp_path / "none").build()


def test_an_adapter_with_nearly_every_token_multiplies_them_all(lib, monkeypatch):
    """Scattered tokens of one adapter that are nearly all the step's: two GEMMs over every
    row, the others' rows zeroed (no gather, no scatter); with a bias, the gathered path."""
    monkeypatch.setattr(lora_pool, "RUN_GEMM_MACS", 1_000)
    monkeypatch.setattr(lora_pool, "RUN_GEMM_MACS_WORKER", 1_000)
    adapters = [_adapter("r8", 8, 1), _adapter("r2", 2, 2), _adapter("biased", 8, 3, bias=True)]
    for main, other in ((0, 1), (2, 1)):
        slots = [main, main, other, main, -1, main, main, main, main, main]
        ctx = PoolLoraContext(lib, slots, [adapter_rows(a, a.flat, KEYS) for a in adapters],
                              KEYS, COST_DIM)
        span = next(s for s, j in ctx.runs[0] if j == main)
        assert span.dtype == (torch.bool if main == 0 else torch.long)
        _check(ctx, adapters, slots)


def test_prebuild_command_reports_failures_in_one_line(tmp_path):
    """``python -m serving.engine.kernels`` (setup and the image run it): each library's path,
    or exit 1 with the reason, never a traceback."""
    import os
    import subprocess
    import sys
    run = dict(capture_output=True, text=True, timeout=120)
    ok = subprocess.run([sys.executable, "-m", "serving.engine.kernels"], **run,
                        env={**os.environ, "ADAPTERHUB_KERNELS_DIR": str(tmp_path / "k")})
    built = ok.stdout.split()
    assert ok.returncode == 0 and len(built) == len(kernels.KERNELS), ok.stderr
    assert all(path.endswith(".so") for path in built)
    (tmp_path / "file").write_text("not a directory")
    for env in ({"ADAPTERHUB_KERNELS_DIR": str(tmp_path / "file")},
                {"ADAPTERHUB_KERNELS_DIR": str(tmp_path / "bad"), "CC": "false"}):
        bad = subprocess.run([sys.executable, "-m", "serving.engine.kernels"], **run,
                             env={**os.environ, **env})
        assert bad.returncode == 1 and bad.stderr.startswith("error: "), bad.stderr
        assert "Traceback" not in bad.stderr


def test_worker_refuses_a_group_member_reading_another_input(lib):
    """q, k and v are one worker job on the premise that they project the same x: a k that
    reads another tensor is a model the worker does not fit, and fails loudly."""
    a = _adapter("r4", 4, 8)
    worker = LoraWorker(native_lib(kernels.lora_worker_lib), torch.float32)
    ctx = _context(lib, [0, 0, -1], [adapter_rows(a, a.flat, KEYS)], worker)
    x = torch.randn(3, 32)
    ctx.begin(0, "q_proj", x)
    ctx.apply(0, "q_proj", x, torch.zeros(3, 32))
    with pytest.raises(RuntimeError, match="does not read its group's input"):
        ctx.begin(0, "k_proj", x.clone())
    ctx.finish()
    assert not worker.pending
    worker.close()
