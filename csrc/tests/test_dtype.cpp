// fp16 / bf16 conversions: exact round trips and round-to-nearest-even at every midpoint.
#include <cmath>

#include "harness.h"
#include "llmcore/dtype.h"

using namespace llmcore;

static bool is_nan_half(uint16_t b) { return (b & 0x7c00u) == 0x7c00u && (b & 0x3ffu) != 0; }

TEST(dtype_half_round_trip) {
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const Half h{uint16_t(b)};
    const Half back = to_half(to_float(h));
    if (is_nan_half(uint16_t(b))) {
      CHECK(is_nan_half(back.bits));
    } else {
      CHECK(back.bits == h.bits);
    }
  }
}

TEST(dtype_half_rounds_to_nearest_even) {
  // between consecutive positive finite halves a < b: the midpoint goes to the even one, points
  // just inside go to the nearer one (checked in double, then rounded once to float, which is
  // exact for these: fp16 midpoints need at most 12 significant bits)
  for (uint32_t b = 0; b < 0x7bffu; ++b) {
    const float lo = to_float(Half{uint16_t(b)}), hi = to_float(Half{uint16_t(b + 1)});
    const float mid = float((double(lo) + double(hi)) / 2);
    const uint16_t even = (b & 1u) ? uint16_t(b + 1) : uint16_t(b);
    CHECK(to_half(mid).bits == even);
    CHECK(to_half(-mid).bits == uint16_t(even | 0x8000u));
    CHECK(to_half(std::nextafter(mid, lo)).bits == b);
    CHECK(to_half(std::nextafter(mid, hi)).bits == b + 1);
  }
  CHECK(to_half(65519.0f).bits == 0x7bffu);  // below the max's upper midpoint: stays finite
  CHECK(to_half(65520.0f).bits == 0x7c00u);  // the midpoint to "2^16" rounds to inf
  CHECK(to_half(1e30f).bits == 0x7c00u);
  CHECK(to_half(-INFINITY).bits == 0xfc00u);
  CHECK(is_nan_half(to_half(NAN).bits));
}

TEST(dtype_bfloat16) {
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const BFloat16 v{uint16_t(b)};
    const float f = to_float(v);
    if (std::isnan(f)) {
      CHECK(std::isnan(to_float(to_bfloat16(f))));
      continue;
    }
    CHECK(to_bfloat16(f).bits == v.bits);
    if ((b & 0x7f80u) == 0x7f80u || (b & 0x7fffu) == 0x7f7fu) continue;  // inf / largest finite
    // the midpoint towards the next bf16 of larger magnitude: ties to even
    const float mid = bits_float((uint32_t(b) << 16) | 0x8000u);
    const uint16_t even = (b & 1u) ? uint16_t(b + 1) : uint16_t(b);
    CHECK(to_bfloat16(mid).bits == even);
  }
}
