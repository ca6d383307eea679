// kernels/layers.cu: the memory-bound Myrtle5 pieces on the GPU, float32 (and float64 where said).
// The NumPy references are in models.py (im2col3x3, conv3x3_forward for C <= 4, avgpool2_forward,
// relu_avgpool2_backward) and dynloss.py (loss_forward / loss_backward); gpu.py launches these
// kernels, and tests/test_igemm.py runs this file on the CPU through tests/cuda_emulator.cpp.
// No compile-time parameters.

// im2col without a padded copy: cols[(p * 9 + 3a + b) * CW + c] = x[p + (a-1) W + (b-1), c] for
// taps inside the image, else 0. Copies machine words of 16, 8 or 4 bytes (CW words per pixel,
// any dtype); one thread per word; 32-bit indices (total = N*H*W * 9 * CW < 2^31).
template <class Word>
__device__ __forceinline__ void im2col3x3(const Word* __restrict__ x, Word* __restrict__ cols,
                                          const int H, const int W, const int CW, const int total)
{
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    const int c = e % CW, q = e / CW, tap = q % 9, p = q / 9;
    const int da = tap / 3 - 1, db = tap % 3 - 1;
    const int rem = p % (H * W), i = rem / W + da, j = rem % W + db;
    Word v{};
    if ((unsigned)i < (unsigned)H && (unsigned)j < (unsigned)W)
        v = __ldg(x + (p + da * W + db) * CW + c);
    cols[e] = v;
}

extern "C" __global__ void dynloss_im2col3x3_16(const int4* __restrict__ x, int4* __restrict__ cols,
                                                const int H, const int W, const int CW,
                                                const int total)
{
    im2col3x3(x, cols, H, W, CW, total);
}

extern "C" __global__ void dynloss_im2col3x3_8(const int2* __restrict__ x, int2* __restrict__ cols,
                                               const int H, const int W, const int CW,
                                               const int total)
{
    im2col3x3(x, cols, H, W, CW, total);
}

extern "C" __global__ void dynloss_im2col3x3_4(const int* __restrict__ x, int* __restrict__ cols,
                                               const int H, const int W, const int CW,
                                               const int total)
{
    im2col3x3(x, cols, H, W, CW, total);
}

// Direct 3x3 SAME convolution for a few input channels (conv1, C = 3), in float32 FMAs:
// out[p, o] = [relu](bias[o] + sum_{a, b, c} x[p + (a-1) W + (b-1), c] w[(3a + b) C + c, o]).
// One thread per pixel and 4 output channels; w (9C, CO) and bias in shared memory
// ((9C + 1) CO <= DIRECT_SMEM floats); CO % 4 == 0; total = N*H*W * CO/4 < 2^31.
#define DIRECT_SMEM 4800
extern "C" __global__ void dynloss_conv3x3_direct(const float* __restrict__ x,
                                                  const float* __restrict__ w,
                                                  const float* __restrict__ bias,
                                                  float* __restrict__ out, const int H,
                                                  const int W, const int C, const int CO,
                                                  const int relu, const int total)
{
    __shared__ __align__(16) float ws[DIRECT_SMEM];
    const int nw = 9 * C * CO;
    for (int k = threadIdx.x; k < nw; k += blockDim.x) ws[k] = w[k];
    for (int k = threadIdx.x; k < CO; k += blockDim.x) ws[nw + k] = bias[k];
    __syncthreads();
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    const int G = CO / 4, o = (e % G) * 4, p = e / G;
    const int rem = p % (H * W), i = rem / W, j = rem % W;
    float4 acc = *reinterpret_cast<const float4*>(ws + nw + o);
    for (int a = 0; a < 3; ++a) {
        if ((unsigned)(i + a - 1) >= (unsigned)H) continue;
        for (int b = 0; b < 3; ++b) {
            if ((unsigned)(j + b - 1) >= (unsigned)W) continue;
            const float* xs = x + (long long)(p + (a - 1) * W + (b - 1)) * C;
            const float* wt = ws + (3 * a + b) * C * CO + o;
            for (int c = 0; c < C; ++c) {
                const float v = __ldg(xs + c);
                const float4 wv = *reinterpret_cast<const float4*>(wt + c * CO);
                acc.x = fmaf(v, wv.x, acc.x);
                acc.y = fmaf(v, wv.y, acc.y);
                acc.z = fmaf(v, wv.z, acc.z);
                acc.w = fmaf(v, wv.w, acc.w);
            }
        }
    }
    if (relu) {
        acc.x = acc.x < 0.f ? 0.f : acc.x;
        acc.y = acc.y < 0.f ? 0.f : acc.y;
        acc.z = acc.z < 0.f ? 0.f : acc.z;
        acc.w = acc.w < 0.f ? 0.f : acc.w;
    }
    *reinterpret_cast<float4*>(out + (long long)p * CO + o) = acc;
}

