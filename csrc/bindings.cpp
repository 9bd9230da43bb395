// pybind11 face of the packing loader (module fastsft._C). Numpy in, numpy out, no libtorch. Every buffer is checked
// for dtype, shape and contiguity here (never silently copied: a copy would send the output to a temporary), and
// every call releases the GIL around the C++ work so the loader's prefetch thread runs beside the training loop.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "packing.h"

namespace py = pybind11;
using fastsft::BatchBuffers;
using fastsft::Corpus;
using fastsft::PlanConfig;
using fastsft::ShardView;

namespace {

template <typename T>
bool has_dtype(const py::array& a) {
  return a.dtype().is(py::dtype::of<T>());
}

void check_array(const py::array& a, const std::string& name, bool dtype_ok, const std::string& dtype_name,
                 std::initializer_list<int64_t> shape, bool writeable) {
  if (!dtype_ok) throw std::invalid_argument(name + ": expected dtype " + dtype_name);
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(name + ": must be C-contiguous");
  if (writeable && !a.writeable()) throw std::invalid_argument(name + ": must be writeable");
  if (a.ndim() != static_cast<py::ssize_t>(shape.size())) {
    throw std::invalid_argument(name + ": expected " + std::to_string(shape.size()) + " dimensions");
  }
  int d = 0;
  for (int64_t expected : shape) {
    if (expected >= 0 && a.shape(d) != expected) {
      throw std::invalid_argument(name + ": dimension " + std::to_string(d) + " is " + std::to_string(a.shape(d)) +
                                  ", expected " + std::to_string(expected));
    }
    ++d;
  }
}

// The shards of a dataset (fastsft.data.shards.ShardFile objects, kept alive: they own the file descriptors and the
// in-memory offsets), indexed globally. mmap=True (the default): each file is mapped read-only for batch assembly
// (unmapped with the corpus); mmap=False: pread per document (slower; kept for the side-by-side benchmark).
class PyCorpus {
 public:
  PyCorpus(const PyCorpus&) = delete;
  PyCorpus& operator=(const PyCorpus&) = delete;
  ~PyCorpus() { unmap_all(); }

  PyCorpus(const py::list& shards, bool mmap) : mapped_(mmap) {
    corpus_.doc_starts.push_back(0);
    for (size_t f = 0; f < shards.size(); ++f) {
      py::object shard = shards[f];
      const std::string where = "Corpus shard " + std::to_string(f);
      py::array off = shard.attr("offsets");
      check_array(off, where + " offsets", has_dtype<int64_t>(off), "int64", {-1}, false);
      if (off.shape(0) < 1) throw std::invalid_argument(where + " offsets: empty");
      const int64_t* o = static_cast<const int64_t*>(off.data());
      const int64_t num_docs = off.shape(0) - 1;
      const int64_t num_tokens = shard.attr("num_tokens").cast<int64_t>();
      const int itemsize = shard.attr("itemsize").cast<int>();
      if (itemsize != 2 && itemsize != 4) throw std::invalid_argument(where + ": itemsize must be 2 or 4");
      if (o[0] != 0 || o[num_docs] != num_tokens) throw std::invalid_argument(where + " offsets: bad bounds");
      for (int64_t i = 0; i < num_docs; ++i) {
        if (o[i + 1] < o[i]) throw std::invalid_argument(where + " offsets: decreasing");
      }
      py::dict layout = shard.attr("layout");
      corpus_.shards.push_back(ShardView{shard.attr("fd").cast<int>(), itemsize,
                                         layout["tokens_start"].cast<int64_t>(), layout["mask_start"].cast<int64_t>(),
                                         o, num_docs, num_tokens, shard.attr("path").cast<std::string>()});
      if (mmap) {
        try {
          map_shard(corpus_.shards.back());
        } catch (...) {
          unmap_all();  // the destructor does not run for a failed constructor
          throw;
        }
      }
      corpus_.doc_starts.push_back(corpus_.doc_starts.back() + num_docs);
      keep_alive_.append(shard);
      keep_alive_.append(off);
    }
  }

  int64_t num_docs() const { return corpus_.num_docs(); }
  bool mapped() const { return mapped_; }
  const Corpus& corpus() const { return corpus_; }

