// Fused causal multi-head attention for XLA CPU: forward and backward as XLA FFI handlers.
//
// Why: XLA CPU runs the attention core (two batched (T x Dh) products per layer, their four
// gradient products, the mask and the softmax) as separate small batched matmuls at a third
// of its 2-D matmul rate. Here each (batch row, head) is one work item on XLA's intra-op
// thread pool: its q, k, v are gathered into contiguous tiles, only the causal (lower)
// triangle of 16 x 16 score tiles is computed, and the softmax is fused between the two
// products. The backward pass recomputes the probabilities from the saved log-sum-exp
// (as FlashAttention does) instead of storing the T x T matrix.
//
// Inputs are float32 (..., T, H, Dh) with Dh a multiple of 16; the leading dims are batch.
// Built by harness/attention.py with the host's C++ compiler; see docs/training.md.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// exp(x) for x <= 0, vectorisable (Cephes-style polynomial; relative error ~2e-7).
inline float fast_exp(float x) {
  x = std::max(x, -87.0f);
  const float l2e = 1.44269504088896341f;
  float n = std::nearbyint(x * l2e);
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Runs f(i) for i in [0, n) on XLA's intra-op pool; the calling thread works too, so
// this never waits for a pool thread to become free.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& f) {
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
    const F* f;
    int64_t n;
  };
  auto st = std::make_shared<State>();
  st->f = &f;
  st->n = n;
  auto work = [](State* s) {
    for (int64_t i; (i = s->next.fetch_add(1)) < s->n;) {
      (*s->f)(i);
      if (s->done.fetch_add(1) + 1 == s->n) {
        std::lock_guard<std::mutex> lock(s->mu);
        s->cv.notify_all();
      }
    }
  };
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([st, work] { work(st.get()); });
  work(st.get());
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load() == n; });
}


constexpr int64_t W = 16;  // tile size = vector width in floats
typedef float v16 __attribute__((vector_size(64), aligned(4)));

inline v16 Load(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void Store(float* p, v16 x) { *reinterpret_cast<v16*>(p) = x; }
inline v16 Splat(float x) { return v16{} + x; }

struct Dims {
  int64_t batch, t, h, d, tp;  // tp: t rounded up to a multiple of W
};

ffi::Error GetDims(const ffi::Buffer<ffi::F32>& q, Dims* dims) {
  auto shape = q.dimensions();
  if (shape.size() < 3) return ffi::Error::InvalidArgument("attention: q must be (..., T, H, D)");
  int64_t r = shape.size();
  dims->t = shape[r - 3];
  dims->h = shape[r - 2];
  dims->d = shape[r - 1];
  if (dims->d % W) return ffi::Error::InvalidArgument("attention: head dim must be a multiple of 16");
  dims->tp = (dims->t + W - 1) / W * W;
  dims->batch = 1;
  for (int64_t i = 0; i < r - 3; ++i) dims->batch *= shape[i];
  return ffi::Error::Success();
}

// Scratch memory per thread, 64-byte aligned, zero-filled on request.
float* Scratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n + 16) buf.resize(n + 16);
  auto addr = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<float*>((addr + 63) & ~uintptr_t{63});
}

// Head `hh` of one batch row, (T, H, D) -> contiguous (tp, D), scaled; padding rows zero.
inline void Gather(const float* src, float* dst, const Dims& g, int64_t hh, float scale) {
  for (int64_t i = 0; i < g.t; ++i) {
    const float* s = src + (i * g.h + hh) * g.d;
    float* o = dst + i * g.d;
    for (int64_t c = 0; c < g.d; ++c) o[c] = scale * s[c];
  }
  std::fill(dst + g.t * g.d, dst + g.tp * g.d, 0.0f);
}

// (tp, D) -> (D, tp)
inline void Transpose(const float* src, float* dst, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + i] = src[i * cols + c];
}

