// Batch assembly: plan rows -> the batch contract's buffers (fastsft/data/batch.py). A few tight, vectorizable loops
// per document, no allocation per row, reading the shards through read-only memory maps under a SIGBUS guard.
//
// Why maps and a guard, not pread (measured, bench/bench_loader.py, both modes in one run, README "Loader"): two
// preads per document (tokens, mask) cost more than the copy itself; in one process, same rows, seq_len 4096: pread
// 3.7e8 positions per CPU-second, this guarded map 9.4e8, the old unguarded map (build of d6faf8d) 9.5e8 (16384:
// 2.8e8 / 5.9e8 / 5.9e8). Coalescing a batch's reads per shard does not help: a row's documents are a seeded shuffle of the
// whole corpus, so neighbours in the file are almost never in the same batch and the syscall count stays ~2 per
// document. A map reads with no syscall at all; the only thing pread bought was that a shard truncated in place is a
// short read instead of SIGBUS. The guard gives that back: while this thread copies from a map, a SIGBUS inside that
// map siglongjmps back here and becomes a ShardReadError naming the file; any other SIGBUS (another thread, another
// address, no guard active) goes to the handler that was installed before ours. A truncation that leaves the
// document inside the file's last, partly kept page reads zeros without a fault, so after each call one fstat per
// shard touched checks that the file still holds every byte read (the same error); a stale check costs nothing,
// since a file that shrinks after the fstat shrank after the reads.
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

#include "packing.h"

namespace fastsft {

namespace {

// ------------------------------------------------------------------------------------------------- SIGBUS guard

// A thread's active guard: the map being read (volatile: written per document, read by the handler and after the
// jump) and where to jump. Reached through an initial-exec thread_local, which the handler may read without
// allocating.
struct FaultGuard {
  sigjmp_buf jump;
  const uint8_t* volatile begin;
  const uint8_t* volatile end;
  volatile int shard;
};

__attribute__((tls_model("initial-exec"))) thread_local FaultGuard* volatile tls_guard = nullptr;

struct sigaction previous_bus_action;
std::mutex install_mutex;

void on_sigbus(int sig, siginfo_t* info, void* context) {
  FaultGuard* guard = tls_guard;
  const uint8_t* addr = static_cast<const uint8_t*>(info->si_addr);
  if (guard != nullptr && addr >= guard->begin && addr < guard->end) {
    tls_guard = nullptr;
    siglongjmp(guard->jump, 1);  // SIGBUS stays blocked in this thread: guarded_copy unblocks it
  }
  // Not ours: whoever handled SIGBUS before (e.g. Python's faulthandler), or the default action (re-raised on
  // return, since the faulting access runs again).
  const struct sigaction& prev = previous_bus_action;
  if (prev.sa_flags & SA_SIGINFO) {
    if (prev.sa_sigaction != nullptr) {
      prev.sa_sigaction(sig, info, context);
      return;
    }
  } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
    prev.sa_handler(sig);
    return;
  }
  struct sigaction dfl;
  std::memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(SIGBUS, &dfl, nullptr);
}

// Installs on_sigbus if it is not the current SIGBUS handler (first use, or someone replaced it since: then that one
// becomes the handler chained to). One sigaction query per assemble_rows call.
void ensure_sigbus_handler() {
  std::lock_guard<std::mutex> lock(install_mutex);
  struct sigaction current;
  sigaction(SIGBUS, nullptr, &current);
  if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_sigbus) return;
  struct sigaction ours;
  std::memset(&ours, 0, sizeof ours);
  ours.sa_sigaction = on_sigbus;
  ours.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&ours.sa_mask);
  previous_bus_action = current;
  sigaction(SIGBUS, &ours, nullptr);
}

[[noreturn]] void throw_truncated(const ShardView& view, int64_t have, int64_t needed, const char* how) {
  throw ShardReadError(view.path + ": read " + std::to_string(have) + " of " + std::to_string(needed) + " bytes (" +
                       how + "): the file was truncated or replaced in place while in use; restore it or re-run " +
                       "`fastsft prepare`, then resume");
}

