// kernels/conv_igemm.cu: the 3x3 convolution on the tensor cores (TF32 or 3xTF32, float32 I/O).
// The NumPy reference is models.conv3x3_forward / conv3x3_backward; gpu.py launches these kernels
// (NVRTC through CuPy), tests/test_igemm.py compiles this file with nvcc and runs it on the CPU
// through tests/cuda_emulator.cpp. Kernels: dynloss_conv3x3_igemm (forward and input gradient),
// dynloss_conv3x3_wgrad (weight-gradient partial sums), dynloss_sum_parts (their fixed-order sum).
//
// Implicit-GEMM 3x3 SAME convolutions, NHWC float32, on TF32 tensor cores (mma.sync m16n8k8).
// Compiled with -DWARPS_M -DWARPS_N -DWM -DWN -DBK (block of WARPS_M x WARPS_N warps, each
// computing a WM x WN tile of the output, BK-deep slices of the reduction per shared-memory tile).
#define MI (WM / 16)
#define NI (WN / 8)
#define BM (WARPS_M * WM)
#define BN (WARPS_N * WN)
#define NT (WARPS_M * WARPS_N * 32)

static_assert(WM % 16 == 0 && WN % 8 == 0 && BK % 8 == 0, "warp tiles of m16n8k8 steps");
#ifndef SPLIT
#define SPLIT 0  // 1: 3xTF32, each operand split into big + small TF32 parts, three MMAs
#endif

#ifndef DYNLOSS_EMULATED_MMA  // the CPU emulator in tests/ brings its own
// float -> TF32 (round to nearest, ties away), as the bit pattern the tensor cores read
__device__ __forceinline__ unsigned tf32(float f) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(f));
    return r;
}


// c (16x8, fp32) += a (16x8, tf32, row-major) b (8x8, tf32, column-major); lane = 4 g + t holds
// a = A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4];  b = B[t][g], B[t+4][g];
// c = C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]   (PTX ISA, mma.m16n8k8 fragments)
__device__ __forceinline__ void mma_tf32(float* c, const unsigned* a, const unsigned* b) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// What a tile keeps in shared memory: TF32 bits, or (SPLIT) the float32 bits, split later
__device__ __forceinline__ uint4 stash4(float4 v) {
#if SPLIT
    return make_uint4(__float_as_uint(v.x), __float_as_uint(v.y), __float_as_uint(v.z),
                      __float_as_uint(v.w));
#else
    return make_uint4(tf32(v.x), tf32(v.y), tf32(v.z), tf32(v.w));
#endif
}

// acc += A B for one m16n8k8 step from the stashed fragments. SPLIT: v = big + small with
// big = tf32(v), small = tf32(v - big); A B ~ As Bb + Ab Bs + Ab Bb (the small x small term,
// 2^-22 relative, is dropped), which is about as accurate as float32 (3xTF32).
__device__ __forceinline__ void mma_step(float* acc, const unsigned* a, const unsigned* b) {
#if SPLIT
    unsigned ab[4], as[4], bb[2], bs[2];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        ab[e] = tf32(__uint_as_float(a[e]));
        as[e] = tf32(__uint_as_float(a[e]) - __uint_as_float(ab[e]));
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        bb[e] = tf32(__uint_as_float(b[e]));
        bs[e] = tf32(__uint_as_float(b[e]) - __uint_as_float(bb[e]));
    }
    mma_tf32(acc, as, bb);
    mma_tf32(acc, ab, bs);
    mma_tf32(acc, ab, bb);
#else
    mma_tf32(acc, a, b);
#endif
}

