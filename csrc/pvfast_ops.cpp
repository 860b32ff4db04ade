// pvfast C++ CPU ops (see pvfast_ops.h for the contracts). One translation unit on purpose: CI
// compiles it on two cores, and torch/extension.h dominates the compile time.
//
// Parallelism: OpenMP over tokens. The linear backward with a weight gradient also splits the
// vocabulary across threads with a rotating (Latin-square) schedule so that every grad_hidden row
// and every grad_weight row has exactly one writer at a time: no atomics, no per-thread copies.
// The extension's libgomp.so.1 dependency resolves to torch's copy (torch is imported first, and
// setup.py adds an rpath to torch's lib folder): one OpenMP runtime, so ATen calls made inside a
// parallel region (at::mm on a tile) see omp_in_parallel() and run single-threaded, not nested.

#include "pvfast_ops.h"
#include "pvfast_stats.h"  // generated from pvfast/objectives/stats.py

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pvfast {
namespace {

// Direct-logits kernels walk a row in chunks of this many entries: 8 KiB of fp32, stays in L1
// while the chunk's max and exp-sum are taken.
constexpr int64_t kVocabChunk = 2048;
// Linear kernels: a tile of kTokenTile tokens against a block of kVocabBlock vocabulary rows gives
// a 256×512 fp32 logit tile (512 KiB, fits L2) and matmuls large enough to run near peak.
constexpr int64_t kTokenTile = 256;
constexpr int64_t kVocabBlock = 512;
// Few scored tokens (one DPO pair has a few hundred): shrink the forward's tile so every thread
// gets one, but not below this many rows, where the matmul would stop paying for itself.
constexpr int64_t kMinTokenTile = 32;
// Segment statistics: below this many tokens one thread is faster than starting a team.
constexpr int64_t kStatsParallelMinTokens = 1 << 15;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int team_threads() { return std::max(1, at::get_num_threads()); }
int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// ---------------------------------------------------------------------------------------------
// Vectorisable fp32 exp. glibc's expf only vectorises under -ffast-math, which we do not want for
// the whole file; this one is plain arithmetic that `omp simd` turns into SIMD code (setup.py adds
// -fno-trapping-math so that the clamps compile to min/max instead of branches).
// exp(x) = 2^n · exp(r), n = round(x / ln 2), r = x − n ln 2 ∈ [−ln2/2, ln2/2] (Cody–Waite split
// of ln 2 keeps r exact); exp(r) by its Taylor series to degree 7 (truncation < 6e-9 relative).
// x is clamped to [−87, 88]: below, the true value (< 2e-38) is negligible next to any sum or
// probability it enters; above cannot happen here (arguments are x − max or x − lse, ≤ ~0).
inline float exp_fp32(float x) {
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  // round to nearest by the 1.5·2^23 trick: adding it leaves no fraction bits
  constexpr float kRound = 12582912.0f;
  const float nf = (xc * 1.44269504088896341f + kRound) - kRound;
  const int32_t n = static_cast<int32_t>(nf);
  const float r = (xc - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (n + 127) << 23;  // 2^n, n ∈ [−126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// The three row loops below carry nearly all non-matmul time. On x86-64 Linux with GCC they are
// compiled for AVX-512, AVX2 and baseline SSE2 and picked at load time (no -march flag needed).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PVFAST_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PVFAST_SIMD_CLONES
#endif

PVFAST_SIMD_CLONES float max_of(const float* x, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// Σ_i exp(x_i − shift)
PVFAST_SIMD_CLONES float sum_exp_shifted(const float* x, int64_t n, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_fp32(x[i] - shift);
  return s;
}

// out_i = −g · exp(x_i − lse): the softmax part of g (onehot − softmax); out may alias x.
PVFAST_SIMD_CLONES void neg_scaled_softmax(const float* x, int64_t n, float lse, float g,
                                           float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = -g * exp_fp32(x[i] - lse);
}

// out_i = exp(x_i − shift), returns Σ_i out_i; out may alias x.
PVFAST_SIMD_CLONES float exp_shifted_into(const float* x, int64_t n, float shift, float* out) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    out[i] = exp_fp32(x[i] - shift);
    s += out[i];
  }
  return s;
}

// Final-logit soft-capping (Gemma 2): z' = c·tanh(z / c), in place, written as c − 2c / (exp(2z/c) + 1)
// so that it vectorises with exp_fp32 (absolute error ≈ c · 1e-7; saturates to ±c, never NaN).
PVFAST_SIMD_CLONES void softcap_inplace(float* x, int64_t n, float cap) {
  const float two_over_cap = 2.0f / cap;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = cap - 2.0f * cap / (exp_fp32(x[i] * two_over_cap) + 1.0f);
}

// Capped rows (x = z'): out_i = exp(x_i − shift) · (1 − (x_i / c)²), the softmax weight times
// dz'/dz; returns Σ_i exp(x_i − shift) (the softmax normaliser has no derivative factor). out may alias x.
PVFAST_SIMD_CLONES float exp_shifted_capped_into(const float* x, int64_t n, float shift, float inv_cap,
                                                 float* out) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const float e = exp_fp32(x[i] - shift);
    const float r = x[i] * inv_cap;
    s += e;
    out[i] = e * (1.0f - r * r);
  }
  return s;
}

// Capped rows (x = z'): out_i = −g · exp(x_i − lse) · (1 − (x_i / c)²); out may alias x.
PVFAST_SIMD_CLONES void neg_scaled_capped_softmax(const float* x, int64_t n, float lse, float g,
                                                  float inv_cap, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float r = x[i] * inv_cap;
    out[i] = -g * exp_fp32(x[i] - lse) * (1.0f - r * r);
  }
}

