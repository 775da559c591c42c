// PYRA's backward on CPU, the part both ops share (pyra_backward.cpp: pyra_merge_backward;
// pyra_rows.cpp: pyra_merge_rows_backward): one rank's parameter gradients and its LayerNorm backward.
#pragma once

#include <cstdint>

#include "../common.h"

namespace fpet {
namespace pyra_grad {

// Rank k of an image, with yk = its normalised yh [C] (the forward's LayerNorm output before the
// affine), rstd its 1 / std, gu [C] the gradient of the channel weight's pre-activation u, gvk the
// gradient of the token weight's pre-activation v[k], ak = a[k]:
//   W = yh ln_w + ln_b;  grad_a[k] = <gu, W>;  grad_b += gvk W;
//   g_W = ak gu + gvk b;  grad_ln_weight += g_W yh;  grad_ln_bias += g_W;
// then the LayerNorm backward turns yk into g_y (the gradient of S + T), in place.
// w, g: [C] scratch.
inline void rank_backward(float* yk, float rstd, float gvk, float ak, const float* gu, const float* b,
                          const float* ln_w, const float* ln_b, float* ga_k, float* gb, float* glw, float* glb,
                          float* w, float* g, int64_t C) {
  for (int64_t c = 0; c < C; ++c) w[c] = yk[c] * ln_w[c] + ln_b[c];
  *ga_k = dot_f32(gu, w, C);
  for (int64_t c = 0; c < C; ++c) {
    gb[c] += gvk * w[c];
    const float gW = ak * gu[c] + gvk * b[c];
    glw[c] += gW * yk[c];
    glb[c] += gW;
    g[c] = gW * ln_w[c];  // g_yh
  }
  const float inv_c = 1.0f / static_cast<float>(C);
  const float m1 = sum_f32(g, C) * inv_c;
  const float m2 = dot_f32(g, yk, C) * inv_c;
  for (int64_t c = 0; c < C; ++c) yk[c] = rstd * (g[c] - m1 - yk[c] * m2);
}

}  // namespace pyra_grad
}  // namespace fpet