// out[p, o] = epilogue(sum_{a, b, c} x[p + (a-1) W + (b-1), c] w[(3a + b) C + c, o]) over the
// output pixels p = (n, i, j) whose tap (i + a - 1, j + b - 1) lies inside the image (SAME zeros).
// x (N*H*W, C), w (9C, CO), out (N*H*W, CO), all contiguous; C % BK == 0, CO % BN == 0.
// mode 0: out = acc + bias[o];  mode 1: out = relu(acc + bias[o]);  mode 2: out = acc * (gate > 0).
// Grid (ceil(P / BM), CO / BN), NT threads.
extern "C" __global__ void __launch_bounds__(NT)
dynloss_conv3x3_igemm(const float* __restrict__ x, const float* __restrict__ w,
                      const float* __restrict__ bias, const float* __restrict__ gate,
                      float* __restrict__ out, const int N, const int H, const int W,
                      const int C, const int CO, const int mode)
{
    constexpr int LDA = BK + 4;  // rows of As: g * LDA + t hits 32 distinct banks
    constexpr int LDB = BN + 8;  // rows of Bs: t * LDB + g hits 32 distinct banks
    __shared__ __align__(16) unsigned As[BM * LDA];  // [pixel][k], stash4 bits
    __shared__ __align__(16) unsigned Bs[BK * LDB];  // [k][out channel], stash4 bits
    constexpr int AV = BK / 4, AR = NT / AV, AP = BM / AR;  // float4 loads of the A tile
    constexpr int BV = BN / 4, BR = NT / BV, BP = BK / BR;  // float4 loads of the B tile
    static_assert(NT % AV == 0 && BM % AR == 0 && NT % BV == 0 && BK % BR == 0, "tile loads");

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wm = (warp / WARPS_N) * WM, wn = (warp % WARPS_N) * WN;
    const int HW = H * W;
    const long long P = (long long)N * HW;
    const long long m0 = (long long)blockIdx.x * BM;
    const int n0 = blockIdx.y * BN;
    const int ac = (tid % AV) * 4, ar = tid / AV;
    const int bc = (tid % BV) * 4, br = tid / BV;

    int pi[AP], pj[AP];  // image row and column of this thread's A rows (-4: past the end)
#pragma unroll
    for (int r = 0; r < AP; ++r) {
        const long long p = m0 + ar + r * AR;
        const int rem = (int)(p % HW);  // once per thread
        pi[r] = p < P ? rem / W : -4;
        pj[r] = p < P ? rem % W : -4;
    }
    float4 ra[AP], rb[BP];
    auto load = [&](int kt) {  // global -> registers: the k-slice kt of A (shifted x) and of w
        const int k0 = kt * BK, tap = k0 / C, c0 = k0 - tap * C;
        const int da = tap / 3 - 1, db = tap % 3 - 1;
#pragma unroll
        for (int r = 0; r < AP; ++r) {
            const int ii = pi[r] + da, jj = pj[r] + db;
            ra[r] = make_float4(0.f, 0.f, 0.f, 0.f);
            if ((unsigned)ii < (unsigned)H && (unsigned)jj < (unsigned)W)
                ra[r] = __ldg(reinterpret_cast<const float4*>(
                    x + (m0 + ar + r * AR + da * W + db) * C + c0 + ac));
        }
#pragma unroll
        for (int r = 0; r < BP; ++r)
            rb[r] = __ldg(reinterpret_cast<const float4*>(
                w + (long long)(k0 + br + r * BR) * CO + n0 + bc));
    };

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    const int KT = 9 * C / BK;
    load(0);
    for (int kt = 0; kt < KT; ++kt) {
#pragma unroll
        for (int r = 0; r < AP; ++r)
            *reinterpret_cast<uint4*>(&As[(ar + r * AR) * LDA + ac]) = stash4(ra[r]);
#pragma unroll
        for (int r = 0; r < BP; ++r)
            *reinterpret_cast<uint4*>(&Bs[(br + r * BR) * LDB + bc]) = stash4(rb[r]);
        __syncthreads();
        if (kt + 1 < KT) load(kt + 1);  // in flight while the tensor cores work on slice kt
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            unsigned af[MI][4], bf[NI][2];
#pragma unroll
            for (int i = 0; i < MI; ++i) {
                const unsigned* a = &As[(wm + i * 16 + g) * LDA + kk + t];
                af[i][0] = a[0];
                af[i][1] = a[8 * LDA];
                af[i][2] = a[4];
                af[i][3] = a[8 * LDA + 4];
            }
#pragma unroll
            for (int j = 0; j < NI; ++j) {
                const unsigned* b = &Bs[(kk + t) * LDB + wn + j * 8 + g];
                bf[j][0] = b[0];
                bf[j][1] = b[4 * LDB];
            }
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NI; ++j) mma_step(acc[i][j], af[i], bf[j]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < MI; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const long long p = m0 + wm + i * 16 + g + 8 * h;
            if (p >= P) continue;
#pragma unroll
            for (int j = 0; j < NI; ++j) {
                const int o = n0 + wn + j * 8 + 2 * t;
                const long long at = p * CO + o;
                float2 v = make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
                if (mode == 2) {
                    const float2 gv = __ldg(reinterpret_cast<const float2*>(gate + at));
                    v.x *= gv.x > 0.f ? 1.f : 0.f;
                    v.y *= gv.y > 0.f ? 1.f : 0.f;
                } else {
                    v.x += __ldg(bias + o);
                    v.y += __ldg(bias + o + 1);
                    if (mode == 1) {
                        v.x = v.x < 0.f ? 0.f : v.x;
                        v.y = v.y < 0.f ? 0.f : v.y;
                    }
                }
                *reinterpret_cast<float2*>(out + at) = v;
            }
        }
    }
}