// Positions t in [begin, end) with mask[t] != 0, as pos_offset + t - 1 (the label position of target t), appended
// to out; returns how many. Response spans are contiguous, so 8 mask bytes at a time are usually all 0 or all 1.
inline int64_t compact_supervised(const uint8_t* __restrict__ mask, int64_t begin, int64_t end, int64_t pos_offset,
                                  int32_t* __restrict__ out) {
  constexpr uint64_t kAllOnes = 0x0101010101010101ULL;
  int64_t count = 0, t = begin;
  for (; t + 8 <= end; t += 8) {
    uint64_t chunk;
    std::memcpy(&chunk, mask + t, 8);
    if (chunk == 0) continue;
    const int32_t first = static_cast<int32_t>(pos_offset + t - 1);
    if (chunk == kAllOnes) {
      for (int k = 0; k < 8; ++k) out[count + k] = first + k;
      count += 8;
      continue;
    }
    for (int k = 0; k < 8; ++k) {  // branch-free: always write, advance only on a supervised byte
      out[count] = first + k;
      count += mask[t + k] != 0;  // != 0: a corrupt mask byte must not skip ahead
    }
  }
  for (; t < end; ++t) {
    out[count] = static_cast<int32_t>(pos_offset + t - 1);
    count += mask[t] != 0;
  }
  return count;
}

// One document at position `pos` of a row. Returns the number of supervised positions written to `loss_pos`
// (which has room for the rest of the row) and sets `largest` to its largest token id (the per-document vocabulary
// check, folded into the id copy: one pass over the tokens fewer). Separate simple loops so each vectorizes.
template <typename Token>
int64_t fill_document(const Token* __restrict__ tokens, const uint8_t* __restrict__ mask, int64_t length, int64_t pos,
                      int64_t* __restrict__ input_ids, int32_t* __restrict__ position_ids,
                      int64_t* __restrict__ labels, int32_t* __restrict__ loss_pos, int64_t& largest) {
  int64_t* __restrict__ ids = input_ids + pos;
  int32_t* __restrict__ positions = position_ids + pos;
  int64_t* __restrict__ lab = labels + pos;
  Token best = 0;
  for (int64_t t = 0; t < length; ++t) {
    const Token id = tokens[t];
    ids[t] = static_cast<int64_t>(id);
    best = std::max(best, id);
  }
  largest = static_cast<int64_t>(best);
  for (int64_t t = 0; t < length; ++t) positions[t] = static_cast<int32_t>(t);
  // labels[t] = tokens[t + 1] where mask[t + 1] else IGNORE: select by an all-ones / all-zeros AND, no branch
  for (int64_t t = 0; t + 1 < length; ++t) {
    const int64_t keep = -static_cast<int64_t>(mask[t + 1] != 0);
    lab[t] = ((static_cast<int64_t>(tokens[t + 1]) - kIgnoreIndex) & keep) + kIgnoreIndex;
  }
  lab[length - 1] = kIgnoreIndex;
  return compact_supervised(mask, 1, length, pos, loss_pos);
}

constexpr int64_t kPrefetchRows = 2;  // rows of mapped input requested ahead of the one being written

// A row's input is scattered over the shards in short documents (a few hundred tokens), too short for the hardware
// prefetcher to ramp up in: request the input of the rows ahead while this row is written (mapped reads only; a
// prefetch never faults, so it needs no guard). Measured in one process on the 2-core dev VM, 100k-document corpus,
// seq_len 4096, output equal: the guarded map without it 6.8e8 positions per CPU-second, with it 9.4e8 (the old
// unguarded build, d6faf8d, 9.5-9.7e8 in the same runs).
void prefetch_row(const Corpus& corpus, const int64_t* row_ptr, const int64_t* row_docs, const int64_t* eff_len,
                  int64_t row) {
#if defined(__GNUC__)
  for (int64_t k = row_ptr[row]; k < row_ptr[row + 1]; ++k) {
    const int64_t doc = row_docs[k];
    auto [shard, local] = corpus.locate(doc);
    const ShardView& view = corpus.shards[shard];
    const int64_t start = view.offsets[local];
    const uint8_t* tokens = view.base + view.tokens_start + start * view.itemsize;
    const uint8_t* mask = view.base + view.mask_start + start;
    for (int64_t off = 0; off < eff_len[doc] * view.itemsize; off += 64) __builtin_prefetch(tokens + off, 0, 3);
    for (int64_t off = 0; off < eff_len[doc]; off += 64) __builtin_prefetch(mask + off, 0, 3);
  }
#endif
}

