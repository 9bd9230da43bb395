// The plan of an epoch: effective lengths (truncate / drop / loss-bucket cap), seeded document permutation,
// best-fit-decreasing per shuffle window with a balanced multiset of open bins (O(n log n)), seeded row shuffle,
// rank balancing. Specified step by step in fastsft/data/packing_ref.py, which produces the identical plan.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <numeric>
#include <set>
#include <stdexcept>
#include <utility>

#include "packing.h"

namespace fastsft {

std::pair<int, int64_t> Corpus::locate(int64_t doc) const {
  auto it = std::upper_bound(doc_starts.begin(), doc_starts.end(), doc);
  int shard = static_cast<int>(it - doc_starts.begin()) - 1;
  return {shard, doc - doc_starts[shard]};
}

void read_exact(const ShardView& shard, void* dst, int64_t nbytes, int64_t offset) {
  uint8_t* out = static_cast<uint8_t*>(dst);
  int64_t done = 0;
  while (done < nbytes) {
    const ssize_t got = ::pread(shard.fd, out + done, static_cast<size_t>(nbytes - done), offset + done);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      throw ShardReadError(shard.path + ": read failed at offset " + std::to_string(offset + done) + " (" +
                           std::strerror(errno) + ")");
    }
    if (got == 0) {
      throw ShardReadError(shard.path + ": read " + std::to_string(done) + " of " + std::to_string(nbytes) +
                           " bytes at offset " + std::to_string(offset) +
                           ": the file was truncated or replaced in place while in use; restore it or re-run "
                           "`fastsft prepare`, then resume");
    }
    done += got;
  }
}

namespace {
constexpr int64_t kMaskChunk = int64_t{1} << 22;  // mask bytes read per call while scanning lengths
}  // namespace

void effective_lengths(const Corpus& corpus, int64_t seq_len, int64_t loss_bucket, bool drop_long, int64_t* eff_len,
                       int64_t* supervised) {
  std::vector<uint8_t> buffer;
  for (size_t f = 0; f < corpus.shards.size(); ++f) {
    const ShardView& shard = corpus.shards[f];
    int64_t buf_begin = 0, buf_end = 0;  // token range of the shard's mask held in `buffer`
    for (int64_t i = 0; i < shard.num_docs; ++i) {
      const int64_t doc = corpus.doc_starts[f] + i;
      const int64_t start = shard.offsets[i];
      const int64_t length = shard.offsets[i + 1] - start;
      int64_t eff = std::min(length, seq_len);
      bool cut = length > seq_len;
      if (start < buf_begin || start + eff > buf_end) {  // refill: this document's kept prefix and what follows
        buf_begin = start;
        buf_end = std::min(shard.num_tokens, start + std::max(eff, kMaskChunk));
        buffer.resize(static_cast<size_t>(buf_end - buf_begin));
        read_exact(shard, buffer.data(), buf_end - buf_begin, shard.mask_start + buf_begin);
      }
      // Supervised positions are t with mask[t + 1]; with a bucket B, stop at the (B+1)-th: the prefix before it
      // holds exactly B.
      const uint8_t* mask = buffer.data() + (start - buf_begin);
      int64_t sup = 0;
      for (int64_t t = 1; t < eff; ++t) {
        sup += mask[t] != 0;
        if (loss_bucket >= 0 && sup > loss_bucket) {
          eff = t;
          sup = loss_bucket;
          cut = true;
          break;
        }
      }
      if (drop_long && cut) {
        eff = 0;
        sup = 0;
      }
      eff_len[doc] = eff;
      supervised[doc] = sup;
    }
  }
}

namespace {

using Rows = std::vector<std::vector<int64_t>>;

// Bins (document ids in placement order), in opening order, for the documents `ids` of one window.
Rows best_fit_decreasing(const std::vector<int64_t>& ids, const int64_t* eff_len, const int64_t* supervised,
                         const PlanConfig& cfg) {
  std::vector<int64_t> order(ids);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return eff_len[a] > eff_len[b]; });
  Rows bin_docs;
  std::vector<int64_t> bin_room, bin_loss_room;
  std::set<std::pair<int64_t, int64_t>> open_bins;  // (remaining capacity, bin id): smallest fitting, oldest first
  for (int64_t doc : order) {
    const int64_t length = eff_len[doc], sup = supervised[doc];
    int64_t chosen = -1;
    auto it = open_bins.lower_bound({length, -1});
    for (int probe = 0; probe < kMaxFitProbes && it != open_bins.end(); ++probe, ++it) {
      if (bin_loss_room[it->second] >= sup) {
        chosen = it->second;
        open_bins.erase(it);
        break;
      }
    }
    if (chosen < 0) {
      chosen = static_cast<int64_t>(bin_docs.size());
      bin_docs.emplace_back();
      bin_room.push_back(cfg.seq_len);
      bin_loss_room.push_back(cfg.loss_budget);
    }
    bin_docs[chosen].push_back(doc);
    bin_room[chosen] -= length;
    bin_loss_room[chosen] -= sup;
    if (static_cast<int64_t>(bin_docs[chosen].size()) < cfg.max_docs && bin_room[chosen] > 0) {
      open_bins.insert({bin_room[chosen], chosen});
    }
  }
  return bin_docs;
}

void balance_rows(Rows& rows, int64_t world_size, bool drop_last) {
  if (drop_last) {
    rows.resize(rows.size() - rows.size() % world_size);
    return;
  }
  int64_t missing = (world_size - static_cast<int64_t>(rows.size() % world_size)) % world_size;
  while (missing > 0) {
    bool split_any = false;
    for (int64_t r = static_cast<int64_t>(rows.size()) - 1; r >= 0; --r) {
      if (missing > 0 && rows[r].size() >= 2) {
        int64_t doc = rows[r].back();
        rows[r].pop_back();
        rows.push_back({doc});
        --missing;
        split_any = true;
      }
    }
    if (!split_any) {
      rows.resize(rows.size() + missing);
      missing = 0;
    }
  }
}

}  // namespace

Plan plan_epoch(const int64_t* eff_len, const int64_t* supervised, int64_t num_docs, const PlanConfig& cfg) {
  std::vector<int64_t> perm(num_docs);
  std::iota(perm.begin(), perm.end(), int64_t{0});
  SplitMix64 doc_rng(stream_state(cfg.seed, cfg.epoch, kDocStream));
  shuffle_in_place(perm, doc_rng);
  SplitMix64 row_rng(stream_state(cfg.seed, cfg.epoch, kRowStream));

  Rows rows;
  std::vector<int64_t> ids;
  for (int64_t start = 0; start < num_docs; start += cfg.window) {
    const int64_t end = std::min(num_docs, start + cfg.window);
    ids.clear();
    for (int64_t k = start; k < end; ++k) {
      if (eff_len[perm[k]] > 0) ids.push_back(perm[k]);
    }
    Rows window_rows = best_fit_decreasing(ids, eff_len, supervised, cfg);
    shuffle_in_place(window_rows, row_rng);
    for (auto& row : window_rows) rows.push_back(std::move(row));
  }
  balance_rows(rows, cfg.world_size, cfg.drop_last);

  Plan plan;
  plan.row_ptr.reserve(rows.size() + 1);
  plan.row_ptr.push_back(0);
  for (const auto& row : rows) {
    plan.row_docs.insert(plan.row_docs.end(), row.begin(), row.end());
    plan.row_ptr.push_back(static_cast<int64_t>(plan.row_docs.size()));
  }
  return plan;
}

}  // namespace fastsft
