"""The dispatch point: backend selection, clean fallback without cupy or without a driver,
clear errors, argument validation, and the cupy launch glue (against a recording fake)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from pclayer.cuda import cupy_runner
from pclayer.ops import dispatch
from pclayer.ops.log_matmul_exp import log_matmul_exp


@pytest.fixture
def fresh_probe():
    dispatch.cuda_unavailable_reason.cache_clear()
    dispatch._runner.cache_clear()
    yield
    dispatch.cuda_unavailable_reason.cache_clear()
    dispatch._runner.cache_clear()


class _Record:
    """What the dispatcher writes the chosen backend into (a circuit's runtime in use)."""

    last_backend = None


def test_cpu_tensors_run_the_torch_path_and_say_so():
    x, logw = torch.randn(2, 3, 4), torch.log_softmax(torch.randn(3, 5, 4), -1)
    for backend in ("auto", "torch"):
        record = _Record()
        y = dispatch.sum_dense(x, logw, backend=backend, record=record)
        assert record.last_backend == "torch"
        torch.testing.assert_close(y, log_matmul_exp(x, logw))
    record = _Record()
    torch.testing.assert_close(dispatch.logsumexp(x, record=record), torch.logsumexp(x, -1))
    assert record.last_backend == "torch"


def test_forcing_cuda_where_it_cannot_run_is_a_clear_error():
    with pytest.raises(dispatch.BackendUnavailableError, match="backend='cuda' cannot run sum_dense: .*CUDA tensors"):
        dispatch.sum_dense(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), backend="cuda")
    with pytest.raises(ValueError, match="backend: expected one of"):
        dispatch.logsumexp(torch.zeros(2), backend="gpu")


def test_without_cupy_everything_falls_back(monkeypatch, fresh_probe):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    info = dispatch.backend_info()
    assert info["cuda_available"] is False
    assert "cupy cannot be imported" in info["cuda_unavailable_reason"]
    record = _Record()
    assert dispatch.inverse_cdf(torch.zeros(3, 4), torch.rand(3), record=record).shape == (3,)
    assert record.last_backend == "torch"


def test_installed_cupy_without_driver_falls_back(fresh_probe):
    pytest.importorskip("cupy", reason="cupy is not installed; install cupy-cuda13x to test the no-driver fallback")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    reason = dispatch.cuda_unavailable_reason()
    assert reason is not None and "cupy cannot use CUDA" in reason  # cudaErrorInsufficientDriver here
    assert dispatch.backend_info()["cuda_available"] is False
    x = torch.randn(2, 1, 3)
    record = _Record()
    torch.testing.assert_close(dispatch.sum_dense(x, torch.zeros(1, 2, 3), record=record), log_matmul_exp(x, torch.zeros(1, 2, 3)))
    assert record.last_backend == "torch"


def test_kernel_obstacles_name_the_problem():
    cpu = torch.zeros(2, 2)
    assert "CUDA tensors" in dispatch._kernel_obstacle((cpu,), True)
    meta = torch.zeros(2, 2, device="meta")
    assert "CUDA tensors, got tensors on ['cpu', 'meta']" in dispatch._kernel_obstacle((cpu, meta), True)


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match=r"logw: expected shape \(1 or 3, N, 4\)"):
        dispatch.sum_dense(torch.zeros(2, 3, 4), torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="x: expected a 3-d floating tensor"):
        dispatch.sum_dense(torch.zeros(2, 3), torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match=r"indices: expected categories in \[0, 6\)"):
        dispatch.categorical_topk_evidence(torch.zeros(1, 2, 3), torch.full((1, 2, 3), 6), torch.zeros(2, 4, 6))
    with pytest.raises(ValueError, match="indices: expected int64"):
        dispatch.categorical_topk_evidence(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, dtype=torch.int32), torch.zeros(2, 4, 6))
    with pytest.raises(ValueError, match="uniforms: expected values in"):
        dispatch.inverse_cdf(torch.zeros(2, 3), torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"uniforms: expected shape \(2,\)"):
        dispatch.inverse_cdf(torch.zeros(2, 3), torch.zeros(3))


def test_topk_torch_path_equals_dense_evidence_with_the_rest_masked():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    indices = torch.stack([torch.randperm(7, generator=g)[:4] for _ in range(6)]).view(3, 2, 4)
    table = torch.log_softmax(torch.randn(2, 5, 7, generator=g, dtype=torch.float64), -1)
    dense = torch.full((3, 2, 7), -torch.inf, dtype=torch.float64).scatter(2, indices, values)
    torch.testing.assert_close(dispatch.categorical_topk_evidence(values, indices, table), log_matmul_exp(dense, table))