void validate_row(const Corpus& corpus, const int64_t* row_ptr, int64_t num_plan_rows, int64_t num_row_docs,
                  const int64_t* row_docs, const int64_t* eff_len, int64_t row, const BatchBuffers& out) {
  auto fail = [&](const std::string& what) {
    throw std::invalid_argument("assemble_rows: plan row " + std::to_string(row) + ": " + what);
  };
  if (row < 0 || row >= num_plan_rows) fail("row index out of range of the plan");
  const int64_t begin = row_ptr[row], end = row_ptr[row + 1];
  if (begin < 0 || end < begin || end > num_row_docs) fail("corrupt row_ptr");
  if (end - begin > out.max_docs) fail("more documents than max_docs");
  int64_t total = 0;
  for (int64_t k = begin; k < end; ++k) {
    const int64_t doc = row_docs[k];
    if (doc < 0 || doc >= corpus.num_docs()) fail("document id out of range");
    auto [shard, local] = corpus.locate(doc);
    const ShardView& view = corpus.shards[shard];
    const int64_t length = view.offsets[local + 1] - view.offsets[local];
    if (eff_len[doc] < 1 || eff_len[doc] > length) fail("effective length outside [1, document length]");
    total += eff_len[doc];
  }
  if (total > out.seq_len) fail("documents longer than seq_len in total");
}

}  // namespace

namespace {

// The row loop. mapped: documents are read straight from view.base under `guard` (set up by the caller); else two
// preads per document into the scratch buffers. need[shard]: the largest file offset read, for the fstat check.
void assemble_loop(const Corpus& corpus, const int64_t* row_ptr, const int64_t* row_docs, const int64_t* eff_len,
                   const int64_t* rows, int64_t num_rows, const BatchBuffers& out, bool mapped, FaultGuard* guard,
                   int32_t* loss_scratch, uint32_t* token_scratch, uint8_t* mask_scratch, int64_t* need) {
  const int64_t S = out.seq_len, cu_len = out.max_docs + 2;
  if (mapped) {
    for (int64_t i = 0; i < std::min(num_rows, kPrefetchRows); ++i) {
      prefetch_row(corpus, row_ptr, row_docs, eff_len, rows[i]);
    }
  }
  for (int64_t i = 0; i < num_rows; ++i) {
    const int64_t row = rows[i];
    if (mapped && i + kPrefetchRows < num_rows) {
      prefetch_row(corpus, row_ptr, row_docs, eff_len, rows[i + kPrefetchRows]);
    }
    int64_t* input_ids = out.input_ids + i * S;
    int32_t* position_ids = out.position_ids + i * S;
    int64_t* labels = out.labels + i * S;
    int32_t* cu_seqlens = out.cu_seqlens + i * cu_len;
    int32_t* loss_positions = out.loss_positions + i * out.bucket;

    int64_t pos = 0, num_loss = 0, num_docs = 0;
    cu_seqlens[0] = 0;
    for (int64_t k = row_ptr[row]; k < row_ptr[row + 1]; ++k) {
      const int64_t doc = row_docs[k];
      auto [shard, local] = corpus.locate(doc);
      const ShardView& view = corpus.shards[shard];
      const int64_t start = view.offsets[local], length = eff_len[doc];
      const uint8_t* token_bytes;
      const uint8_t* mask;
      if (mapped) {
        guard->shard = shard;
        guard->begin = view.base;
        guard->end = view.base + view.map_size;
        need[shard] = std::max(need[shard], view.mask_start + start + length);
        token_bytes = view.base + view.tokens_start + start * view.itemsize;
        mask = view.base + view.mask_start + start;
      } else {
        read_exact(view, token_scratch, length * view.itemsize, view.tokens_start + start * view.itemsize);
        read_exact(view, mask_scratch, length, view.mask_start + start);
        token_bytes = reinterpret_cast<const uint8_t*>(token_scratch);
        mask = mask_scratch;
      }
      int64_t written, largest;
      if (view.itemsize == 2) {
        const uint16_t* tokens = reinterpret_cast<const uint16_t*>(token_bytes);
        written = fill_document(tokens, mask, length, pos, input_ids, position_ids, labels, loss_scratch + num_loss,
                                largest);
      } else {
        const uint32_t* tokens = reinterpret_cast<const uint32_t*>(token_bytes);
        written = fill_document(tokens, mask, length, pos, input_ids, position_ids, labels, loss_scratch + num_loss,
                                largest);
      }
      if (out.vocab_size > 0 && largest >= out.vocab_size) {
        throw ShardReadError(view.path + ": document " + std::to_string(local) + " holds token id " +
                             std::to_string(largest) + ", outside the vocabulary of " +
                             std::to_string(out.vocab_size) + ": the shard is corrupt (changed since it was " +
                             "verified?); re-run `fastsft prepare` or restore the file");
      }
      num_loss += written;
      pos += length;
      cu_seqlens[++num_docs] = static_cast<int32_t>(pos);
    }
    // Padding tail: its own segment (positions restart at 0), never supervised.
    std::fill(input_ids + pos, input_ids + S, kPadId);
    for (int64_t t = pos; t < S; ++t) position_ids[t] = static_cast<int32_t>(t - pos);
    std::fill(labels + pos, labels + S, kIgnoreIndex);
    std::fill(cu_seqlens + num_docs + 1, cu_seqlens + cu_len, static_cast<int32_t>(S));
    if (num_loss > out.bucket) {
      throw std::invalid_argument("assemble_rows: plan row " + std::to_string(row) + " has " +
                                  std::to_string(num_loss) + " supervised positions, more than the loss bucket of " +
                                  std::to_string(out.bucket));
    }
    std::memcpy(loss_positions, loss_scratch, num_loss * sizeof(int32_t));
    std::fill(loss_positions + num_loss, loss_positions + out.bucket, kLossPositionFill);
    out.counts[i * 3 + 0] = num_loss;
    out.counts[i * 3 + 1] = pos;
    out.counts[i * 3 + 2] = num_docs;
  }
}

// Runs the mapped row loop under a SIGBUS guard. Returns the shard whose map faulted, or -1. No object with a
// destructor lives between sigsetjmp and the loop's reads, so the jump skips nothing.
int guarded_loop(const Corpus& corpus, const int64_t* row_ptr, const int64_t* row_docs, const int64_t* eff_len,
                 const int64_t* rows, int64_t num_rows, const BatchBuffers& out, int32_t* loss_scratch,
                 int64_t* need) {
  FaultGuard guard;
  guard.begin = guard.end = nullptr;
  guard.shard = -1;
  if (sigsetjmp(guard.jump, 0) != 0) {
    tls_guard = nullptr;
    sigset_t bus;
    sigemptyset(&bus);
    sigaddset(&bus, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &bus, nullptr);  // the handler ran with SIGBUS blocked and did not return
    return guard.shard;
  }
  tls_guard = &guard;
  std::atomic_signal_fence(std::memory_order_seq_cst);
  try {
    assemble_loop(corpus, row_ptr, row_docs, eff_len, rows, num_rows, out, true, &guard, loss_scratch, nullptr,
                  nullptr, need);
  } catch (...) {
    tls_guard = nullptr;
    throw;
  }
  std::atomic_signal_fence(std::memory_order_seq_cst);
  tls_guard = nullptr;
  return -1;
}

}  // namespace

