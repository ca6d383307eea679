// Runs the CUDA sources kernels/conv_igemm.cu and kernels/layers.cu on the CPU, so that their index
// arithmetic, tiles and use of the mma.sync fragments are tested where there is no GPU
// (tests/test_igemm.py).
//
// Every CUDA thread of a block is one std::thread; __syncthreads() is a barrier over the block;
// mma.sync m16n8k8 (TF32) is a barrier over the warp, after which each lane computes its own four
// accumulator entries from the fragments of all 32 lanes, placed as the PTX ISA documents them:
// lane 4g + t holds a = A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4]; b = B[t][g], B[t+4][g];
// c = C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]. TF32 rounding: to nearest, ties away from zero,
// keeping 10 mantissa bits (cvt.rna.tf32.f32). Blocks run one after another.
//
// Build: g++ -std=c++20 -O1 -pthread -I<the kernels folder> -DWARPS_M=.. -DWARPS_N=.. -DWM=.. -DWN=..
//        -DBK=.. [-DSPLIT=1] cuda_emulator.cpp
// Run:   emulator igemm DIR N H W C CO MODE        reads DIR/{x,w,bias,gate}.f32, writes DIR/out.f32
//        emulator wgrad DIR N H W C CO CHUNK       reads DIR/{x,dz}.f32, writes DIR/dw.f32 (9C, CO)
//        emulator direct DIR N H W C CO RELU       reads DIR/{x,w,bias}.f32, writes DIR/out.f32
//        emulator ce DIR N 1 1 K 0 0               reads DIR/{x,y,gamma}.f32, writes DIR/{loss,dz}.f32
//        emulator im2col DIR N H W C 0 WORD        reads DIR/x.f32, writes DIR/cols.f32 (P, 9C)
//        emulator pool DIR N H W C 0 0             reads DIR/x.f32, writes DIR/pool.f32
//        emulator poolgrad DIR N H W C 0 0         reads DIR/{x,dp}.f32 (x as h), writes DIR/dz.f32
// Arrays are raw little-endian float32 in C order, with the shapes of the kernels' comments.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

struct dim3e {
    unsigned x = 0, y = 0, z = 0;
};
struct float4 {
    float x, y, z, w;
};
struct float2 {
    float x, y;
};
struct uint4 {
    unsigned x, y, z, w;
};
struct int4 {
    int x, y, z, w;
};
struct int2 {
    int x, y;
};
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline int4 make_int4(int a, int b, int c, int d) { return {a, b, c, d}; }
template <class T>
inline T __ldg(const T* p) {
    return *p;
}

thread_local dim3e threadIdx, blockIdx, blockDim, gridDim;
static std::barrier<>* g_block_barrier = nullptr;
static std::vector<std::unique_ptr<std::barrier<>>> g_warp_barriers;
struct WarpFragments {
    unsigned a[32][4];
    unsigned b[32][2];
};
static std::vector<WarpFragments> g_warp_fragments;

inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __restrict__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define DYNLOSS_EMULATED_MMA

inline unsigned tf32(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u += 0x1000u;  // ties away from zero on the magnitude
    return u & 0xffffe000u;
}
inline float bits_to_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __uint_as_float(unsigned u) { return bits_to_float(u); }
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline void mma_tf32(float* c, const unsigned* a, const unsigned* b) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    WarpFragments& F = g_warp_fragments[warp];
    for (int e = 0; e < 4; ++e) F.a[lane][e] = a[e];
    for (int e = 0; e < 2; ++e) F.b[lane][e] = b[e];
    g_warp_barriers[warp]->arrive_and_wait();
    auto A = [&](int m, int k) { return bits_to_float(F.a[4 * (m % 8) + k % 4][m / 8 + 2 * (k / 4)]); };
    auto B = [&](int k, int n) { return bits_to_float(F.b[4 * n + k % 4][k / 4]); };
    const int g = lane >> 2, t = lane & 3;
    for (int e = 0; e < 4; ++e) {
        const int m = g + 8 * (e / 2), n = 2 * t + e % 2;
        float s = 0.f;
        for (int k = 0; k < 8; ++k) s += A(m, k) * B(k, n);
        c[e] += s;
    }
    g_warp_barriers[warp]->arrive_and_wait();  // nobody overwrites F before all lanes read it
}

#include "conv_igemm.cu"
#include "layers.cu"

static void launch(dim3e grid, unsigned threads, const std::function<void()>& kernel) {
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                std::barrier<> block_barrier(threads);
                g_block_barrier = &block_barrier;
                g_warp_barriers.clear();
                for (unsigned w = 0; w < (threads + 31) / 32; ++w)
                    g_warp_barriers.emplace_back(std::make_unique<std::barrier<>>(32));
                g_warp_fragments.assign((threads + 31) / 32, WarpFragments{});
                std::vector<std::thread> pool;
                for (unsigned t = 0; t < threads; ++t)
                    pool.emplace_back([&, t, x, y, z] {
                        threadIdx = {t, 0, 0};
                        blockIdx = {x, y, z};
                        blockDim = {threads, 1, 1};
                        gridDim = grid;
                        kernel();
                    });
                for (auto& th : pool) th.join();
            }
}

static std::vector<float> read_f32(const std::string& path, size_t n) {
    std::vector<float> v(n);
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f || std::fread(v.data(), 4, n, f) != n) {
        std::fprintf(stderr, "cannot read %zu floats from %s\n", n, path.c_str());
        std::exit(2);
    }
    std::fclose(f);
    return v;
}

