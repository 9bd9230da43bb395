// Placeholder so the extension builds before the loader lands; replaced by the packing loader (issue 2).
#include <pybind11/pybind11.h>
PYBIND11_MODULE(_C, m) { m.doc() = "fastsft C++ extension"; }