void assemble_rows(const Corpus& corpus, const int64_t* row_ptr, int64_t num_plan_rows, const int64_t* row_docs,
                   int64_t num_row_docs, const int64_t* eff_len, const int64_t* rows, int64_t num_rows,
                   const BatchBuffers& out) {
  for (int64_t i = 0; i < num_rows; ++i) {
    validate_row(corpus, row_ptr, num_plan_rows, num_row_docs, row_docs, eff_len, rows[i], out);
  }
  const int64_t S = out.seq_len;
  std::vector<int32_t> loss_scratch(S + 1);
  const bool mapped = !corpus.shards.empty() && corpus.shards[0].base != nullptr;
  if (!mapped) {
    std::vector<uint32_t> token_scratch(S);  // room for S ids of either width
    std::vector<uint8_t> mask_scratch(S);
    assemble_loop(corpus, row_ptr, row_docs, eff_len, rows, num_rows, out, false, nullptr, loss_scratch.data(),
                  token_scratch.data(), mask_scratch.data(), nullptr);
    return;
  }
  ensure_sigbus_handler();
  std::vector<int64_t> need(corpus.shards.size(), 0);
  const int faulted = guarded_loop(corpus, row_ptr, row_docs, eff_len, rows, num_rows, out, loss_scratch.data(),
                                   need.data());
  if (faulted >= 0) {
    const ShardView& view = corpus.shards[faulted];
    struct stat st;
    const int64_t have = ::fstat(view.fd, &st) == 0 ? static_cast<int64_t>(st.st_size) : 0;
    throw_truncated(view, have, view.map_size, "a fault in its memory map");
  }
  for (size_t f = 0; f < need.size(); ++f) {  // a truncation inside the last mapped page reads zeros, no fault
    if (need[f] == 0) continue;
    struct stat st;
    if (::fstat(corpus.shards[f].fd, &st) != 0) {
      throw ShardReadError(corpus.shards[f].path + ": fstat failed (" + std::strerror(errno) + ")");
    }
    if (st.st_size < need[f]) throw_truncated(corpus.shards[f], st.st_size, need[f], "file size checked after the copy");
  }
}

}  // namespace fastsft