  py::tuple effective_lengths(int64_t seq_len, int64_t loss_bucket, bool drop_long) const {
    if (seq_len < 1) throw std::invalid_argument("effective_lengths: seq_len must be >= 1");
    py::array_t<int64_t> eff(num_docs()), sup(num_docs());
    int64_t* e = eff.mutable_data();
    int64_t* s = sup.mutable_data();
    {
      py::gil_scoped_release release;
      fastsft::effective_lengths(corpus_, seq_len, loss_bucket, drop_long, e, s);
    }
    return py::make_tuple(eff, sup);
  }

 private:
  void unmap_all() {
    for (ShardView& view : corpus_.shards) {
      if (view.base != nullptr) ::munmap(const_cast<uint8_t*>(view.base), static_cast<size_t>(view.map_size));
      view.base = nullptr;
    }
  }

  static void map_shard(ShardView& view) {
    struct stat st;
    if (::fstat(view.fd, &st) != 0) {
      throw fastsft::ShardReadError(view.path + ": fstat failed (" + std::strerror(errno) + ")");
    }
    const int64_t needed = view.mask_start + view.num_tokens;
    if (st.st_size < needed) {
      throw fastsft::ShardReadError(view.path + ": read " + std::to_string(st.st_size) + " of " +
                                    std::to_string(needed) + " bytes: the file was truncated or replaced in place "
                                    "while in use; restore it or re-run `fastsft prepare`, then resume");
    }
    void* base = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_SHARED, view.fd, 0);
    if (base == MAP_FAILED) {
      throw fastsft::ShardReadError(view.path + ": mmap failed (" + std::strerror(errno) + ")");
    }
    view.base = static_cast<const uint8_t*>(base);
    view.map_size = st.st_size;
  }

  Corpus corpus_;
  bool mapped_;
  py::list keep_alive_;
};

py::tuple plan_epoch(const py::array& eff_len, const py::array& supervised, int64_t seq_len, int64_t max_docs,
                     int64_t loss_budget, int64_t window, uint64_t seed, uint64_t epoch, int64_t world_size,
                     bool drop_last) {
  check_array(eff_len, "eff_len", has_dtype<int64_t>(eff_len), "int64", {-1}, false);
  check_array(supervised, "supervised", has_dtype<int64_t>(supervised), "int64", {eff_len.shape(0)}, false);
  if (seq_len < 1 || max_docs < 1 || loss_budget < 0 || window < 1 || world_size < 1) {
    throw std::invalid_argument("plan_epoch: seq_len, max_docs, window and world_size must be >= 1, loss_budget >= 0");
  }
  PlanConfig cfg{seq_len, max_docs, loss_budget, window, seed, epoch, world_size, drop_last};
  const int64_t* e = static_cast<const int64_t*>(eff_len.data());
  const int64_t* s = static_cast<const int64_t*>(supervised.data());
  const int64_t n = eff_len.shape(0);
  for (int64_t d = 0; d < n; ++d) {
    if (e[d] < 0 || e[d] > seq_len) throw std::invalid_argument("plan_epoch: eff_len outside [0, seq_len]");
  }
  fastsft::Plan plan;
  {
    py::gil_scoped_release release;
    plan = fastsft::plan_epoch(e, s, n, cfg);
  }
  py::array_t<int64_t> row_ptr(plan.row_ptr.size()), row_docs(plan.row_docs.size());
  std::copy(plan.row_ptr.begin(), plan.row_ptr.end(), row_ptr.mutable_data());
  std::copy(plan.row_docs.begin(), plan.row_docs.end(), row_docs.mutable_data());
  return py::make_tuple(row_ptr, row_docs);
}

