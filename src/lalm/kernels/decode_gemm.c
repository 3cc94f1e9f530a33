/* y (M, N) = x (M, K) @ W^T for the few rows of a CPU decode step, fp32 arithmetic, AVX2 + FMA,
 * with W (N, K), fp32 or bf16, packed once into panels of 8 output columns: wp[N/8][K][8] (N a multiple of 8; pack
 * with zero rows first). The panels are split across OpenMP threads, each streaming its share of
 * wp from memory exactly once, front to back.
 *
 * Why a kernel of our own: a decode step streams every weight once for a few rows, so it should
 * run at the memory's read rate. BLAS libraries pack a block of W on every call and are tuned for
 * many rows: on this project's 2-core EPYC, numpy's OpenBLAS ran 8-row products over a decoder's
 * worth of weights at 13-17 GB/s, this at 26-36 (docs/benchmarks.md, run G4). Each output is
 * accumulated over k in the same order whatever M is, so a row's result does not depend on the
 * other rows of its batch.
 *
 * Inner loop, per panel and k: one 8-wide load of W, then for each row r of x one broadcast of
 * x[r][k] and one FMA into that row's accumulator (R <= 8 registers; 2R for two panels).
 */
#include <immintrin.h>
#include <omp.h>
#include <stddef.h>

/* Weights as fp32, or as bf16 widened to fp32 in registers (bf16 is fp32's top 16 bits): a bf16
 * checkpoint then streams half the bytes, and the arithmetic stays fp32. x and y are fp32. */
#define LOAD_f32(w) _mm256_loadu_ps(w)
#define LOAD_bf16(w) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w))), 16))

/* Panels [p0, p1) for R rows of x. With R <= 6, two panels at a time: 2R independent FMA chains
 * instead of R (at most 12 accumulators + 3 registers of the 16), so a few rows are neither bound
 * by the FMA's latency nor by loads (per decoder step: one row 54 vs 61 ms, five or six 59 vs
 * 71). Every output still sums over k in the same order, whatever R and whichever path, so a
 * row's results do not depend on its batch. (Seven or eight rows in pairs would spill registers:
 * 79 vs 74 ms; four-row blocks over panel pairs for eight rows, re-reading each pair from cache,
 * 125 ms.) */
#define PANELS(T, W, R)                                                                       \
    static void panels_##T##_##R(const float *x, const W *wp, float *y, int K, int N, int p0, \
                                 int p1) {                                                    \
        int p = p0;                                                                           \
        for (; R <= 6 && p + 2 <= p1; p += 2) {                                               \
            const W *w0 = wp + (size_t)p * K * 8, *w1 = w0 + (size_t)K * 8;                   \
            __m256 c[R], d[R];                                                                \
            for (int r = 0; r < R; r++) c[r] = d[r] = _mm256_setzero_ps();                    \
            for (int k = 0; k < K; k++) {                                                     \
                __m256 b0 = LOAD_##T(w0 + (size_t)k * 8), b1 = LOAD_##T(w1 + (size_t)k * 8);  \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                         \
                    __m256 a = _mm256_broadcast_ss(x + (size_t)r * K + k);                    \
                    c[r] = _mm256_fmadd_ps(a, b0, c[r]);                                      \
                    d[r] = _mm256_fmadd_ps(a, b1, d[r]);                                      \
                }                                                                             \
            }                                                                                 \
            for (int r = 0; r < R; r++) {                                                     \
                _mm256_storeu_ps(y + (size_t)r * N + (size_t)p * 8, c[r]);                    \
                _mm256_storeu_ps(y + (size_t)r * N + (size_t)p * 8 + 8, d[r]);                \
            }                                                                                 \
        }                                                                                     \
        for (; p < p1; p++) {                                                                 \
            const W *w = wp + (size_t)p * K * 8;                                              \
            __m256 c[R];                                                                      \
            for (int r = 0; r < R; r++) c[r] = _mm256_setzero_ps();                           \
            for (int k = 0; k < K; k++) {                                                     \
                __m256 b = LOAD_##T(w + (size_t)k * 8);                                       \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                           \
                    c[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + (size_t)r * K + k), b, c[r]); \
            }                                                                                 \
            for (int r = 0; r < R; r++) _mm256_storeu_ps(y + (size_t)r * N + (size_t)p * 8, c[r]); \
        }                                                                                     \
    }

/* M rows (any M: blocks of 8, each streaming wp once more), y (M, N) row-major. */
#define GEMM(T, W)                                                                            \
    PANELS(T, W, 1) PANELS(T, W, 2) PANELS(T, W, 3) PANELS(T, W, 4)                           \
    PANELS(T, W, 5) PANELS(T, W, 6) PANELS(T, W, 7) PANELS(T, W, 8)                           \
    static void (*const PANELS_##T[9])(const float *, const W *, float *, int, int, int, int) = { \
        0, panels_##T##_1, panels_##T##_2, panels_##T##_3, panels_##T##_4,                    \
        panels_##T##_5, panels_##T##_6, panels_##T##_7, panels_##T##_8};                      \
    void lalm_decode_gemm_##T(int M, int K, int N, const float *x, const W *wp, float *y,     \
                              int threads) {                                                  \
        int P = N / 8;                                                                        \
        _Pragma("omp parallel num_threads(threads)") {                                        \
            int t = omp_get_thread_num(), nt = omp_get_num_threads();                         \
            int p0 = (int)((long)P * t / nt), p1 = (int)((long)P * (t + 1) / nt);             \
            for (int m = 0; m < M; m += 8) {                                                  \
                int r = M - m < 8 ? M - m : 8;                                                \
                PANELS_##T[r](x + (size_t)m * K, wp, y + (size_t)m * N, K, N, p0, p1);        \
            }                                                                                 \
        }                                                                                     \
    }

typedef unsigned short bf16;
GEMM(f32, float)
GEMM(bf16, bf16)