// dz'/dz = 1 − (z'/c)² at a capped logit z' (1 when capping is off).
inline float softcap_slope(float capped, float cap) {
  if (cap <= 0.0f) return 1.0f;
  const float r = capped / cap;
  return 1.0f - r * r;
}

// Online log-sum-exp state of one row: running max m and Σ exp(x − m).
// The running sum is a double: a vocabulary of 150k entries is hundreds of block sums, and their fp32
// accumulation would cost more accuracy than the fp32 exp of each entry.
struct OnlineLse {
  float max = kNegInf;
  double sum = 0.0;

  void add_block(const float* x, int64_t n) {
    const float block_max = max_of(x, n);
    if (block_max == kNegInf) return;  // every entry is −inf: contributes nothing
    if (block_max > max) {
      sum *= std::exp(static_cast<double>(max) - block_max);
      max = block_max;
    }
    sum += sum_exp_shifted(x, n, max);
  }
  float value() const { return max == kNegInf ? kNegInf : static_cast<float>(max + std::log(sum)); }
};

// acc[i] += add[i] for n entries: an fp32 block product folded into a double accumulator, so that the
// accumulated error does not grow with the number of vocabulary blocks (V / kVocabBlock of them).
PVFAST_SIMD_CLONES void accumulate_double(double* acc, const float* add, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += add[i];
}

// A float view of n entries of src: src itself for fp32, else converted into buf.
template <typename scalar_t>
const float* as_fp32(const scalar_t* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

// ---------------------------------------------------------------------------------------------
// Argument checks (run before any parallel region: nothing may throw inside one).

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "pvfast._C: ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "pvfast._C: ", name, " must be a CPU tensor, got device ",
              t.device());
}

void check_float_matrix(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 2, "pvfast._C: ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(is_supported_float(t.scalar_type()), "pvfast._C: ", name,
              " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

void check_vector(const at::Tensor& t, int64_t n, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "pvfast._C: ", name, " must have shape (", n,
              "), got ", t.sizes());
}

void check_float_vector(const at::Tensor& t, int64_t n, const char* name) {
  check_vector(t, n, name);
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "pvfast._C: ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

void check_f32_vector(const at::Tensor& t, int64_t n, const char* name) {
  check_vector(t, n, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "pvfast._C: ", name, " must be float32, got ",
              t.scalar_type());
}

// targets: (n,) int64, each either ignore_index or a valid vocabulary index.
void check_targets(const at::Tensor& targets, int64_t n, int64_t vocab, int64_t ignore_index) {
  check_vector(targets, n, "targets");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "pvfast._C: targets must be int64, got ",
              targets.scalar_type());
  if (n == 0) return;
  const at::Tensor scored = targets.ne(ignore_index);
  const bool out_of_range = (scored & (targets.lt(0) | targets.ge(vocab))).any().item<bool>();
  TORCH_CHECK(!out_of_range, "pvfast._C: targets must lie in [0, ", vocab,
              ") or equal ignore_index=", ignore_index, "; found ",
              targets.masked_select(scored & (targets.lt(0) | targets.ge(vocab)))[0].item<int64_t>());
}

// Indices of the tokens whose target is not ignore_index: only these are ever computed.
std::vector<int64_t> scored_tokens(const int64_t* targets, int64_t n, int64_t ignore_index) {
  std::vector<int64_t> rows;
  rows.reserve(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t)
    if (targets[t] != ignore_index) rows.push_back(t);
  return rows;
}

// Calls fn(scalar_t{}) for the three supported input dtypes (checked earlier). Smaller than
// AT_DISPATCH_FLOATING_TYPES_AND2, which would also instantiate every kernel for double.
template <typename Fn>
void dispatch_float(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    case at::kHalf: fn(at::Half{}); break;
    default: TORCH_CHECK(false, "pvfast._C: unsupported dtype ", dtype);
  }
}

at::TensorOptions f32_cpu() { return at::TensorOptions().dtype(at::kFloat).device(at::kCPU); }

// [lo, hi) of part `part` when `total` items are split into `parts` near-equal contiguous ranges.
std::pair<int64_t, int64_t> split_range(int64_t total, int64_t parts, int64_t part) {
  return {total * part / parts, total * (part + 1) / parts};
}

}  // namespace

// =============================================================================================
// Direct logits

