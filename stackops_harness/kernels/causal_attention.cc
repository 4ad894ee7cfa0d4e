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
// With rotary=1, q and k are first rotated by the tables cos, sin (T, Dh/2) (rotary
// positions, as stackops.models applies them), and their gradients rotated back, so the
// rotation costs no separate pass over memory.
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
typedef int32_t vi16 __attribute__((vector_size(64), aligned(4)));
const v16 kIota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// exp(x) on 16 lanes for x <= 0 (Cephes-style polynomial, relative error ~2e-7; inputs
// below -87 are clamped, so exp(-inf) is ~1e-38, not 0: callers zero masked lanes).
inline v16 ExpV(v16 x) {
  x = x < Splat(-87.0f) ? Splat(-87.0f) : x;
  const v16 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v16 p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
  return p * reinterpret_cast<const v16&>(bits);
}

inline float HMax(v16 x) {
  float m = x[0];
  for (int i = 1; i < W; ++i) m = std::max(m, x[i]);
  return m;
}

inline float HSum(v16 x) {
  float t = 0.0f;
  for (int i = 0; i < W; ++i) t += x[i];
  return t;
}

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

// Rotary tables, (T, D/2) each, or none (cos == nullptr).
struct Rope {
  const float* cos = nullptr;
  const float* sin = nullptr;
};

// Head `hh` of one batch row, (T, H, D) -> contiguous (tp, D), rotated by `rope` (as
// stackops.models: halves x1, x2 -> x1 cos - x2 sin, x2 cos + x1 sin) and scaled; padding
// rows zero.
inline void Gather(const float* src, float* dst, const Dims& g, int64_t hh, float scale,
                   Rope rope = {}) {
  const int64_t half = g.d / 2;
  for (int64_t i = 0; i < g.t; ++i) {
    const float* s = src + (i * g.h + hh) * g.d;
    float* o = dst + i * g.d;
    if (rope.cos == nullptr) {
      for (int64_t c = 0; c < g.d; ++c) o[c] = scale * s[c];
      continue;
    }
    const float* cs = rope.cos + i * half;
    const float* sn = rope.sin + i * half;
    for (int64_t c = 0; c < half; ++c) {
      const float x1 = s[c], x2 = s[c + half];
      o[c] = scale * (x1 * cs[c] - x2 * sn[c]);
      o[c + half] = scale * (x2 * cs[c] + x1 * sn[c]);
    }
  }
  std::fill(dst + g.t * g.d, dst + g.tp * g.d, 0.0f);
}

// (tp, D) -> (D, tp)
inline void Transpose(const float* src, float* dst, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + i] = src[i * cols + c];
}

// Contiguous (tp, D) -> head `hh` of (T, H, D), scaled and rotated back by `rope` (the
// transpose of Gather's rotation: the gradient with respect to the unrotated input).
inline void Scatter(const float* src, float* dst, const Dims& g, int64_t hh, float scale,
                    Rope rope = {}) {
  const int64_t half = g.d / 2;
  for (int64_t i = 0; i < g.t; ++i) {
    const float* s = src + i * g.d;
    float* o = dst + (i * g.h + hh) * g.d;
    if (rope.cos == nullptr) {
      for (int64_t c = 0; c < g.d; ++c) o[c] = scale * s[c];
      continue;
    }
    const float* cs = rope.cos + i * half;
    const float* sn = rope.sin + i * half;
    for (int64_t c = 0; c < half; ++c) {
      const float y1 = s[c], y2 = s[c + half];
      o[c] = scale * (y1 * cs[c] + y2 * sn[c]);
      o[c + half] = scale * (y2 * cs[c] - y1 * sn[c]);
    }
  }
}

ffi::Error SameShape(const ffi::Buffer<ffi::F32>& a, const ffi::Buffer<ffi::F32>& b) {
  auto x = a.dimensions(), y = b.dimensions();
  if (x.size() != y.size() || !std::equal(x.begin(), x.end(), y.begin()))
    return ffi::Error::InvalidArgument("attention: q, k, v (and out, d out) must share a shape");
  return ffi::Error::Success();
}

ffi::Error GetRope(int32_t rotary, const ffi::Buffer<ffi::F32>& cos,
                   const ffi::Buffer<ffi::F32>& sin, const Dims& g, Rope* rope) {
  if (!rotary) return ffi::Error::Success();
  if (g.d % 2 || cos.element_count() != g.t * (g.d / 2) ||
      sin.element_count() != g.t * (g.d / 2))
    return ffi::Error::InvalidArgument("attention: rotary tables must be (T, head_dim / 2)");
  rope->cos = cos.typed_data();
  rope->sin = sin.typed_data();
  return ffi::Error::Success();
}