class _Recorder:
    """A stand-in for cupy that records what the runner hands it."""

    def __init__(self, reject_fatbin: bool = False):
        self.reject_fatbin = reject_fatbin
        self.calls, self.modules, self.streams, self.wrapped = [], [], [], []
        recorder = self

        class RawModule:
            def __init__(self, path=None, code=None, options=()):
                self.path = path
                recorder.modules.append({"path": path, "code": code is not None, "options": options})

            def get_function(self, name):
                if self.path is not None and recorder.reject_fatbin:
                    raise RuntimeError("CUDA_ERROR_NO_BINARY_FOR_GPU")
                return lambda grid, block, args: recorder.calls.append((name, grid, block, args))

        class Context:
            def __init__(self, value):
                self.value = value

            def __enter__(self):
                recorder.streams.append(self.value)

            def __exit__(self, *exc):
                return False

        self.module = types.SimpleNamespace(
            RawModule=RawModule,
            asarray=lambda t: recorder.wrapped.append(t) or ("cupy-view", t.data_ptr()),
            cuda=types.SimpleNamespace(Device=Context, ExternalStream=Context),
        )


def test_cupy_runner_loads_the_fatbin_wraps_without_copy_and_uses_torchs_stream(monkeypatch):
    fake = _Recorder()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=4242))
    runner = cupy_runner.CupyRunner()
    a = torch.zeros(3, 5)
    y = torch.empty(3)
    runner("logsumexp_rows.cu", "pc_logsumexp_rows_fwd_f32", (1, 1, 1), (128, 1, 1), (a, y, np.int64(3), np.int32(5)))
    assert fake.modules[0]["path"].endswith("bin/logsumexp_rows.fatbin") and runner.sources == {"logsumexp_rows.cu": "fatbin"}
    name, grid, block, args = fake.calls[-1]
    assert name == "pc_logsumexp_rows_fwd_f32" and grid == (1, 1, 1) and block == (128, 1, 1)
    assert args[0] == ("cupy-view", a.data_ptr()) and args[1] == ("cupy-view", y.data_ptr())  # same memory
    assert type(args[2]) is np.int64 and type(args[3]) is np.int32
    assert 4242 in fake.streams


def test_cupy_runner_compiles_the_source_when_the_fatbin_does_not_fit_the_gpu(monkeypatch):
    fake = _Recorder(reject_fatbin=True)
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=1))
    runner = cupy_runner.CupyRunner()
    runner("inverse_cdf.cu", "pc_inverse_cdf_warp_f64", (1, 1, 1), (128, 1, 1),
           (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
            torch.zeros(2, dtype=torch.int64), np.int64(2), np.int32(3)))
    assert [m["code"] for m in fake.modules] == [False, True]
    assert fake.modules[1]["options"][0] == f"-I{cupy_runner.KERNEL_DIR}"
    assert runner.sources == {"inverse_cdf.cu": "nvrtc"} and fake.calls[-1][0] == "pc_inverse_cdf_warp_f64"


def test_auto_takes_the_torch_route_even_where_the_kernels_could_run(monkeypatch):
    """No kernel has been measured faster than torch's route on a GPU, so "auto" never picks
    one (pclayer/cuda/README.md argues each operation); "cuda" still forces them."""
    monkeypatch.setattr(dispatch, "_kernel_obstacle", lambda tensors, differentiable: None)
    for operation in ("sum_dense", "max_plus", "logsumexp", "categorical_topk_evidence", "inverse_cdf"):
        record = _Record()
        assert dispatch.choose_backend("auto", operation, (torch.zeros(1),), record=record) == "torch"
        assert record.last_backend == "torch"
        assert dispatch.choose_backend("cuda", operation, (torch.zeros(1),)) == "cuda"


def test_max_plus_has_no_backward_kernel_so_cuda_refuses_inputs_that_require_grad():
    x, logw = torch.randn(2, 1, 3, requires_grad=True), torch.randn(1, 4, 3)
    with pytest.raises(dispatch.BackendUnavailableError, match="max_plus: this operation has no backward kernel"):
        dispatch.max_plus(x, logw, backend="cuda")
    with torch.no_grad():
        with pytest.raises(dispatch.BackendUnavailableError, match="max_plus: the kernels need CUDA tensors"):
            dispatch.max_plus(x, logw, backend="cuda")
        torch.testing.assert_close(dispatch.max_plus(x, logw), (x[:, :, None, :] + logw[None]).amax(-1))


def test_fused_sampling_arguments_are_validated():
    logits, uniforms = torch.randn(3, 5), torch.rand(4)
    rows = torch.tensor([0, 2, 2, 1])
    with pytest.raises(ValueError, match="addend, addend_rows: expected both or neither"):
        dispatch.inverse_cdf(logits, uniforms, rows=rows, addend=torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"addend: expected \(S, 5\)"):
        dispatch.inverse_cdf(logits, uniforms, rows=rows, addend=torch.randn(2, 6), addend_rows=rows)
    with pytest.raises(ValueError, match="addend_rows: expected a 1-d int64 tensor of length 4"):
        dispatch.inverse_cdf(logits, uniforms, rows=rows, addend=torch.randn(2, 5), addend_rows=rows[:3])
    with pytest.raises(ValueError, match=r"uniforms: expected values in \[0, 1\] without NaN"):
        dispatch.inverse_cdf(logits, torch.tensor([0.5, 1.5, 0.0, 0.1]), rows=rows)