std::tuple<at::Tensor, at::Tensor> token_logprobs_fwd(
    const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  check_float_matrix(logits, "logits");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0, "pvfast._C: logits has an empty vocabulary dimension");
  TORCH_CHECK(logits.stride(1) == 1 || vocab == 1, "pvfast._C: logits must have unit stride along "
              "the vocabulary (last) dimension, got strides ", logits.strides(),
              "; a copy would cost an N×V buffer, so pass .contiguous() explicitly if intended");
  check_targets(targets, n, vocab, ignore_index);

  const at::Tensor tgt = targets.contiguous();
  at::Tensor logp = at::empty({n}, f32_cpu());
  at::Tensor lse = at::empty({n}, f32_cpu());
  const int64_t* y = tgt.data_ptr<int64_t>();
  float* logp_out = logp.data_ptr<float>();
  float* lse_out = lse.data_ptr<float>();
  const int64_t row_stride = logits.stride(0);

  dispatch_float(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* base = logits.data_ptr<scalar_t>();
#pragma omp parallel for schedule(static) num_threads(team_threads())
    for (int64_t t = 0; t < n; ++t) {
      if (y[t] == ignore_index) {
        logp_out[t] = 0.0f;
        lse_out[t] = 0.0f;
        continue;
      }
      const scalar_t* row = base + t * row_stride;
      float chunk[kVocabChunk];
      OnlineLse acc;
      for (int64_t v0 = 0; v0 < vocab; v0 += kVocabChunk) {
        const int64_t len = std::min(kVocabChunk, vocab - v0);
        acc.add_block(as_fp32(row + v0, len, chunk), len);
      }
      const float row_lse = acc.value();
      lse_out[t] = row_lse;
      logp_out[t] = static_cast<float>(row[y[t]]) - row_lse;
    }
  });
  return {logp, lse};
}

at::Tensor token_logprobs_bwd(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
    const at::Tensor& grad_logp, int64_t ignore_index) {
  check_float_matrix(logits, "logits");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(logits.stride(1) == 1 || vocab == 1, "pvfast._C: logits must have unit stride along "
              "the vocabulary (last) dimension, got strides ", logits.strides());
  check_targets(targets, n, vocab, ignore_index);
  check_f32_vector(lse, n, "lse");
  check_f32_vector(grad_logp, n, "grad_logp");

  const at::Tensor tgt = targets.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor grad_c = grad_logp.contiguous();
  at::Tensor grad_logits = at::empty({n, vocab}, logits.options());
  const int64_t* y = tgt.data_ptr<int64_t>();
  const float* row_lse = lse_c.data_ptr<float>();
  const float* g = grad_c.data_ptr<float>();
  const int64_t row_stride = logits.stride(0);

  dispatch_float(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* base = logits.data_ptr<scalar_t>();
    scalar_t* out_base = grad_logits.data_ptr<scalar_t>();
#pragma omp parallel for schedule(static) num_threads(team_threads())
    for (int64_t t = 0; t < n; ++t) {
      scalar_t* out = out_base + t * vocab;
      const float gt = g[t];
      if (y[t] == ignore_index || gt == 0.0f) {
        std::fill(out, out + vocab, static_cast<scalar_t>(0.0f));
        continue;
      }
      const scalar_t* row = base + t * row_stride;
      const float shift = row_lse[t];
      float chunk[kVocabChunk];
      for (int64_t v0 = 0; v0 < vocab; v0 += kVocabChunk) {
        const int64_t len = std::min(kVocabChunk, vocab - v0);
        const float* x = as_fp32(row + v0, len, chunk);
        // d ℓ_t / d logit_v = onehot − p_v; scaled by the upstream g_t
        const int64_t hit = y[t] - v0;
        if constexpr (std::is_same_v<scalar_t, float>) {
          float* o = out + v0;
          neg_scaled_softmax(x, len, shift, gt, o);
          if (hit >= 0 && hit < len) o[hit] += gt;
        } else {
          // reduced precision output: add the one-hot term in fp32 before rounding
          float* tmp = chunk;  // x may alias chunk; compute in place
          neg_scaled_softmax(x, len, shift, gt, tmp);
          if (hit >= 0 && hit < len) tmp[hit] += gt;
          scalar_t* o = out + v0;
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) o[i] = static_cast<scalar_t>(tmp[i]);
        }
      }
    }
  });
  return grad_logits;
}

// =============================================================================================
// Linear (hidden · weightᵀ) logits, never stored

namespace {

// The inputs of one linear call, checked, with the scored tokens listed.
struct LinearProblem {
  at::Tensor hidden;  // (N, H) contiguous, caller's dtype
  at::Tensor weight;  // (V, H) contiguous, caller's dtype
  at::Tensor targets;  // (N,) int64 contiguous
  int64_t n, hidden_size, vocab;
  std::vector<int64_t> rows;  // scored token indices
  int64_t num_blocks;         // ceil(V / kVocabBlock)
  float softcap;              // c of z' = c·tanh(z/c); 0 = no capping
};

LinearProblem make_linear_problem(const at::Tensor& hidden, const at::Tensor& weight,
                                  const at::Tensor& targets, int64_t ignore_index, double softcap) {
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), "pvfast._C: softcap must be a finite number > 0 "
              "(or 0 for no capping), got ", softcap);
  check_float_matrix(hidden, "hidden");
  check_float_matrix(weight, "weight");
  TORCH_CHECK(hidden.size(1) == weight.size(1), "pvfast._C: hidden (N, H) and weight (V, H) "
              "disagree on H: hidden ", hidden.sizes(), ", weight ", weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, "pvfast._C: weight has an empty vocabulary dimension");
  LinearProblem p;
  p.n = hidden.size(0);
  p.hidden_size = hidden.size(1);
  p.vocab = weight.size(0);
  check_targets(targets, p.n, p.vocab, ignore_index);
  // detach: the ATen calls below run on OpenMP threads and must never record autograd history
  p.hidden = hidden.detach().contiguous();
  p.weight = weight.detach().contiguous();
  p.targets = targets.contiguous();
  p.rows = scored_tokens(p.targets.data_ptr<int64_t>(), p.n, ignore_index);
  p.num_blocks = (p.vocab + kVocabBlock - 1) / kVocabBlock;
  p.softcap = static_cast<float>(softcap);
  return p;
}