// C (W x W, row stride ldc) = A (W rows of length d, row stride d) x Bt[:, 0:W]
// (Bt: d rows, row stride ldb).
inline void TileABt(const float* A, const float* Bt, int64_t ldb, int64_t d, float* C,
                    int64_t ldc) {
  v16 acc[W];
  for (int r = 0; r < W; ++r) acc[r] = v16{};
  for (int64_t c = 0; c < d; ++c) {
    const v16 b = Load(Bt + c * ldb);
    for (int r = 0; r < W; ++r) acc[r] += A[r * d + c] * b;
  }
  for (int r = 0; r < W; ++r) Store(C + r * ldc, acc[r]);
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
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                   ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse,
                   int32_t rotary) {
  Dims g;
  if (auto e = GetDims(q, &g); e.failure()) return e;
  Rope rope;
  if (auto e = GetRope(rotary, cos, sin, g, &rope); e.failure()) return e;
  for (auto* x : {&k, &v})
    if (auto e = SameShape(q, *x); e.failure()) return e;
  const float scale = 1.0f / std::sqrt(static_cast<float>(g.d));
  const int64_t T = g.t, Tp = g.tp, D = g.d, stride = T * g.h * D;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  ParallelFor(pool, g.batch * g.h, [&](int64_t item) {
    const int64_t b = item / g.h, hh = item % g.h;
    float* Q = Scratch(5 * Tp * D + W * Tp + 2 * Tp);
    float *K = Q + Tp * D, *Kt = K + Tp * D, *V = Kt + Tp * D, *O = V + Tp * D, *S = O + Tp * D,
          *M = S + W * Tp, *Lsum = M + Tp;
    Gather(qp + b * stride, Q, g, hh, scale, rope);
    Gather(kp + b * stride, K, g, hh, 1.0f, rope);
    Gather(vp + b * stride, V, g, hh, 1.0f);
    Transpose(K, Kt, Tp, D);
    std::fill(O, O + Tp * D, 0.0f);
    float* L = lp + item * T;
    for (int64_t i0 = 0; i0 < Tp; i0 += W) {
      const int64_t n = i0 + W;  // columns [0, n) are computed for this row block
      for (int64_t j0 = 0; j0 < n; j0 += W) TileABt(Q + i0 * D, Kt + j0, Tp, D, S + j0, Tp);
      for (int r = 0; r < W; ++r) {
        float* s = S + r * Tp;
        // Causal mask inside the diagonal tile: column i0 + c is allowed for c <= r.
        const vi16 allowed = kIota <= Splat(static_cast<float>(r));
        const v16 diag = Load(s + i0);
        Store(s + i0, allowed ? diag : Splat(-INFINITY));
        v16 mv = Load(s);
        for (int64_t j0 = W; j0 < n; j0 += W) {
          const v16 x = Load(s + j0);
          mv = x > mv ? x : mv;
        }
        const float m = HMax(mv);
        v16 lv = v16{};
        for (int64_t j0 = 0; j0 < n; j0 += W) {
          v16 e = ExpV(Load(s + j0) - m);
          if (j0 == i0) e = allowed ? e : v16{};
          Store(s + j0, e);
          lv += e;
        }
        const float l = HSum(lv);
        M[i0 + r] = m + std::log(l);
        Lsum[i0 + r] = 1.0f / l;
      }
      for (int64_t j0 = 0; j0 < n; j0 += W) TilePB(S + j0, Tp, 1, V + j0 * D, D, O + i0 * D);
      for (int r = 0; r < W; ++r) {  // normalise the rows once, after the weighted sum
        float* orow = O + (i0 + r) * D;
        for (int64_t c = 0; c < D; ++c) orow[c] *= Lsum[i0 + r];
      }
    }
    for (int64_t i = 0; i < T; ++i) L[i] = M[i];
    Scatter(O, op + b * stride, g, hh, 1.0f);
  });
  return ffi::Error::Success();
}

ffi::Error BwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                   ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                   ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                   ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                   int32_t rotary) {
  Dims g;
  if (auto e = GetDims(q, &g); e.failure()) return e;
  Rope rope;
  if (auto e = GetRope(rotary, cos, sin, g, &rope); e.failure()) return e;
  for (auto* x : {&k, &v, &o, &dout})
    if (auto e = SameShape(q, *x); e.failure()) return e;
  const float scale = 1.0f / std::sqrt(static_cast<float>(g.d));
  const int64_t T = g.t, Tp = g.tp, D = g.d, stride = T * g.h * D;
  ParallelFor(pool, g.batch * g.h, [&](int64_t item) {
    const int64_t b = item / g.h, hh = item % g.h;
    float* Q = Scratch(9 * Tp * D + 2 * Tp);
    float *K = Q + Tp * D, *Kt = K + Tp * D, *Vt = Kt + Tp * D, *dO = Vt + Tp * D,
          *tmp = dO + Tp * D, *dQ = tmp + Tp * D, *dK = dQ + Tp * D, *dV = dK + Tp * D,
          *L = dV + Tp * D, *delta = L + Tp;
    const int64_t off = b * stride;
    Gather(q.typed_data() + off, Q, g, hh, scale, rope);
    Gather(k.typed_data() + off, K, g, hh, 1.0f, rope);
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
        TileABt(Q + i0 * D, Kt + j0, Tp, D, P, W);
        TileABt(dO + i0 * D, Vt + j0, Tp, D, dS, W);
        for (int r = 0; r < W; ++r) {
          v16 p = ExpV(Load(P + r * W) - L[i0 + r]);
          if (j0 == i0) p = kIota <= Splat(static_cast<float>(r)) ? p : v16{};  // causal
          Store(P + r * W, p);
          Store(dS + r * W, p * (Load(dS + r * W) - delta[i0 + r]));
        }
        TilePB(P, 1, W, dO + i0 * D, D, dV + j0 * D);   // dV[j] += sum_r P[r][j] dO[r]
        TilePB(dS, 1, W, Q + i0 * D, D, dK + j0 * D);   // dK[j] += sum_r dS[r][j] Qs[r]
        TilePB(dS, W, 1, K + j0 * D, D, dQ + i0 * D);   // dQ[r] += sum_j dS[r][j] K[j]
      }
    }
    Scatter(dQ, dq->typed_data() + off, g, hh, scale, rope);
    Scatter(dK, dk->typed_data() + off, g, hh, 1.0f, rope);
    Scatter(dV, dv->typed_data() + off, g, hh, 1.0f);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(StackopsAttnFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // log-sum-exp
                                  .Attr<int32_t>("rotary"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(StackopsAttnBwd, BwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // log-sum-exp
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d q
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d k
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d v
                                  .Attr<int32_t>("rotary"));
