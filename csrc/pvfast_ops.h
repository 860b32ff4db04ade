// pvfast C++ CPU ops: per-token log-probs without materialising N×V probabilities, and the
// per-completion statistics of pvfast/objectives/stats.py (columns and math from the generated
// pvfast_stats.h). Compiled into `pvfast._C` by setup.py.
//
// Conventions shared by every function:
//   - N tokens, V vocabulary entries, H hidden size, M completions (segments).
//   - logits / hidden / weight may be float32, bfloat16 or float16; all arithmetic is fp32.
//   - targets are int64; a token whose target equals ignore_index costs nothing, gets ℓ = 0,
//     lse = 0 and a zero gradient.
//   - Per-token outputs (logp, lse, grad_logp) are float32.
//   - softcap (linear ops): c > 0 replaces every logit z by z' = c·tanh(z/c) before the log-softmax
//     (Gemma 2's final_logit_softcapping), with the chain rule dz'/dz = 1 − (z'/c)² in every gradient;
//     0 = no capping.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace pvfast {

// ℓ_t = logits[t, y_t] − logsumexp(logits[t]), the log-sum-exp computed online over vocabulary chunks.
//   logits (N, V), unit stride along V; targets (N,) int64.
//   Returns (logp (N,) f32, lse (N,) f32).
std::tuple<at::Tensor, at::Tensor> token_logprobs_fwd(
    const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index);

// grad_logits[t] = g_t · (onehot(y_t) − softmax(logits[t])), with softmax = exp(logits − lse).
//   lse and grad_logp (N,) float32. Returns (N, V) in the dtype of logits (the only N×V buffer).
at::Tensor token_logprobs_bwd(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
    const at::Tensor& grad_logp, int64_t ignore_index);

// Same ℓ_t for logits = hidden · weightᵀ, never stored: tiles of tokens × blocks of vocabulary rows.
//   hidden (N, H); weight (V, H); targets (N,) int64. Returns (logp (N,) f32, lse (N,) f32).
std::tuple<at::Tensor, at::Tensor> linear_token_logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    int64_t ignore_index, double softcap);

// The forward above plus the gradient direction dℓ_t/dh_t = s_y W[y_t] − Σ_v softmax(z_t)_v s_v W_v
// (s_v = dz'_v/dz_v of the soft-cap, 1 without it), which
// does not depend on the upstream gradient: for a frozen weight the backward is then
// grad_hidden_t = g_t · direction_t, with no logit recomputation. The softmax-weighted sum is
// accumulated online per vocabulary block (rescaled when the row max grows), never storing N×V.
//   Returns (logp (N,) f32, lse (N,) f32, direction (N, H) f32, zero rows for ignored tokens).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_fwd_with_grad(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    int64_t ignore_index, double softcap);

// Gradients of Σ_t g_t ℓ_t, recomputing each logit block from hidden and weight.
//   Returns (grad_hidden (N, H) dtype of hidden,
//            grad_weight (V, H) dtype of weight, or an empty tensor when need_weight_grad is false).
std::tuple<at::Tensor, at::Tensor> linear_token_logprobs_bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const at::Tensor& lse, const at::Tensor& grad_logp, int64_t ignore_index, double softcap,
    bool need_weight_grad);

// Per-completion sums of pvfast/objectives/stats.py (columns in STAT_FIELDS order).
//   logp, weights (N,) float; segment_ids (N,) int64 in [0, num_segments) or negative = unscored.
//   Returns (num_segments, 7) float32.
at::Tensor segment_stats_fwd(
    const at::Tensor& logp, const at::Tensor& weights, const at::Tensor& segment_ids,
    int64_t num_segments, double log_tau);

// dℓ_t = G[m,0] + w_t G[m,1] − w_t g_t G[m,4] for m = segment of t; 0 for unscored tokens.
//   grad_stats (M, 7). Returns grad_logp (N,) float32.
at::Tensor segment_stats_bwd(
    const at::Tensor& logp, const at::Tensor& weights, const at::Tensor& segment_ids,
    const at::Tensor& grad_stats, double log_tau);

}  // namespace pvfast