// Per-thread scratch for one token tile: every buffer is allocated before the parallel region.
struct TileScratch {
  at::Tensor hidden_tile;  // (kTokenTile·H) fp32: the tile's hidden rows
  at::Tensor logit_tile;   // (kTokenTile·kVocabBlock) fp32: logits, then their gradient
  at::Tensor weight_block;  // (kVocabBlock·H) fp32 copy of a weight block (non-fp32 weights only)
  at::Tensor grad_hidden_tile;  // (kTokenTile·H) fp32: one vocabulary block's product (backward only)
  std::vector<double> acc_tile;  // (kTokenTile·H) double: the tile's accumulator over blocks (backward only)
};

std::vector<TileScratch> make_scratch(const LinearProblem& p, int threads, bool backward) {
  std::vector<TileScratch> scratch(static_cast<size_t>(threads));
  const bool convert_weight = p.weight.scalar_type() != at::kFloat;
  for (auto& s : scratch) {
    s.hidden_tile = at::empty({kTokenTile * p.hidden_size}, f32_cpu());
    s.logit_tile = at::empty({kTokenTile * kVocabBlock}, f32_cpu());
    if (convert_weight) s.weight_block = at::empty({kVocabBlock * p.hidden_size}, f32_cpu());
    if (backward) {
      s.grad_hidden_tile = at::empty({kTokenTile * p.hidden_size}, f32_cpu());
      s.acc_tile.resize(static_cast<size_t>(kTokenTile * p.hidden_size));
    }
  }
  return scratch;
}

// Gather tile_rows hidden rows (token indices rows[0..tile_rows)) into dst as fp32 (tile_rows, H).
template <typename scalar_t>
void gather_hidden(const scalar_t* hidden, int64_t hidden_size, const int64_t* rows,
                   int64_t tile_rows, float* dst) {
  for (int64_t r = 0; r < tile_rows; ++r) {
    const scalar_t* src = hidden + rows[r] * hidden_size;
    float* out = dst + r * hidden_size;
#pragma omp simd
    for (int64_t k = 0; k < hidden_size; ++k) out[k] = static_cast<float>(src[k]);
  }
}

void gather_hidden_fp32(const at::Tensor& hidden, const int64_t* rows, int64_t tile_rows,
                        float* dst) {
  dispatch_float(hidden.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    gather_hidden(hidden.data_ptr<scalar_t>(), hidden.size(1), rows, tile_rows, dst);
  });
}

// Weight rows [v0, v0 + len) as an fp32 (len, H) tensor: a view for fp32 weights, else a converted copy.
at::Tensor weight_block_fp32(const LinearProblem& p, TileScratch& s, int64_t v0, int64_t len) {
  const at::Tensor block = p.weight.narrow(0, v0, len);
  if (p.weight.scalar_type() == at::kFloat) return block;
  at::Tensor dst = s.weight_block.narrow(0, 0, len * p.hidden_size).view({len, p.hidden_size});
  dst.copy_(block);
  return dst;
}

