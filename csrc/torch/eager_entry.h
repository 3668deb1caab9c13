// The public functions' eager entries on the native backend (eager_entry.cpp), added to
// llmcore._native by its module init (ops.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace llmcore {
namespace ops {

void def_eager_entries(pybind11::module_& m);

}  // namespace ops
}  // namespace llmcore
