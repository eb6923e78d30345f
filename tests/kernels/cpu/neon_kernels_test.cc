// The NEON kernels (kernels/cpu/*_neon.cc) against plain double-precision loops, built for aarch64 and run
// under qemu-aarch64 by test_neon_qemu.py (or natively on an aarch64 machine). Prints one JSON object: the
// largest normalized error of each kernel over its cases; the Python test compares them with the tolerance
// table. Needs no XLA: the kernels' NEON files depend only on their own headers.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels/cpu/int4_matmul.h"
#include "kernels/cpu/paged_attention.h"

namespace {

std::mt19937 rng(1234);

float Uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }
float Normal() { return std::normal_distribution<float>(0.f, 1.f)(rng); }

double NormalizedError(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1.0));
}

double Int4Case(int64_t m, int64_t k, int64_t n, int64_t gs, bool asym) {
  using tokenlab::int4::Args;
  const int64_t groups = k / gs;
  std::vector<float> x(m * k), scales(groups * n), y(m * n, -1.f);
  std::vector<uint8_t> packed(k / 2 * n), zeros(groups * n);
  for (auto& v : x) v = Normal();
  for (auto& v : scales) v = Uniform(0.5f, 2.f);
  for (auto& v : packed) v = static_cast<uint8_t>(rng() & 0xFF);
  for (auto& v : zeros) v = static_cast<uint8_t>(rng() & 0xF);
  Args a{x.data(), packed.data(), scales.data(), asym ? zeros.data() : nullptr, 8.f, y.data(), m, k, n, gs};
  std::vector<float> xsum(m * groups, 0.f);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t r = 0; r < k; ++r) xsum[i * groups + r / gs] += x[i * k + r];
  tokenlab::int4::neon::GemvColumns(a, xsum.data(), 0, n);  // n a multiple of the 4 lanes
  std::vector<double> want(m * n, 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < n; ++c)
      for (int64_t r = 0; r < k; ++r) {
        const uint8_t b = packed[(r / 2) * n + c];
        const int q = (r % 2) ? (b >> 4) : (b & 0xF);
        const double z = asym ? zeros[(r / gs) * n + c] : 8.0;
        want[i * n + c] += double(x[i * k + r]) * scales[(r / gs) * n + c] * (q - z);
      }
  return NormalizedError(y, want);
}