// Weight gradient, one partial sum per chunk of pixels:
// part[s, (3a + b) C + c, o] = sum_{p in chunk s} x[p + (a-1) W + (b-1), c] dz[p, o]
// (taps inside the image only).
// x (N*H*W, C), dz (N*H*W, CO), part (S, 9C, CO); C % BM == 0, CO % BN == 0, chunk % BK == 0.
// Grid (9 C / BM, CO / BN, S = ceil(P / chunk)), NT threads.
extern "C" __global__ void __launch_bounds__(NT)
dynloss_conv3x3_wgrad(const float* __restrict__ x, const float* __restrict__ dz,
                      float* __restrict__ part, const int N, const int H, const int W,
                      const int C, const int CO, const int chunk)
{
    constexpr int LDA = BM + 8;  // As[k][m]: t * LDA + g hits 32 distinct banks
    constexpr int LDB = BN + 8;
    __shared__ __align__(16) unsigned As[BK * LDA];  // [pixel][in channel], stash4 bits
    __shared__ __align__(16) unsigned Bs[BK * LDB];  // [pixel][out channel], stash4 bits
    constexpr int AV = BM / 4, AR = NT / AV, AP = BK / AR;
    constexpr int BV = BN / 4, BR = NT / BV, BP = BK / BR;
    static_assert(NT % AV == 0 && BK % AR == 0 && NT % BV == 0 && BK % BR == 0, "tile loads");

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wm = (warp / WARPS_N) * WM, wn = (warp % WARPS_N) * WN;
    const int HW = H * W;
    const long long P = (long long)N * HW;
    const int mtiles = C / BM;
    const int tap = blockIdx.x / mtiles, c0 = (blockIdx.x % mtiles) * BM;
    const int da = tap / 3 - 1, db = tap % 3 - 1;
    const int n0 = blockIdx.y * BN;
    const long long p0 = (long long)blockIdx.z * chunk;
    const long long p1 = p0 + chunk < P ? p0 + chunk : P;
    const int ac = (tid % AV) * 4, ar = tid / AV;
    const int bc = (tid % BV) * 4, br = tid / BV;

    float4 ra[AP], rb[BP];
    auto load = [&](long long pb) {
#pragma unroll
        for (int r = 0; r < AP; ++r) {
            const long long p = pb + ar + r * AR;
            ra[r] = make_float4(0.f, 0.f, 0.f, 0.f);
            if (p < p1) {
                const int rem = (int)p % HW;  // P < 2^31 (checked by the caller): 32-bit division
                const int ii = rem / W + da, jj = rem % W + db;
                if ((unsigned)ii < (unsigned)H && (unsigned)jj < (unsigned)W)
                    ra[r] = __ldg(reinterpret_cast<const float4*>(
                        x + (p + da * W + db) * C + c0 + ac));
            }
        }
#pragma unroll
        for (int r = 0; r < BP; ++r) {
            const long long p = pb + br + r * BR;
            rb[r] = p < p1 ? __ldg(reinterpret_cast<const float4*>(dz + p * CO + n0 + bc))
                           : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    };

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    const int KT = (int)((p1 - p0 + BK - 1) / BK);
    load(p0);
    for (int kt = 0; kt < KT; ++kt) {
#pragma unroll
        for (int r = 0; r < AP; ++r)
            *reinterpret_cast<uint4*>(&As[(ar + r * AR) * LDA + ac]) = stash4(ra[r]);
#pragma unroll
        for (int r = 0; r < BP; ++r)
            *reinterpret_cast<uint4*>(&Bs[(br + r * BR) * LDB + bc]) = stash4(rb[r]);
        __syncthreads();
        if (kt + 1 < KT) load(p0 + (long long)(kt + 1) * BK);
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            unsigned af[MI][4], bf[NI][2];
#pragma unroll
            for (int i = 0; i < MI; ++i) {  // as in the igemm kernel, but A[m][k] = As[k][m]
                const unsigned* a = &As[(kk + t) * LDA + wm + i * 16 + g];
                af[i][0] = a[0];
                af[i][1] = a[8];
                af[i][2] = a[4 * LDA];
                af[i][3] = a[4 * LDA + 8];
            }
#pragma unroll
            for (int j = 0; j < NI; ++j) {
                const unsigned* b = &Bs[(kk + t) * LDB + wn + j * 8 + g];
                bf[j][0] = b[0];
                bf[j][1] = b[4 * LDB];
            }
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NI; ++j) mma_step(acc[i][j], af[i], bf[j]);
        }
        __syncthreads();
    }

    float* dst = part + ((long long)blockIdx.z * 9 * C + tap * C + c0) * CO + n0;
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int j = 0; j < NI; ++j)
                *reinterpret_cast<float2*>(dst + (long long)(wm + i * 16 + g + 8 * h) * CO
                                           + wn + j * 8 + 2 * t)
                    = make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
}

// part (S, L) -> out (L,): out[l] = sum_s part[s, l], in a fixed order (deterministic).
extern "C" __global__ void dynloss_sum_parts(const float* __restrict__ part,
                                             float* __restrict__ out, const int S, const int L)
{
    const int l = blockIdx.x * blockDim.x + threadIdx.x;
    if (l >= L) return;
    float s = 0.f;
    for (int k = 0; k < S; ++k) s += part[(long long)k * L + l];
    out[l] = s;
}