// Row v of a (V, H) float matrix as fp32: a pointer into it for fp32, else converted into buf.
const float* as_fp32_row(const at::Tensor& matrix, int64_t v, float* buf) {
  const float* out = nullptr;
  dispatch_float(matrix.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const int64_t cols = matrix.size(1);
    out = as_fp32(matrix.data_ptr<scalar_t>() + v * cols, cols, buf);
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_token_logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    int64_t ignore_index, double softcap) {
  const LinearProblem p = make_linear_problem(hidden, weight, targets, ignore_index, softcap);
  at::Tensor logp = at::zeros({p.n}, f32_cpu());
  at::Tensor lse = at::zeros({p.n}, f32_cpu());
  const int64_t num_scored = static_cast<int64_t>(p.rows.size());
  if (num_scored == 0) return {logp, lse};

  const int threads = team_threads();
  const int64_t per_thread = (num_scored + threads - 1) / threads;
  const int64_t tile = std::min(kTokenTile, std::max(kMinTokenTile, per_thread));
  std::vector<TileScratch> scratch = make_scratch(p, threads, /*backward=*/false);
  float* logp_out = logp.data_ptr<float>();
  float* lse_out = lse.data_ptr<float>();
  const int64_t* y = p.targets.data_ptr<int64_t>();
  const int64_t H = p.hidden_size;

#pragma omp parallel num_threads(threads)
  {
    at::NoGradGuard no_grad;
    TileScratch& s = scratch[static_cast<size_t>(thread_id())];
    std::vector<OnlineLse> row_lse(kTokenTile);
    std::vector<float> target_logit(kTokenTile);
    // Token tiles are handed out dynamically; each tile sweeps the whole vocabulary.
#pragma omp for schedule(dynamic, 1)
    for (int64_t start = 0; start < num_scored; start += tile) {
      const int64_t tile_rows = std::min(tile, num_scored - start);
      const int64_t* rows = p.rows.data() + start;
      float* h = s.hidden_tile.data_ptr<float>();
      gather_hidden_fp32(p.hidden, rows, tile_rows, h);
      const at::Tensor h_tile = s.hidden_tile.narrow(0, 0, tile_rows * H).view({tile_rows, H});
      std::fill(row_lse.begin(), row_lse.begin() + tile_rows, OnlineLse{});

      for (int64_t b = 0; b < p.num_blocks; ++b) {
        const int64_t v0 = b * kVocabBlock;
        const int64_t len = std::min(kVocabBlock, p.vocab - v0);
        const at::Tensor w_block = weight_block_fp32(p, s, v0, len);
        at::Tensor logits = s.logit_tile.narrow(0, 0, tile_rows * len).view({tile_rows, len});
        at::mm_out(logits, h_tile, w_block.t());
        float* z = logits.data_ptr<float>();
        if (p.softcap > 0.0f) softcap_inplace(z, tile_rows * len, p.softcap);
        for (int64_t r = 0; r < tile_rows; ++r) {
          const float* row = z + r * len;
          const int64_t hit = y[rows[r]] - v0;
          if (hit >= 0 && hit < len) target_logit[r] = row[hit];
          row_lse[r].add_block(row, len);
        }
      }
      for (int64_t r = 0; r < tile_rows; ++r) {
        const float value = row_lse[r].value();
        lse_out[rows[r]] = value;
        logp_out[rows[r]] = target_logit[r] - value;
      }
    }
  }
  return {logp, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_fwd_with_grad(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    int64_t ignore_index, double softcap) {
  const LinearProblem p = make_linear_problem(hidden, weight, targets, ignore_index, softcap);
  const int64_t H = p.hidden_size;
  at::Tensor logp = at::zeros({p.n}, f32_cpu());
  at::Tensor lse = at::zeros({p.n}, f32_cpu());
  at::Tensor direction = at::zeros({p.n, H}, f32_cpu());
  const int64_t num_scored = static_cast<int64_t>(p.rows.size());
  if (num_scored == 0) return {logp, lse, direction};

  const int threads = team_threads();
  const int64_t per_thread = (num_scored + threads - 1) / threads;
  const int64_t tile = std::min(kTokenTile, std::max(kMinTokenTile, per_thread));
  // backward=true: acc_tile holds the tile's running Σ_v exp(z_v − m) W_v (double), grad_hidden_tile
  // one block's product
  std::vector<TileScratch> scratch = make_scratch(p, threads, /*backward=*/true);
  float* logp_out = logp.data_ptr<float>();
  float* lse_out = lse.data_ptr<float>();
  float* dir_out = direction.data_ptr<float>();
  const int64_t* y = p.targets.data_ptr<int64_t>();

#pragma omp parallel num_threads(threads)
  {
    at::NoGradGuard no_grad;
    TileScratch& s = scratch[static_cast<size_t>(thread_id())];
    std::vector<OnlineLse> row_lse(kTokenTile);
    std::vector<float> target_logit(kTokenTile);
    std::vector<float> target_row(H);
#pragma omp for schedule(dynamic, 1)
    for (int64_t start = 0; start < num_scored; start += tile) {
      const int64_t tile_rows = std::min(tile, num_scored - start);
      const int64_t* rows = p.rows.data() + start;
      gather_hidden_fp32(p.hidden, rows, tile_rows, s.hidden_tile.data_ptr<float>());
      const at::Tensor h_tile = s.hidden_tile.narrow(0, 0, tile_rows * H).view({tile_rows, H});
      at::Tensor prod_tile = s.grad_hidden_tile.narrow(0, 0, tile_rows * H).view({tile_rows, H});
      double* acc = s.acc_tile.data();
      std::fill(acc, acc + tile_rows * H, 0.0);
      std::fill(row_lse.begin(), row_lse.begin() + tile_rows, OnlineLse{});

      for (int64_t b = 0; b < p.num_blocks; ++b) {
        const int64_t v0 = b * kVocabBlock;
        const int64_t len = std::min(kVocabBlock, p.vocab - v0);
        const at::Tensor w_block = weight_block_fp32(p, s, v0, len);
        at::Tensor probs = s.logit_tile.narrow(0, 0, tile_rows * len).view({tile_rows, len});
        at::mm_out(probs, h_tile, w_block.t());
        float* z = probs.data_ptr<float>();
        if (p.softcap > 0.0f) softcap_inplace(z, tile_rows * len, p.softcap);
        // in place: logits → exp(z − m_new) (times dz'/dz when capped); the accumulator row is
        // rescaled when its max grows, exactly like the online log-sum-exp (flash-attention style)
        for (int64_t r = 0; r < tile_rows; ++r) {
          float* row = z + r * len;
          const int64_t hit = y[rows[r]] - v0;
          if (hit >= 0 && hit < len) target_logit[r] = row[hit];
          OnlineLse& state = row_lse[r];
          const float block_max = max_of(row, len);
          if (block_max == kNegInf) {  // contributes nothing
            std::fill(row, row + len, 0.0f);
            continue;
          }
          if (block_max > state.max) {
            const double scale = std::exp(static_cast<double>(state.max) - block_max);
            state.sum *= scale;
            double* a = acc + r * H;
#pragma omp simd
            for (int64_t k = 0; k < H; ++k) a[k] *= scale;
            state.max = block_max;
          }
          state.sum += p.softcap > 0.0f
                           ? exp_shifted_capped_into(row, len, state.max, 1.0f / p.softcap, row)
                           : exp_shifted_into(row, len, state.max, row);
        }
        at::mm_out(prod_tile, probs, w_block);
        accumulate_double(acc, prod_tile.data_ptr<float>(), tile_rows * H);
      }
      for (int64_t r = 0; r < tile_rows; ++r) {
        const int64_t t = rows[r];
        const float value = row_lse[r].value();
        lse_out[t] = value;
        logp_out[t] = target_logit[r] - value;
        // dℓ_t/dh_t = s_y W[y_t] − Σ_v softmax_v s_v W_v = s_y W[y_t] − acc / sum, with the slope
        // s_v = dz'_v/dz_v of the soft-cap (1 without capping)
        const float* w_target = as_fp32_row(p.weight, y[t], target_row.data());
        const float slope = softcap_slope(target_logit[r], p.softcap);
        const double inv_sum = 1.0 / row_lse[r].sum;
        const double* a = acc + r * H;
        float* dst = dir_out + t * H;
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) dst[k] = static_cast<float>(slope * w_target[k] - a[k] * inv_sum);
      }
    }
  }
  return {logp, lse, direction};
}

std::tuple<at::Tensor, at::Tensor> linear_token_logprobs_bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const at::Tensor& lse, const at::Tensor& grad_logp, int64_t ignore_index, double softcap,
    bool need_weight_grad) {
  const LinearProblem p = make_linear_problem(hidden, weight, targets, ignore_index, softcap);
  check_f32_vector(lse, p.n, "lse");
  check_f32_vector(grad_logp, p.n, "grad_logp");
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor grad_c = grad_logp.contiguous();
  const int64_t H = p.hidden_size;

  // fp32 accumulators; for fp32 inputs they are the outputs themselves
  at::Tensor grad_hidden32 = at::zeros({p.n, H}, f32_cpu());
  at::Tensor grad_weight32 = need_weight_grad ? at::zeros({p.vocab, H}, f32_cpu()) : at::Tensor();
  const int64_t num_scored = static_cast<int64_t>(p.rows.size());

  if (num_scored > 0) {
    const int threads = team_threads();
    std::vector<TileScratch> scratch = make_scratch(p, threads, /*backward=*/true);
    const int64_t* y = p.targets.data_ptr<int64_t>();
    const float* row_lse = lse_c.data_ptr<float>();
    const float* g = grad_c.data_ptr<float>();
    float* gh_out = grad_hidden32.data_ptr<float>();

#pragma omp parallel num_threads(threads)
    {
      at::NoGradGuard no_grad;
      const int me = thread_id();
      const int team = team_size();
      TileScratch& s = scratch[static_cast<size_t>(me)];
      // Thread `me` owns token group `me` (its grad_hidden rows) for the whole call. With a weight
      // gradient there are `team` rounds: in round r it takes vocabulary group (me + r) % team, so
      // each grad_weight row has one writer per round and the barrier separates the rounds.
      const auto [tok_lo, tok_hi] = split_range(num_scored, team, me);
      const int rounds = need_weight_grad ? team : 1;
      for (int round = 0; round < rounds; ++round) {
        const auto [blk_lo, blk_hi] = need_weight_grad
            ? split_range(p.num_blocks, team, (me + round) % team)
            : std::pair<int64_t, int64_t>{0, p.num_blocks};
        for (int64_t start = tok_lo; start < tok_hi && blk_lo < blk_hi; start += kTokenTile) {
          const int64_t tile_rows = std::min(kTokenTile, tok_hi - start);
          const int64_t* rows = p.rows.data() + start;
          gather_hidden_fp32(p.hidden, rows, tile_rows, s.hidden_tile.data_ptr<float>());
          const at::Tensor h_tile = s.hidden_tile.narrow(0, 0, tile_rows * H).view({tile_rows, H});
          at::Tensor prod_tile = s.grad_hidden_tile.narrow(0, 0, tile_rows * H).view({tile_rows, H});
          double* gh = s.acc_tile.data();
          std::fill(gh, gh + tile_rows * H, 0.0);

          for (int64_t b = blk_lo; b < blk_hi; ++b) {
            const int64_t v0 = b * kVocabBlock;
            const int64_t len = std::min(kVocabBlock, p.vocab - v0);
            const at::Tensor w_block = weight_block_fp32(p, s, v0, len);
            at::Tensor dlogits = s.logit_tile.narrow(0, 0, tile_rows * len).view({tile_rows, len});
            at::mm_out(dlogits, h_tile, w_block.t());
            float* z = dlogits.data_ptr<float>();
            if (p.softcap > 0.0f) softcap_inplace(z, tile_rows * len, p.softcap);
            // in place: logits → g_t (onehot − softmax) · dz'/dz
            for (int64_t r = 0; r < tile_rows; ++r) {
              const int64_t t = rows[r];
              float* row = z + r * len;
              const float gt = g[t];
              const float shift = row_lse[t];
              const int64_t hit = y[t] - v0;
              const bool has_hit = hit >= 0 && hit < len;
              const float hit_slope = has_hit ? softcap_slope(row[hit], p.softcap) : 0.0f;
              if (p.softcap > 0.0f) {
                neg_scaled_capped_softmax(row, len, shift, gt, 1.0f / p.softcap, row);
              } else {
                neg_scaled_softmax(row, len, shift, gt, row);
              }
              if (has_hit) row[hit] += gt * hit_slope;
            }
            at::mm_out(prod_tile, dlogits, w_block);
            accumulate_double(gh, prod_tile.data_ptr<float>(), tile_rows * H);
            if (need_weight_grad) {
              grad_weight32.narrow(0, v0, len).addmm_(dlogits.t(), h_tile);
            }
          }
          for (int64_t r = 0; r < tile_rows; ++r) {
            float* dst = gh_out + rows[r] * H;
            const double* src = gh + r * H;
#pragma omp simd
            for (int64_t k = 0; k < H; ++k) dst[k] = static_cast<float>(dst[k] + src[k]);
          }
        }
        if (rounds > 1) {
#pragma omp barrier
        }
      }
    }
  }

  at::Tensor grad_hidden = grad_hidden32.to(hidden.scalar_type());
  at::Tensor grad_weight = need_weight_grad ? grad_weight32.to(weight.scalar_type())
                                            : at::empty({0}, weight.options());
  return {grad_hidden, grad_weight};
}

// =============================================================================================
// Per-completion statistics: columns, values and gradient come from pvfast_stats.h, generated from
// pvfast/objectives/stats.py (the one definition of the contract).

namespace {

using stats::kNumStats;

struct SegmentInputs {
  at::Tensor logp, weights, segment_ids;  // contiguous; logp and weights fp32
  int64_t n;
};

SegmentInputs make_segment_inputs(const at::Tensor& logp, const at::Tensor& weights,
                                  const at::Tensor& segment_ids, int64_t num_segments) {
  check_cpu(logp, "logp");
  TORCH_CHECK(logp.dim() == 1, "pvfast._C: logp must be 1-D, got shape ", logp.sizes());
  const int64_t n = logp.size(0);
  check_float_vector(logp, n, "logp");
  check_float_vector(weights, n, "weights");
  check_vector(segment_ids, n, "segment_ids");
  TORCH_CHECK(segment_ids.scalar_type() == at::kLong, "pvfast._C: segment_ids must be int64, got ",
              segment_ids.scalar_type());
  TORCH_CHECK(num_segments >= 0, "pvfast._C: num_segments must be >= 0, got ", num_segments);
  if (n > 0) {
    const int64_t max_id = segment_ids.max().item<int64_t>();
    TORCH_CHECK(max_id < num_segments, "pvfast._C: segment_ids must be < num_segments=",
                num_segments, " (or negative for unscored tokens), found ", max_id);
  }
  return {logp.detach().to(at::kFloat).contiguous(), weights.detach().to(at::kFloat).contiguous(),
          segment_ids.contiguous(), n};
}

}  // namespace

at::Tensor segment_stats_fwd(
    const at::Tensor& logp, const at::Tensor& weights, const at::Tensor& segment_ids,
    int64_t num_segments, double log_tau) {
  const SegmentInputs in = make_segment_inputs(logp, weights, segment_ids, num_segments);
  const float* lp = in.logp.data_ptr<float>();
  const float* w = in.weights.data_ptr<float>();
  const int64_t* seg = in.segment_ids.data_ptr<int64_t>();
  // compare in fp32 like the torch reference (a float32 tensor against a Python float)
  const float threshold = static_cast<float>(log_tau);
  const int threads = in.n >= kStatsParallelMinTokens ? team_threads() : 1;
  const int64_t row = num_segments * kNumStats;
  // one partial table per thread, summed in thread order afterwards: deterministic, race-free
  std::vector<double> partial(static_cast<size_t>(threads * row), 0.0);

#pragma omp parallel num_threads(threads)
  {
    double* acc = partial.data() + static_cast<int64_t>(thread_id()) * row;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < in.n; ++t) {
      const int64_t m = seg[t];
      if (m < 0) continue;
      // the gate compares in fp32 (as every backend does); the sums run in double
      const double gate = stats::gate<float>(lp[t], threshold);
      stats::accumulate<double>(acc + m * kNumStats, lp[t], w[t], gate);
    }
  }
  at::Tensor result = at::empty({num_segments, kNumStats}, f32_cpu());
  float* out = result.data_ptr<float>();
  for (int64_t i = 0; i < row; ++i) {
    double total = 0.0;
    for (int th = 0; th < threads; ++th) total += partial[static_cast<size_t>(th * row + i)];
    out[i] = static_cast<float>(total);
  }
  return result;
}

