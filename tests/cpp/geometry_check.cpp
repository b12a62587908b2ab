// Host-side checks of the index helpers in csrc/mad_geometry.h that only the CUDA kernels use (KeyWalk,
// split_for_vectors), so they are exercised on machines without a GPU. Driven by tests/test_geometry.py:
//   geometry_check self-test                 runs the exhaustive checks below, prints "ok"
//   geometry_check walk GH GW QUERY FIRST    prints the distances (in patches) that a KeyWalk started at key
//                                            FIRST gives for keys FIRST..GH*GW-1, one per line
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "mad_geometry.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, int64_t a, int64_t b, int64_t c) {
  if (!ok && failures++ < 20) {
    std::printf("FAIL %s (%lld, %lld, %lld)\n", what, static_cast<long long>(a), static_cast<long long>(b),
                static_cast<long long>(c));
  }
}

// A walk from any key gives bit for bit the distances of token_distance, in float and double, in 32- and
// 64-bit indices.
template <typename acc_t, typename index_t>
void check_walks(index_t grid_h, index_t grid_w) {
  const index_t n = grid_h * grid_w;
  for (index_t query = 0; query < n; ++query) {
    for (index_t first = 0; first < n; first += 3) {
      vitmad::KeyWalk<acc_t, index_t> walk(query, first, grid_w);
      for (index_t key = first; key < n; ++key) {
        const acc_t expected = vitmad::token_distance<acc_t>(query, key, grid_w);
        expect(walk.distance() == expected, "walk distance", query, first, key);
        walk.next();
      }
    }
  }
}

// head + vectors * per_vector <= count, head < per_vector unless the address is not element-aligned, the
// vectors start on a 16-byte boundary and the tail is shorter than a vector.
void check_splits() {
  for (int32_t elem : {2, 4, 8}) {
    const int32_t per_vector = 16 / elem;
    for (uint64_t address = 4096; address < 4096 + 64; ++address) {
      for (int32_t count = 0; count < 80; ++count) {
        const auto s = vitmad::split_for_vectors<int32_t>(address, count, elem);
        const int32_t tail = count - s.head - s.vectors * per_vector;
        expect(s.head >= 0 && s.vectors >= 0 && tail >= 0, "split covers the run", elem, address, count);
        if (address % elem != 0) {
          expect(s.head == count && s.vectors == 0, "misaligned run is all single", elem, address, count);
          continue;
        }
        expect(s.head < per_vector, "head shorter than a vector", elem, address, count);
        expect(tail < per_vector, "tail shorter than a vector", elem, address, count);
        expect(s.vectors == 0 || (address + uint64_t(s.head) * elem) % 16 == 0, "vectors aligned", elem, address,
               count);
        expect(s.head == count || (address + uint64_t(s.head) * elem) % 16 == 0, "head reaches the boundary", elem,
               address, count);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "self-test") == 0) {
    for (int32_t gh : {1, 2, 3, 7})
      for (int32_t gw : {1, 2, 5, 8, 13}) {
        check_walks<float, int32_t>(gh, gw);
        check_walks<double, int64_t>(gh, gw);
      }
    check_splits();
    if (failures) return 1;
    std::printf("ok\n");
    return 0;
  }
  if (argc == 6 && std::strcmp(argv[1], "walk") == 0) {
    const int32_t gh = std::atoi(argv[2]);
    const int32_t gw = std::atoi(argv[3]);
    const int32_t query = std::atoi(argv[4]);
    const int32_t first = std::atoi(argv[5]);
    vitmad::KeyWalk<double, int32_t> walk(query, first, gw);
    for (int32_t key = first; key < gh * gw; ++key, walk.next()) std::printf("%.17g\n", walk.distance());
    return 0;
  }
  std::fprintf(stderr, "usage: geometry_check self-test | walk GH GW QUERY FIRST\n");
  return 2;
}
