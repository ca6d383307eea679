"""The CUDA kernels of fast/kernels/*.cu (TF32 implicit-GEMM convolution and helpers), launched by
fast/gpu.py and tabled by fast/layers.py.

Without a GPU they are still tested twice over: nvcc compiles the files for sm_90 (where nvcc is
installed), and tests/cuda_emulator.cpp runs the very same files on the CPU (where g++ is), one
std::thread per CUDA thread, with mma.sync emulated from the PTX ISA's fragment layout; the
results are compared with the NumPy layers of models.py. The ``gpu`` tests run the kernels
through CuPy.

TF32 keeps 10 mantissa bits, so the references take TF32-rounded inputs in float64: what is left
is float32 accumulation (relative 1e-6 of the largest value).
"""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dynloss import class_weights, loss_backward, loss_forward, to_device
from fast import gpu
from fast.layers import GPU_LAYERS
from fast.myrtle5 import conv3x3_backward, relu_avgpool2_backward, relu_conv3x3_backward
from fast.myrtle5 import myrtle5_loss_and_grads as fused_loss_and_grads
from models import avgpool2_forward, conv3x3_forward, im2col3x3, init_myrtle5
from models import myrtle5_loss_and_grads as reference_loss_and_grads

HERE = Path(__file__).resolve().parent
ACC_RTOL = 1e-5  # float32 accumulation over 9C = 576 terms, relative to the largest output
TF32_STEP_RTOL = 5e-2  # whole TF32 gradients against float64 (as benchmarks/gpu_check_myrtle5.py)
SHAPE = dict(N=3, H=8, W=6, C=64, CO=64)  # 144 pixels: a full and a partial 128-pixel block
WIDE = dict(N=2, H=4, W=8, C=128, CO=128)  # two tiles of output channels and of dW rows


def tf32_round(a):
    """Round float32 values to TF32 (10 mantissa bits), to nearest, ties away: cvt.rna.tf32.f32."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).copy()
    finite = (u & 0x7F800000) != 0x7F800000
    u[finite] += 0x1000
    return (u & 0xFFFFE000).view(np.float32)


def rel_err(a, b):
    """max |a - b| / max |b|; a may be a CuPy array."""
    a = a.get() if hasattr(a, "get") else a
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def setenv(monkeypatch, name, value):
    """Set a variable that gpu.config() reads, and make it read the environment again."""
    monkeypatch.setenv(name, value)
    gpu.config.cache_clear()


@pytest.fixture(autouse=True)
def fresh_gpu_config():
    """No test sees the settings another test left in gpu.config's cache."""
    gpu.config.cache_clear()
    yield
    gpu.config.cache_clear()


def tile_defines(tiles):
    return [f"-D{k}={v}" for k, v in zip(gpu.TILE_NAMES, tiles, strict=True)]


# ---------------------------------------------------------------------------------------------
# Without a GPU: compile, and emulate
# ---------------------------------------------------------------------------------------------


def test_default_tiles_fit_the_channel_rule():
    """implicit_split admits channel counts that are multiples of 64: every tile must divide 64."""
    BM, BN, threads = gpu.tile_shape(gpu.IGEMM_TILES)
    assert 64 % BN == 0 and 64 % gpu.IGEMM_TILES[4] == 0 and threads <= 1024
    BMw, BNw, threads_w = gpu.tile_shape(gpu.WGRAD_TILES)
    assert 64 % BMw == 0 and 64 % BNw == 0 and threads_w <= 1024


def test_direct_kernel_shared_memory_constant_matches_the_source():
    assert f"#define DIRECT_SMEM {gpu.DIRECT_SMEM_FLOATS}\n" in gpu.LAYERS_SOURCE.read_text()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("split", [0, 1], ids=["tf32", "3xtf32"])