void assemble_rows(const PyCorpus& corpus, const py::array& row_ptr, const py::array& row_docs,
                   const py::array& eff_len, const py::array& rows, py::array input_ids, py::array position_ids,
                   py::array labels, py::array cu_seqlens, py::array loss_positions, py::array counts,
                   int64_t vocab_size) {
  check_array(row_ptr, "row_ptr", has_dtype<int64_t>(row_ptr), "int64", {-1}, false);
  check_array(row_docs, "row_docs", has_dtype<int64_t>(row_docs), "int64", {-1}, false);
  check_array(eff_len, "eff_len", has_dtype<int64_t>(eff_len), "int64", {corpus.num_docs()}, false);
  check_array(rows, "rows", has_dtype<int64_t>(rows), "int64", {-1}, false);
  if (row_ptr.shape(0) < 1) throw std::invalid_argument("row_ptr: empty");
  const int64_t B = rows.shape(0);
  check_array(input_ids, "input_ids", has_dtype<int64_t>(input_ids), "int64", {B, -1}, true);
  const int64_t S = input_ids.shape(1);
  if (S < 1 || S > std::numeric_limits<int32_t>::max()) throw std::invalid_argument("seq_len must fit int32");
  check_array(position_ids, "position_ids", has_dtype<int32_t>(position_ids), "int32", {B, S}, true);
  check_array(labels, "labels", has_dtype<int64_t>(labels), "int64", {B, S}, true);
  check_array(cu_seqlens, "cu_seqlens", has_dtype<int32_t>(cu_seqlens), "int32", {B, -1}, true);
  check_array(loss_positions, "loss_positions", has_dtype<int32_t>(loss_positions), "int32", {B, -1}, true);
  check_array(counts, "counts", has_dtype<int64_t>(counts), "int64", {B, 3}, true);
  if (cu_seqlens.shape(1) < 3) throw std::invalid_argument("cu_seqlens: needs max_docs + 2 >= 3 columns");
  BatchBuffers out{static_cast<int64_t*>(input_ids.mutable_data()),
                   static_cast<int32_t*>(position_ids.mutable_data()),
                   static_cast<int64_t*>(labels.mutable_data()),
                   static_cast<int32_t*>(cu_seqlens.mutable_data()),
                   static_cast<int32_t*>(loss_positions.mutable_data()),
                   static_cast<int64_t*>(counts.mutable_data()),
                   S,
                   cu_seqlens.shape(1) - 2,
                   loss_positions.shape(1),
                   vocab_size};
  const int64_t* rp = static_cast<const int64_t*>(row_ptr.data());
  const int64_t* rd = static_cast<const int64_t*>(row_docs.data());
  const int64_t* e = static_cast<const int64_t*>(eff_len.data());
  const int64_t* r = static_cast<const int64_t*>(rows.data());
  const int64_t num_plan_rows = row_ptr.shape(0) - 1, num_row_docs = row_docs.shape(0);
  py::gil_scoped_release release;
  fastsft::assemble_rows(corpus.corpus(), rp, num_plan_rows, rd, num_row_docs, e, r, B, out);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastsft C++ extension: the packing loader (plan an epoch, assemble batches); numpy buffers, no libtorch";
  m.attr("API_VERSION") = 2;  // fastsft/data/loader.py refuses a stale build (rebuild: pip install -e .)
  py::register_exception<fastsft::ShardReadError>(m, "ShardReadError", PyExc_OSError);
  py::class_<PyCorpus>(m, "Corpus")
      .def(py::init<const py::list&, bool>(), py::arg("shards"), py::arg("mmap") = true,
           "Shards as a list of fastsft.data.shards.ShardFile (fd, itemsize, layout, offsets, num_tokens, path); "
           "mmap: assemble from read-only maps under a SIGBUS guard (default) instead of pread per document.")
      .def_property_readonly("num_docs", &PyCorpus::num_docs)
      .def_property_readonly("mmap", &PyCorpus::mapped)
      .def("effective_lengths", &PyCorpus::effective_lengths, py::arg("seq_len"), py::arg("loss_bucket"),
           py::arg("drop_long"), "(eff_len, supervised) int64 arrays; loss_bucket < 0: no loss bucket (no cap).");
  m.def("plan_epoch", &plan_epoch, py::arg("eff_len"), py::arg("supervised"), py::arg("seq_len"), py::arg("max_docs"),
        py::arg("loss_budget"), py::arg("window"), py::arg("seed"), py::arg("epoch"), py::arg("world_size"),
        py::arg("drop_last"), "(row_ptr, row_docs) int64 arrays: every rank's rows of one epoch.");
  m.def("assemble_rows", &assemble_rows, py::arg("corpus"), py::arg("row_ptr"), py::arg("row_docs"),
        py::arg("eff_len"), py::arg("rows"), py::arg("input_ids"), py::arg("position_ids"), py::arg("labels"),
        py::arg("cu_seqlens"), py::arg("loss_positions"), py::arg("counts"), py::arg("vocab_size") = 0,
        "Fill row i of every buffer with plan row rows[i] (batch contract of fastsft/data/batch.py).");
}