// Normalized error over the heads whose output is finite in the reference; with nan_key, token 1's key of kv head
// 0 is NaN, so the outputs of kv head 0's query heads must be NaN (*nan_ok says whether exactly those are).
double DecodeCase(int64_t h, int64_t kh, int64_t d, int64_t s, int64_t len, float soft_cap, bool alibi,
                  int64_t window, bool nan_key = false, bool* nan_ok = nullptr) {
  using namespace tokenlab::decode;
  const int64_t pages = (len + s - 1) / s + 3, g = h / kh;
  std::vector<float> q(h * d), kp(pages * s * kh * d), vp(pages * s * kh * d), slopes(h);
  for (auto& v : q) v = Normal();
  for (auto& v : kp) v = Normal();
  for (auto& v : vp) v = Normal();
  for (int64_t i = 0; i < h; ++i) slopes[i] = 0.5f / (i + 1);
  std::vector<int32_t> bt(pages), lens{static_cast<int32_t>(len)};
  for (int64_t i = 0; i < pages; ++i) bt[i] = static_cast<int32_t>(pages - 1 - i);  // pages in reverse
  if (nan_key) kp[((bt[0] * s + 1) * kh + 0) * d + 3] = NAN;
  Args a{};
  a.q = q.data(), a.kp = kp.data(), a.vp = vp.data(), a.lens = lens.data(), a.bt = bt.data();
  a.slopes = alibi ? slopes.data() : nullptr;
  a.b = 1, a.h = h, a.d = d, a.p = pages, a.s = s, a.kh = kh, a.g = g, a.max_pages = pages;
  a.scale = 1.f / std::sqrt(static_cast<float>(d)), a.soft_cap = soft_cap, a.window = window;
  std::vector<float> state(kh * StateFloats(a));
  for (int64_t kv = 0; kv < kh; ++kv) {
    Partial st = StateAt(a, state.data(), kv);
    for (int64_t i = 0; i < g; ++i) st.m[i] = kNegInf, st.l[i] = 0.f;
    for (int64_t i = 0; i < g * d; ++i) st.acc[i] = 0.f;
  }
  const int64_t lo = window > 0 ? std::max<int64_t>(0, len - window) : 0;
  tokenlab::decode::neon::Range(a, 0, lo, len, state.data());
  std::vector<float> got(h * d);
  std::vector<double> want(h * d, 0.0);
  for (int64_t hh = 0; hh < h; ++hh) {
    const int64_t kv = hh / g;
    Partial st = StateAt(a, state.data(), kv);
    for (int64_t i = 0; i < d; ++i) got[hh * d + i] = st.acc[(hh % g) * d + i] / st.l[hh % g];
    std::vector<double> logit;
    for (int64_t j = lo; j < len; ++j) {
      const float* kr = kp.data() + ((bt[j / s] * s + j % s) * kh + kv) * d;
      double dot = 0;
      for (int64_t i = 0; i < d; ++i) dot += double(q[hh * d + i]) * kr[i];
      double xv = dot * a.scale;
      if (soft_cap > 0) xv = soft_cap * std::tanh(xv / soft_cap);
      if (alibi) xv += slopes[hh] * double(j - (len - 1));
      logit.push_back(xv);
    }
    double mx = -1e300, sum = 0;
    for (double v : logit) mx = std::max(mx, v);
    for (double& v : logit) sum += (v = std::exp(v - mx));
    for (int64_t j = lo; j < len; ++j) {
      const float* vr = vp.data() + ((bt[j / s] * s + j % s) * kh + kv) * d;
      for (int64_t i = 0; i < d; ++i) want[hh * d + i] += logit[j - lo] / sum * vr[i];
    }
  }
  if (nan_key) {
    bool ok = true;
    for (int64_t hh = 0; hh < h; ++hh) {
      // The running max must be NaN too: the handler's merge of context splits reads it.
      ok = ok && (std::isnan(StateAt(a, state.data(), hh / g).m[hh % g]) == (hh < g));
      for (int64_t i = 0; i < d; ++i) {
        ok = ok && (std::isnan(got[hh * d + i]) == (hh < g));
        if (hh < g) got[hh * d + i] = 0.f, want[hh * d + i] = 0.0;  // compare the other heads only
      }
    }
    *nan_ok = ok;
  }
  return NormalizedError(got, want);
}

}  // namespace

int main() {
  double int4 = 0, decode = 0;
  for (int64_t m : {1, 3, 5})
    for (int64_t n : {12, 40})
      for (bool asym : {true, false}) int4 = std::max(int4, Int4Case(m, 128, n, 32, asym));
  int4 = std::max(int4, Int4Case(2, 256, 64, 128, true));
  decode = std::max(decode, DecodeCase(4, 2, 64, 16, 50, 0.f, false, 0));
  decode = std::max(decode, DecodeCase(4, 1, 36, 8, 33, 0.f, false, 0));
  decode = std::max(decode, DecodeCase(8, 2, 128, 16, 64, 3.f, true, 17));
  decode = std::max(decode, DecodeCase(4, 4, 80, 4, 1, 0.f, false, 0));
  bool nan_ok = false;
  decode = std::max(decode, DecodeCase(8, 2, 64, 16, 40, 0.f, false, 0, true, &nan_ok));
  std::printf("{\"isa\": \"%s\", \"int4_nerr\": %.3e, \"decode_nerr\": %.3e, \"nan_reaches_its_heads\": %s}\n",
              tokenlab::IsaName(tokenlab::DetectedIsa()), int4, decode, nan_ok ? "true" : "false");
  return 0;
}