inline void Scatter(const float* src, float* dst, const Dims& g, int64_t hh, float scale) {
  for (int64_t i = 0; i < g.t; ++i) {
    const float* s = src + i * g.d;
    float* o = dst + (i * g.h + hh) * g.d;
    for (int64_t c = 0; c < g.d; ++c) o[c] = scale * s[c];
  }
}

// C (W x W, row stride W) = A (W rows of length d, row stride d) x Bt[:, j0:j0+W] (Bt: d x ldb).
inline void TileABt(const float* A, const float* Bt, int64_t ldb, int64_t d, float* C) {
  v16 acc[W];
  for (int r = 0; r < W; ++r) acc[r] = v16{};
  for (int64_t c = 0; c < d; ++c) {
    const v16 b = Load(Bt + c * ldb);
    for (int r = 0; r < W; ++r) acc[r] += A[r * d + c] * b;
  }
  for (int r = 0; r < W; ++r) Store(C + r * W, acc[r]);
}

// C (W rows x d, row stride d) += P x B, with P[r][j] = P[r * prs + j * pcs] (W x W)
// and B (W rows x d, row stride d).
inline void TilePB(const float* P, int64_t prs, int64_t pcs, const float* B, int64_t d, float* C) {
  for (int64_t c0 = 0; c0 < d; c0 += W) {
    v16 acc[W];
    for (int r = 0; r < W; ++r) acc[r] = Load(C + r * d + c0);
    for (int j = 0; j < W; ++j) {
      const v16 b = Load(B + j * d + c0);
      for (int r = 0; r < W; ++r) acc[r] += P[r * prs + j * pcs] * b;
    }
    for (int r = 0; r < W; ++r) Store(C + r * d + c0, acc[r]);
  }
}

ffi::Error FwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> o,
                   ffi::ResultBuffer<ffi::F32> lse) {
  Dims g;
  if (auto e = GetDims(q, &g); e.failure()) return e;
  const float scale = 1.0f / std::sqrt(static_cast<float>(g.d));
  const int64_t T = g.t, Tp = g.tp, D = g.d, stride = T * g.h * D;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  ParallelFor(pool, g.batch * g.h, [&](int64_t item) {
    const int64_t b = item / g.h, hh = item % g.h;
    float* Q = Scratch(5 * Tp * D + W * Tp + 2 * Tp);
    float *K = Q + Tp * D, *Kt = K + Tp * D, *V = Kt + Tp * D, *O = V + Tp * D, *S = O + Tp * D,
          *M = S + W * Tp, *Lsum = M + Tp;
    Gather(qp + b * stride, Q, g, hh, scale);
    Gather(kp + b * stride, K, g, hh, 1.0f);
    Gather(vp + b * stride, V, g, hh, 1.0f);
    Transpose(K, Kt, Tp, D);
    std::fill(O, O + Tp * D, 0.0f);
    float* L = lp + item * T;
    for (int64_t i0 = 0; i0 < Tp; i0 += W) {
      const int64_t n = i0 + W;  // columns [0, n) are computed for this row block
      for (int64_t j0 = 0; j0 < n; j0 += W) {
        float tile[W * W] __attribute__((aligned(64)));
        TileABt(Q + i0 * D, Kt + j0, Tp, D, tile);
        for (int r = 0; r < W; ++r) Store(S + r * Tp + j0, Load(tile + r * W));
      }
      for (int r = 0; r < W; ++r) {
        float* s = S + r * Tp;
        const int64_t len = i0 + r + 1;  // causal: j <= i
        float m = s[0];
        for (int64_t j = 1; j < len; ++j) m = std::max(m, s[j]);
        float l = 0.0f;
        for (int64_t j = 0; j < len; ++j) {
          s[j] = fast_exp(s[j] - m);
          l += s[j];
        }
        const float inv = 1.0f / l;
        for (int64_t j = 0; j < len; ++j) s[j] *= inv;
        for (int64_t j = len; j < n; ++j) s[j] = 0.0f;
        M[i0 + r] = m + std::log(l);
      }
      for (int64_t j0 = 0; j0 < n; j0 += W) TilePB(S + j0, Tp, 1, V + j0 * D, D, O + i0 * D);
    }
    for (int64_t i = 0; i < T; ++i) L[i] = M[i];
    Scatter(O, op + b * stride, g, hh, 1.0f);
  });
  return ffi::Error::Success();
}

