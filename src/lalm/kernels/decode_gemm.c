/* y (M, N) = x (M, K) @ W^T for the few rows of a CPU decode step, fp32, AVX2 + FMA, with W
 * (N, K) packed once into panels of 8 output columns: wp[N/8][K][8] (N a multiple of 8; pack
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

/* Panels [p0, p1) for R rows of x. With R <= 4, two panels at a time: 2R independent FMA chains
 * instead of R, so one to four rows are not bound by the FMA's latency (one row: 54 vs 61 ms per
 * decoder step). Every output still sums over k in the same order, whatever R and whichever
 * path, so a row's results do not depend on its batch. (Four-row blocks over panel pairs for
 * eight rows, re-reading each pair from cache, ran 1.7x slower than one eight-row pass.) */
#define PANELS(R)                                                                             \
    static void panels_##R(const float *x, const float *wp, float *y, int K, int N, int p0,   \
                           int p1) {                                                          \
        int p = p0;                                                                           \
        for (; R <= 4 && p + 2 <= p1; p += 2) {                                               \
            const float *w0 = wp + (size_t)p * K * 8, *w1 = w0 + (size_t)K * 8;               \
            __m256 c[R], d[R];                                                                \
            for (int r = 0; r < R; r++) c[r] = d[r] = _mm256_setzero_ps();                    \
            for (int k = 0; k < K; k++) {                                                     \
                __m256 b0 = _mm256_loadu_ps(w0 + (size_t)k * 8);                              \
                __m256 b1 = _mm256_loadu_ps(w1 + (size_t)k * 8);                              \
                _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                         \
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
            const float *w = wp + (size_t)p * K * 8;                                          \
            __m256 c[R];                                                                      \
            for (int r = 0; r < R; r++) c[r] = _mm256_setzero_ps();                           \
            for (int k = 0; k < K; k++) {                                                     \
                __m256 b = _mm256_loadu_ps(w + (size_t)k * 8);                                \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                           \
                    c[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + (size_t)r * K + k), b, c[r]); \
            }                                                                                 \
            for (int r = 0; r < R; r++) _mm256_storeu_ps(y + (size_t)r * N + (size_t)p * 8, c[r]); \
        }                                                                                     \
    }
PANELS(1) PANELS(2) PANELS(3) PANELS(4) PANELS(5) PANELS(6) PANELS(7) PANELS(8)

typedef void (*panels_fn)(const float *, const float *, float *, int, int, int, int);
static const panels_fn PANELS_FN[9] = {0, panels_1, panels_2, panels_3, panels_4,
                                       panels_5, panels_6, panels_7, panels_8};

/* M rows (any M: blocks of 8, each streaming wp once more), y (M, N) row-major. */
void lalm_decode_gemm(int M, int K, int N, const float *x, const float *wp, float *y, int threads) {
    int P = N / 8;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        int p0 = (int)((long)P * t / T), p1 = (int)((long)P * (t + 1) / T);
        for (int m = 0; m < M; m += 8) {
            int r = M - m < 8 ? M - m : 8;
            PANELS_FN[r](x + (size_t)m * K, wp, y + (size_t)m * N, K, N, p0, p1);
        }
    }
}