@pytest.mark.parametrize("which", ["IGEMM_TILES", "WGRAD_TILES"])
def test_cuda_source_compiles_for_hopper_without_spills(tmp_path, which, split):
    cmd = ["nvcc", "-arch=sm_90", "-cubin", "-o", str(tmp_path / "conv.cubin"), "-Xptxas", "-v"]
    cmd += [f"-DSPLIT={split}"]
    proc = subprocess.run(
        cmd + tile_defines(getattr(gpu, which)) + [str(gpu.IGEMM_SOURCE)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "dynloss_conv3x3_igemm" in proc.stderr and "dynloss_conv3x3_wgrad" in proc.stderr
    spills = [line for line in proc.stderr.splitlines() if "spill" in line]
    assert spills and all(" 0 bytes spill stores, 0 bytes spill loads" in s for s in spills)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """Build tests/cuda_emulator.cpp for a tile tuple (cached); returns a runner."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    root = tmp_path_factory.mktemp("emulator")
    built = {}

    def run(tiles, *args, split=0):
        key = (tiles, split)
        if key not in built:
            exe = root / ("emu_" + "_".join(map(str, tiles)) + f"_split{split}")
            cmd = [
                "g++",
                "-std=c++20",
                "-O1",
                "-pthread",
                f"-I{gpu.KERNEL_DIR}",
                *tile_defines(tiles),
            ]
            cmd += [f"-DSPLIT={split}", str(HERE / "cuda_emulator.cpp"), "-o", str(exe)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 and "barrier" in proc.stderr:
                pytest.skip("this g++ lacks C++20 <barrier>")
            assert proc.returncode == 0, proc.stderr[-3000:]
            built[key] = exe
        proc = subprocess.run([str(built[key]), *map(str, args)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr

    return run


def write(d, **arrays):
    for name, a in arrays.items():
        np.ascontiguousarray(a, dtype=np.float32).tofile(d / f"{name}.f32")


def read(d, name, shape):
    return np.fromfile(d / f"{name}.f32", dtype=np.float32).reshape(shape)


def make_case(shape, seed=5):
    rng = np.random.default_rng(seed)
    N, H, W, C, CO = shape.values()
    return dict(
        x=rng.normal(size=(N, H, W, C)).astype(np.float32),
        w=rng.normal(size=(3, 3, C, CO)).astype(np.float32),
        bias=rng.normal(size=CO).astype(np.float32),
        gate=rng.normal(size=(N, H, W, CO)).astype(np.float32),
        dz=rng.normal(size=(N, H, W, CO)).astype(np.float32),
    )


@pytest.fixture(scope="module")
def conv_case():
    return make_case(SHAPE)


def operand(a, split):
    """What the tensor cores multiply, in float64: TF32-rounded values, or (3xTF32) the values."""
    return (a if split else tf32_round(a)).astype(np.float64)


@pytest.mark.parametrize("split", [0, 1], ids=["tf32", "3xtf32"])
@pytest.mark.parametrize(
    "mode, shape", [(0, SHAPE), (1, SHAPE), (2, SHAPE), (1, WIDE)], ids=["0", "1", "2", "1-wide"]
)
def test_emulated_implicit_conv_matches_numpy(emulator, tmp_path, mode, shape, split):
    """mode 0: conv + bias, 1: relu(conv + bias), 2: conv * 1[gate > 0]; SAME borders, a partial
    last block of pixels, non-square images, two blocks of output channels (WIDE). 3xTF32 is
    compared with the unrounded float64 convolution."""
    N, H, W, C, CO = shape.values()
    conv_case = make_case(shape)
    write(tmp_path, **conv_case)
    emulator(gpu.IGEMM_TILES, "igemm", tmp_path, N, H, W, C, CO, mode, split=split)
    out = read(tmp_path, "out", (N, H, W, CO))
    x64, w64 = (operand(conv_case[k], split) for k in ("x", "w"))
    z, _ = conv3x3_forward(x64, w64, np.zeros(CO))
    ref = {
        0: z + conv_case["bias"],
        1: np.maximum(z + conv_case["bias"], 0),
        2: z * (conv_case["gate"] > 0),
    }[mode]
    assert rel_err(out, ref) < ACC_RTOL


@pytest.mark.parametrize("split", [0, 1], ids=["tf32", "3xtf32"])
@pytest.mark.parametrize(
    "chunk, shape", [(32, SHAPE), (96, SHAPE), (96, WIDE)], ids=["32", "96", "96-wide"]
)
def test_emulated_weight_gradient_matches_numpy(emulator, tmp_path, chunk, shape, split):
    """dW = cols^T dz from per-chunk partial sums. 144 pixels in chunks of 96: the last chunk has
    48, so its second 32-pixel slice is partial; WIDE has two dW tiles in rows and in columns."""
    N, H, W, C, CO = shape.values()
    conv_case = make_case(shape)
    write(tmp_path, **conv_case)
    emulator(gpu.WGRAD_TILES, "wgrad", tmp_path, N, H, W, C, CO, chunk, split=split)
    dW = read(tmp_path, "dw", (3, 3, C, CO))
    x64, dz64 = (operand(conv_case[k], split) for k in ("x", "dz"))
    _, cache = conv3x3_forward(x64, np.zeros((3, 3, C, CO)), None)
    _, ref, _ = conv3x3_backward(dz64, cache, need_dx=False)
    assert rel_err(dW, ref) < ACC_RTOL


def test_emulated_cross_entropy_kernel_matches_dynloss(emulator, tmp_path):
    """The fused loss kernel against dynloss.loss_forward / loss_backward (eq. 1), float32."""
    rng = np.random.default_rng(9)
    N, K = 37, 10
    z = (5 * rng.normal(size=(N, K))).astype(np.float32)
    y = rng.integers(0, K, size=N)
    gamma = class_weights(13, 20.0, 10, K).astype(np.float32)
    write(tmp_path, x=z, y=y.astype(np.float32), gamma=gamma)
    emulator(gpu.IGEMM_TILES, "ce", tmp_path, N, 1, 1, K, 0, 0)
    F, cache = loss_forward(z[None].astype(np.float64), y, gamma[None].astype(np.float64))
    dz = loss_backward(cache)[0]
    assert abs(read(tmp_path, "loss", (N,)).astype(np.float64).sum() - F[0]) < 1e-6 * abs(F[0])
    assert rel_err(read(tmp_path, "dz", (N, K)), dz) < 1e-6


@pytest.mark.parametrize("relu", [0, 1])
def test_emulated_direct_conv_matches_numpy(emulator, tmp_path, relu):
    """conv1's kernel: C = 3 input channels, float32 FMAs (no TF32 rounding), bias, ReLU."""
    rng = np.random.default_rng(8)
    N, H, W, C, CO = 2, 8, 6, 3, 64
    x, w = rng.normal(size=(N, H, W, C)), rng.normal(size=(3, 3, C, CO))
    b = rng.normal(size=CO)
    write(tmp_path, x=x, w=w, bias=b)
    emulator(gpu.IGEMM_TILES, "direct", tmp_path, N, H, W, C, CO, relu)
    f32 = [a.astype(np.float32).astype(np.float64) for a in (x, w, b)]
    z, _ = conv3x3_forward(*f32)
    assert rel_err(read(tmp_path, "out", (N, H, W, CO)), np.maximum(z, 0) if relu else z) < 1e-6


@pytest.mark.parametrize("C, word", [(3, 4), (2, 8), (6, 8), (4, 16)])
def test_emulated_im2col_words_of_4_8_16_bytes(emulator, tmp_path, C, word):
    """float32 pixels of C values copied as C*4/word words (conv1 has C = 3: 4-byte words)."""
    x = np.random.default_rng(C).normal(size=(2, 8, 6, C)).astype(np.float32)
    write(tmp_path, x=x)
    emulator(gpu.IGEMM_TILES, "im2col", tmp_path, 2, 8, 6, C, 0, word)
    np.testing.assert_array_equal(read(tmp_path, "cols", (2 * 8 * 6, 9 * C)), im2col3x3(x))


def test_emulated_3xtf32_is_float32_accurate_where_tf32_is_not(emulator, conv_case, tmp_path):
    """Against the unrounded float64 convolution, TF32 errs by about 1e-3 relative and 3xTF32 by
    float32 rounding: the split must buy at least two orders of magnitude."""
    N, H, W, C, CO = SHAPE.values()
    write(tmp_path, **conv_case)
    x64, w64 = (conv_case[k].astype(np.float64) for k in ("x", "w"))
    ref, _ = conv3x3_forward(x64, w64, conv_case["bias"].astype(np.float64))
    errs = []
    for split in (0, 1):
        emulator(gpu.IGEMM_TILES, "igemm", tmp_path, N, H, W, C, CO, 0, split=split)
        errs.append(rel_err(read(tmp_path, "out", (N, H, W, CO)), ref))
    assert errs[1] < ACC_RTOL < errs[0] and errs[1] < errs[0] / 100


def test_emulated_im2col_and_pools_equal_numpy_exactly(emulator, tmp_path):
    rng = np.random.default_rng(6)
    N, H, W, C = 2, 6, 8, 8
    x = rng.normal(size=(N, H, W, C)).astype(np.float32)
    dp = rng.normal(size=(N, H // 2, W // 2, C)).astype(np.float32)
    write(tmp_path, x=x, dp=dp)
    tiles = gpu.IGEMM_TILES
    emulator(tiles, "im2col", tmp_path, N, H, W, C, 0, 16)
    np.testing.assert_array_equal(read(tmp_path, "cols", (N * H * W, 9 * C)), im2col3x3(x))
    emulator(tiles, "pool", tmp_path, N, H, W, C, 0, 0)
    np.testing.assert_array_equal(read(tmp_path, "pool", dp.shape), avgpool2_forward(x)[0])
    emulator(tiles, "poolgrad", tmp_path, N, H, W, C, 0, 0)
    ref = relu_avgpool2_backward(dp, x.shape, x)
    np.testing.assert_array_equal(read(tmp_path, "dz", x.shape), ref)


# ---------------------------------------------------------------------------------------------
# On a GPU, through CuPy
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def cupy_tf32(monkeypatch):
    """CuPy with CUPY_TF32=1 for dynloss's dispatch (CuPy's own GEMMs keep what they read)."""
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("CuPy is installed but finds no GPU")
    except Exception:
        pytest.skip("CuPy is installed but finds no GPU")
    setenv(monkeypatch, "CUPY_TF32", "1")
    return cupy


@pytest.mark.gpu
def test_gpu_implicit_conv_layers_match_numpy(cupy_tf32, conv_case):
    cp = cupy_tf32
    x, w, b, gate, dz = (cp.asarray(conv_case[k]) for k in ("x", "w", "bias", "gate", "dz"))
    assert gpu.implicit_split(x, w) is not None
    out, cache = GPU_LAYERS.conv3x3_forward(x, w, b)
    assert cache[2] is None  # the implicit path: no cols
    dx, dW, db = GPU_LAYERS.relu_conv3x3_backward(dz, gate, cache)
    x64, w64, dz64 = (tf32_round(conv_case[k]).astype(np.float64) for k in ("x", "w", "dz"))
    z, ref_cache = conv3x3_forward(x64, w64, conv_case["bias"].astype(np.float64))
    rdx, rdW, rdb = relu_conv3x3_backward(dz64, conv_case["gate"], ref_cache)
    assert rel_err((out), z) < ACC_RTOL
    assert rel_err((dx), rdx) < ACC_RTOL
    assert rel_err((dW), rdW) < ACC_RTOL
    ref_db = conv_case["dz"].astype(np.float64).sum(axis=(0, 1, 2))
    assert rel_err((db), ref_db) < TF32_STEP_RTOL  # CuPy's GEMV: TF32 or not, its choice


@pytest.mark.gpu
def test_gpu_tf32_myrtle5_gradients_match_float64(cupy_tf32):
    rng = np.random.default_rng(7)
    params = init_myrtle5(3, c=64, dtype=np.float64)
    x = rng.normal(size=(8, 16, 16, 3))
    y = rng.integers(0, 10, size=8)
    gamma = class_weights(13, 20.0, 10, 10)
    F, grads, _ = reference_loss_and_grads(params, x, y, gamma)
    p32 = to_device({k: v.astype(np.float32) for k, v in params.items()}, cupy_tf32)
    x32 = cupy_tf32.asarray(x, np.float32)
    F32, g32, _ = fused_loss_and_grads(p32, x32, y, gamma, layers=GPU_LAYERS)
    assert abs(float(F32) - F) < TF32_STEP_RTOL * abs(F)
    for k in grads:
        assert rel_err((g32[k]), grads[k]) < TF32_STEP_RTOL, k


@pytest.mark.gpu
def test_gpu_3xtf32_layers_match_float64(cupy_tf32, conv_case, monkeypatch):
    setenv(monkeypatch, "CUPY_TF32", "0")
    setenv(monkeypatch, "DYNLOSS_CONV", "3xtf32")
    cp = cupy_tf32
    x, w, b, gate, dz = (cp.asarray(conv_case[k]) for k in ("x", "w", "bias", "gate", "dz"))
    assert gpu.implicit_split(x, w) == 1
    out, cache = GPU_LAYERS.conv3x3_forward(x, w, b)
    dx, dW, _ = GPU_LAYERS.relu_conv3x3_backward(dz, gate, cache)
    x64, w64, dz64 = (conv_case[k].astype(np.float64) for k in ("x", "w", "dz"))
    z, ref_cache = conv3x3_forward(x64, w64, conv_case["bias"].astype(np.float64))
    rdx, rdW, _ = relu_conv3x3_backward(dz64, conv_case["gate"], ref_cache)
    for got, ref in ((out, z), (dx, rdx), (dW, rdW)):
        assert rel_err((got), ref) < ACC_RTOL


def test_channels_must_fit_the_active_tiles():
    assert gpu.channels_fit_tiles(64, 128) and not gpu.channels_fit_tiles(64, 96)
    wide = (4, 4, 32, 32, 32)  # 128 output channels a block
    assert not gpu.channels_fit_tiles(64, 64, wide) and gpu.channels_fit_tiles(128, 256, wide)


def test_empty_batch_is_refused():
    params = init_myrtle5(0, c=4)
    with pytest.raises(ValueError, match="non-empty"):
        reference_loss_and_grads(params, np.zeros((0, 8, 8, 3)), np.zeros(0, int), np.ones(10))


def test_conv_method_switch_and_its_errors(monkeypatch):
    """On NumPy every method is im2col; a misspelt DYNLOSS_CONV is an error, not a silent default."""
    x, w = np.zeros((1, 8, 8, 64), np.float32), np.zeros((3, 3, 64, 64), np.float32)
    for method in gpu.CONV_METHODS:
        setenv(monkeypatch, "DYNLOSS_CONV", method)
        assert gpu.implicit_split(x, w) is None
    setenv(monkeypatch, "DYNLOSS_CONV", "3xTF32")
    with pytest.raises(ValueError, match="DYNLOSS_CONV"):
        gpu.implicit_split(x, w)


@pytest.mark.gpu
def test_gpu_implicit_path_only_for_float32_and_64_channels(cupy_tf32, monkeypatch):
    cp = cupy_tf32
    x, w = cp.zeros((1, 8, 8, 64), np.float32), cp.zeros((3, 3, 64, 64), np.float32)
    assert gpu.implicit_split(x, w) == 0
    assert gpu.implicit_split(x.astype(np.float64), w.astype(np.float64)) is None
    assert gpu.implicit_split(x[..., :32], w[:, :, :32]) is None
    setenv(monkeypatch, "DYNLOSS_CONV", "im2col")
    assert gpu.implicit_split(x, w) is None
    setenv(monkeypatch, "DYNLOSS_CONV", "auto")
    setenv(monkeypatch, "CUPY_TF32", "0")
    assert gpu.implicit_split(x, w) is None
    setenv(monkeypatch, "DYNLOSS_CONV", "3xtf32")
    assert gpu.implicit_split(x, w) == 1