// The weighted cross-entropy of eq. (1) for one network and its gradient, one thread per
// sample n (log-softmax shifted by the row maximum, as dynloss.log_softmax):
// loss[n] = gamma[y_n] (logsumexp(z_n) - z_n[y_n]) / N;
// dz[n, k] = gamma[y_n] (softmax(z_n)_k - [k == y_n]) / N.  z, dz (N, K); y (N,) int64.
template <class T>
__device__ __forceinline__ void ce_rows(const T* __restrict__ z, const long long* __restrict__ y,
                                        const T* __restrict__ gamma, T* __restrict__ loss,
                                        T* __restrict__ dz, const int N, const int K)
{
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const T* zn = z + (long long)n * K;
    T m = zn[0];
    for (int k = 1; k < K; ++k) m = zn[k] > m ? zn[k] : m;
    T s = 0;
    for (int k = 0; k < K; ++k) s += exp(zn[k] - m);
    const T lse = m + log(s);
    const int yn = (int)y[n];
    const T w = gamma[yn] / (T)N;
    loss[n] = w * (lse - zn[yn]);
    for (int k = 0; k < K; ++k)
        dz[(long long)n * K + k] = w * (exp(zn[k] - lse) - (k == yn ? (T)1 : (T)0));
}

extern "C" __global__ void dynloss_ce_rows_f32(const float* __restrict__ z,
                                               const long long* __restrict__ y,
                                               const float* __restrict__ gamma,
                                               float* __restrict__ loss, float* __restrict__ dz,
                                               const int N, const int K)
{
    ce_rows(z, y, gamma, loss, dz, N, K);
}

extern "C" __global__ void dynloss_ce_rows_f64(const double* __restrict__ z,
                                               const long long* __restrict__ y,
                                               const double* __restrict__ gamma,
                                               double* __restrict__ loss, double* __restrict__ dz,
                                               const int N, const int K)
{
    ce_rows(z, y, gamma, loss, dz, N, K);
}

// 2x2 average pool, stride 2, float32 NHWC: out (N, H/2, W/2, C) from x (N, H, W, C); one thread
// per output value; 32-bit indices (total = N*H*W*C / 4 < 2^31).
extern "C" __global__ void dynloss_avgpool2(const float* __restrict__ x, float* __restrict__ out,
                                            const int H, const int W, const int C,
                                            const int total)
{
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    const int c = e % C, q = e / C, j = q % (W / 2), q2 = q / (W / 2);
    const int i = q2 % (H / 2), n = q2 / (H / 2);
    const int at = ((n * H + 2 * i) * W + 2 * j) * C + c;
    out[e] = (__ldg(x + at) + __ldg(x + at + C) + __ldg(x + at + W * C) + __ldg(x + at + W * C + C))
             * 0.25f;
}

// The gradient through h = relu(z), p = avgpool2(h): dz (N, H, W, C) = 1[h > 0] * dp / 4, with
// dp (N, H/2, W/2, C) = dF/dp; one thread per input value; 32-bit indices (total = N*H*W*C).
extern "C" __global__ void dynloss_relu_avgpool2_backward(const float* __restrict__ dp,
                                                          const float* __restrict__ h,
                                                          float* __restrict__ dz, const int H,
                                                          const int W, const int C,
                                                          const int total)
{
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    const int c = e % C, q = e / C, j = q % W, q2 = q / W, i = q2 % H, n = q2 / H;
    const float up = __ldg(dp + ((n * (H / 2) + i / 2) * (W / 2) + j / 2) * C + c);
    dz[e] = (__ldg(h + e) > 0.f ? 1.f : 0.f) * (0.25f * up);
}