ffi::Error BwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                   ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                   ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Dims g;
  if (auto e = GetDims(q, &g); e.failure()) return e;
  const float scale = 1.0f / std::sqrt(static_cast<float>(g.d));
  const int64_t T = g.t, Tp = g.tp, D = g.d, stride = T * g.h * D;
  ParallelFor(pool, g.batch * g.h, [&](int64_t item) {
    const int64_t b = item / g.h, hh = item % g.h;
    float* Q = Scratch(9 * Tp * D + 2 * Tp);
    float *K = Q + Tp * D, *Kt = K + Tp * D, *Vt = Kt + Tp * D, *dO = Vt + Tp * D,
          *tmp = dO + Tp * D, *dQ = tmp + Tp * D, *dK = dQ + Tp * D, *dV = dK + Tp * D,
          *L = dV + Tp * D, *delta = L + Tp;
    const int64_t off = b * stride;
    Gather(q.typed_data() + off, Q, g, hh, scale);
    Gather(k.typed_data() + off, K, g, hh, 1.0f);
    Transpose(K, Kt, Tp, D);
    Gather(v.typed_data() + off, tmp, g, hh, 1.0f);
    Transpose(tmp, Vt, Tp, D);
    Gather(dout.typed_data() + off, dO, g, hh, 1.0f);
    Gather(o.typed_data() + off, tmp, g, hh, 1.0f);
    const float* lsrc = lse.typed_data() + item * T;
    for (int64_t i = 0; i < Tp; ++i) {
      float acc = 0.0f;
      for (int64_t c = 0; c < D; ++c) acc += dO[i * D + c] * tmp[i * D + c];
      delta[i] = acc;
      L[i] = i < T ? lsrc[i] : 0.0f;
    }
    std::fill(dQ, dQ + 3 * Tp * D, 0.0f);  // dQ, dK, dV
    float P[W * W] __attribute__((aligned(64)));
    float dS[W * W] __attribute__((aligned(64)));
    for (int64_t i0 = 0; i0 < Tp; i0 += W) {
      for (int64_t j0 = 0; j0 <= i0; j0 += W) {
        TileABt(Q + i0 * D, Kt + j0, Tp, D, P);
        TileABt(dO + i0 * D, Vt + j0, Tp, D, dS);
        for (int r = 0; r < W; ++r) {
          const float li = L[i0 + r], di = delta[i0 + r];
          const int64_t lim = i0 + r - j0;  // columns c <= lim are allowed
          for (int c = 0; c < W; ++c) {
            const float p = c <= lim ? fast_exp(P[r * W + c] - li) : 0.0f;
            P[r * W + c] = p;
            dS[r * W + c] = p * (dS[r * W + c] - di);
          }
        }
        TilePB(P, 1, W, dO + i0 * D, D, dV + j0 * D);   // dV[j] += sum_r P[r][j] dO[r]
        TilePB(dS, 1, W, Q + i0 * D, D, dK + j0 * D);   // dK[j] += sum_r dS[r][j] Qs[r]
        TilePB(dS, W, 1, K + j0 * D, D, dQ + i0 * D);   // dQ[r] += sum_j dS[r][j] K[j]
      }
    }
    Scatter(dQ, dq->typed_data() + off, g, hh, scale);
    Scatter(dK, dk->typed_data() + off, g, hh, 1.0f);
    Scatter(dV, dv->typed_data() + off, g, hh, 1.0f);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(StackopsAttnFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(StackopsAttnBwd, BwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
