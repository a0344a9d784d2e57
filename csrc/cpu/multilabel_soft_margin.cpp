// multilabel_soft_margin_loss on the CPU: the per-row sums of the forward,
// over the operand tiles of the elementwise engine (elementwise.h: each operand
// in its own dtype, broadcast weights gathered, never materialised). The
// backward is the elementwise engine's map.
//
// A tile holds whole rows (kTile elements at most), or, for rows longer than
// a tile, kTile-element pieces of one row. Each row is summed in vector lanes
// from its first element on, so its sum depends on nothing but the row: the
// same bits for any thread count and on every run.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <fusedloss/multilabel_soft_margin_host.h>

#include <limits>

#include "elementwise.h"

namespace fusedloss::cpu {
namespace {

// Adds the functor's first output over tile elements [off, off + n) to acc
// (vector lanes; lanes past the end add nothing).
template <typename acc_t, typename F, typename TileT>
void add_segment(const TileT& tile, const F& f, int64_t off, int64_t n, at::vec::Vectorized<acc_t>& acc) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec in[F::kIn];
  Vec out[F::kOut];
  int64_t i = off;
  for (; i + Vec::size() <= off + n; i += Vec::size()) {
    tile.fetch(i, Vec::size(), in);
    f(in, out);
    acc = acc + out[0];
  }
  if (i < off + n) {
    const int64_t count = off + n - i;
    tile.fetch(i, count, in);
    f(in, out);
    acc = acc + Vec::set(Vec(acc_t(0)), out[0], count);
  }
}

struct CpuRowEngine {
  template <typename acc_t, typename F>
  static void row_sums(const ElementwiseCall& c, const F& f, int64_t rows, int64_t C, acc_t* out) {
    using Vec = at::vec::Vectorized<acc_t>;
    if (C == 0) {  // torch: an empty row's sum over C = 0 classes is 0 / 0
      for (int64_t r = 0; r < rows; ++r) out[r] = std::numeric_limits<acc_t>::quiet_NaN();
      return;
    }
    const auto ops = operands<F::kIn>(c);
    const int64_t rows_per_tile = std::max<int64_t>(1, kTile / C);
    const int64_t cap = std::min(kTile, rows_per_tile * C);
    const int64_t ntiles = (rows + rows_per_tile - 1) / rows_per_tile;
    const int64_t grain = std::max<int64_t>(1, kChunk / (rows_per_tile * C));
    const acc_t classes = static_cast<acc_t>(C);
    at::parallel_for(0, ntiles, grain, [&](int64_t t0, int64_t t1) {
      Tile<acc_t, F::kIn> tile(cap);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * rows_per_tile;
        const int64_t r1 = std::min(rows, r0 + rows_per_tile);
        if (C <= kTile) {
          tile.load(ops, c.numel, r0 * C, (r1 - r0) * C);
          for (int64_t r = r0; r < r1; ++r) {
            Vec acc(acc_t(0));
            add_segment<acc_t>(tile, f, (r - r0) * C, C, acc);
            out[r] = lane_sum(acc) / classes;
          }
        } else {
          Vec acc(acc_t(0));
          for (int64_t s = 0; s < C; s += kTile) {
            const int64_t len = std::min(kTile, C - s);
            tile.load(ops, c.numel, r0 * C + s, len);
            add_segment<acc_t>(tile, f, 0, len, acc);
          }
          out[r0] = lane_sum(acc) / classes;
        }
      }
    });
  }
};

using Ops = MultilabelSoftMarginOps<CpuRowEngine, Engine>;

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) { register_multilabel_soft_margin_ops<Ops>(m); }

}  // namespace fusedloss::cpu