at::Tensor segment_stats_bwd(
    const at::Tensor& logp, const at::Tensor& weights, const at::Tensor& segment_ids,
    const at::Tensor& grad_stats, double log_tau) {
  check_cpu(grad_stats, "grad_stats");
  TORCH_CHECK(grad_stats.dim() == 2 && grad_stats.size(1) == kNumStats,
              "pvfast._C: grad_stats must have shape (M, ", kNumStats, "), got ", grad_stats.sizes());
  TORCH_CHECK(at::isFloatingType(grad_stats.scalar_type()),
              "pvfast._C: grad_stats must be floating point, got ", grad_stats.scalar_type());
  const int64_t num_segments = grad_stats.size(0);
  const SegmentInputs in = make_segment_inputs(logp, weights, segment_ids, num_segments);
  const at::Tensor G = grad_stats.detach().to(at::kFloat).contiguous();
  const float* gs = G.data_ptr<float>();
  const float* lp = in.logp.data_ptr<float>();
  const float* w = in.weights.data_ptr<float>();
  const int64_t* seg = in.segment_ids.data_ptr<int64_t>();
  const float threshold = static_cast<float>(log_tau);
  at::Tensor grad_logp = at::empty({in.n}, f32_cpu());
  float* out = grad_logp.data_ptr<float>();
  const int threads = in.n >= kStatsParallelMinTokens ? team_threads() : 1;

#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < in.n; ++t) {
    const int64_t m = seg[t];
    if (m < 0) {
      out[t] = 0.0f;
      continue;
    }
    const float gate = stats::gate<float>(lp[t], threshold);
    out[t] = stats::logp_grad<float>(gs + m * kNumStats, w[t], gate);
  }
  return grad_logp;
}

}  // namespace pvfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "pvfast C++ CPU ops (OpenMP): per-token log-probs and per-completion statistics";
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("token_logprobs_fwd", &pvfast::token_logprobs_fwd, no_gil,
        "(logits[N,V], targets int64[N], ignore_index) -> (logp f32[N], lse f32[N])",
        py::arg("logits"), py::arg("targets"), py::arg("ignore_index"));
  m.def("token_logprobs_bwd", &pvfast::token_logprobs_bwd, no_gil,
        "(logits, targets, lse, grad_logp, ignore_index) -> grad_logits[N,V] (dtype of logits)",
        py::arg("logits"), py::arg("targets"), py::arg("lse"), py::arg("grad_logp"),
        py::arg("ignore_index"));
  m.def("linear_token_logprobs_fwd", &pvfast::linear_token_logprobs_fwd, no_gil,
        "(hidden[N,H], weight[V,H], targets int64[N], ignore_index, softcap) -> "
        "(logp f32[N], lse f32[N]); softcap c > 0 caps the logits to c·tanh(z/c), 0 = off",
        py::arg("hidden"), py::arg("weight"), py::arg("targets"), py::arg("ignore_index"),
        py::arg("softcap"));
  m.def("linear_token_logprobs_fwd_with_grad", &pvfast::linear_token_logprobs_fwd_with_grad, no_gil,
        "(hidden[N,H], weight[V,H], targets int64[N], ignore_index, softcap) -> "
        "(logp f32[N], lse f32[N], grad_direction f32[N,H] = dlogp/dhidden)",
        py::arg("hidden"), py::arg("weight"), py::arg("targets"), py::arg("ignore_index"),
        py::arg("softcap"));
  m.def("linear_token_logprobs_bwd", &pvfast::linear_token_logprobs_bwd, no_gil,
        "(hidden, weight, targets, lse, grad_logp, ignore_index, softcap, need_weight_grad) -> "
        "(grad_hidden[N,H], grad_weight[V,H] or empty)",
        py::arg("hidden"), py::arg("weight"), py::arg("targets"), py::arg("lse"),
        py::arg("grad_logp"), py::arg("ignore_index"), py::arg("softcap"),
        py::arg("need_weight_grad"));
  m.def("segment_stats_fwd", &pvfast::segment_stats_fwd, no_gil,
        "(logp[N], weights[N], segment_ids int64[N], num_segments, log_tau) -> stats f32[M,7]",
        py::arg("logp"), py::arg("weights"), py::arg("segment_ids"), py::arg("num_segments"),
        py::arg("log_tau"));
  m.def("segment_stats_bwd", &pvfast::segment_stats_bwd, no_gil,
        "(logp, weights, segment_ids, grad_stats[M,7], log_tau) -> grad_logp f32[N]",
        py::arg("logp"), py::arg("weights"), py::arg("segment_ids"), py::arg("grad_stats"),
        py::arg("log_tau"));
}