static void write_f32(const std::string& path, const std::vector<float>& v) {
    FILE* f = std::fopen(path.c_str(), "wb");
    if (!f || std::fwrite(v.data(), 4, v.size(), f) != v.size()) {
        std::fprintf(stderr, "cannot write %s\n", path.c_str());
        std::exit(2);
    }
    std::fclose(f);
}

int main(int argc, char** argv) {
    if (argc != 9) {
        std::fprintf(stderr, "usage: emulator igemm|wgrad DIR N H W C CO MODE|CHUNK\n");
        return 2;
    }
    const std::string what = argv[1], dir = argv[2];
    const int N = std::atoi(argv[3]), H = std::atoi(argv[4]), W = std::atoi(argv[5]);
    const int C = std::atoi(argv[6]), CO = std::atoi(argv[7]), last = std::atoi(argv[8]);
    const long long P = (long long)N * H * W;
    auto x = read_f32(dir + "/x.f32", P * C);
    if (what == "igemm") {
        auto w = read_f32(dir + "/w.f32", 9LL * C * CO);
        auto bias = read_f32(dir + "/bias.f32", CO);
        auto gate = read_f32(dir + "/gate.f32", P * CO);
        std::vector<float> out(P * CO, NAN);
        dim3e grid{(unsigned)((P + BM - 1) / BM), (unsigned)(CO / BN), 1};
        launch(grid, NT, [&] {
            dynloss_conv3x3_igemm(x.data(), w.data(), bias.data(), gate.data(), out.data(), N, H,
                                  W, C, CO, last);
        });
        write_f32(dir + "/out.f32", out);
    } else if (what == "wgrad") {
        auto dz = read_f32(dir + "/dz.f32", P * CO);
        const int S = (int)((P + last - 1) / last);
        std::vector<float> part((size_t)S * 9 * C * CO, NAN), dw(9LL * C * CO, NAN);
        dim3e grid{(unsigned)(9 * C / BM), (unsigned)(CO / BN), (unsigned)S};
        launch(grid, NT, [&] {
            dynloss_conv3x3_wgrad(x.data(), dz.data(), part.data(), N, H, W, C, CO, last);
        });
        const int L = 9 * C * CO;
        launch(dim3e{(unsigned)((L + 255) / 256), 1, 1}, 256,
               [&] { dynloss_sum_parts(part.data(), dw.data(), S, L); });
        write_f32(dir + "/dw.f32", dw);
    } else if (what == "ce") {  // x = logits (N, C = K); reads DIR/{y,gamma}.f32 (labels as floats)
        auto yf = read_f32(dir + "/y.f32", N);
        auto gamma = read_f32(dir + "/gamma.f32", C);
        std::vector<long long> y(yf.begin(), yf.end());
        std::vector<float> loss(N, NAN), dz((size_t)N * C, NAN);
        launch(dim3e{(unsigned)((N + 127) / 128), 1, 1}, 128, [&] {
            dynloss_ce_rows_f32(x.data(), y.data(), gamma.data(), loss.data(), dz.data(), N, C);
        });
        write_f32(dir + "/loss.f32", loss);
        write_f32(dir + "/dz.f32", dz);
    } else if (what == "direct") {  // last = relu
        auto w = read_f32(dir + "/w.f32", 9LL * C * CO);
        auto bias = read_f32(dir + "/bias.f32", CO);
        const int total = (int)(P * (CO / 4));
        std::vector<float> out(P * CO, NAN);
        launch(dim3e{(unsigned)((total + 255) / 256), 1, 1}, 256, [&] {
            dynloss_conv3x3_direct(x.data(), w.data(), bias.data(), out.data(), H, W, C, CO, last,
                                   total);
        });
        write_f32(dir + "/out.f32", out);
    } else if (what == "im2col") {  // last = the word size in bytes: 16, 8 or 4
        const int CW = C * 4 / last, total = (int)(P * 9 * CW);
        std::vector<float> cols(P * 9 * C, NAN);
        launch(dim3e{(unsigned)((total + 255) / 256), 1, 1}, 256, [&] {
            if (last == 16)
                dynloss_im2col3x3_16(reinterpret_cast<const int4*>(x.data()),
                                     reinterpret_cast<int4*>(cols.data()), H, W, CW, total);
            else if (last == 8)
                dynloss_im2col3x3_8(reinterpret_cast<const int2*>(x.data()),
                                    reinterpret_cast<int2*>(cols.data()), H, W, CW, total);
            else
                dynloss_im2col3x3_4(reinterpret_cast<const int*>(x.data()),
                                    reinterpret_cast<int*>(cols.data()), H, W, CW, total);
        });
        write_f32(dir + "/cols.f32", cols);
    } else if (what == "pool") {
        const int total = (int)(P * C / 4);
        std::vector<float> out(total, NAN);
        launch(dim3e{(unsigned)((total + 255) / 256), 1, 1}, 256,
               [&] { dynloss_avgpool2(x.data(), out.data(), H, W, C, total); });
        write_f32(dir + "/pool.f32", out);
    } else if (what == "poolgrad") {
        auto dp = read_f32(dir + "/dp.f32", P * C / 4);
        const int total = (int)(P * C);
        std::vector<float> dz(total, NAN);
        launch(dim3e{(unsigned)((total + 255) / 256), 1, 1}, 256, [&] {
            dynloss_relu_avgpool2_backward(dp.data(), x.data(), dz.data(), H, W, C, total);
        });
        write_f32(dir + "/dz.f32", dz);
    } else {
        std::fprintf(stderr, "unknown kernel %s\n", what.c_str());
        return 2;
    }
    return 0;
}
