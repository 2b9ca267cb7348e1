// An experiment for paired_ab.py (variant `uninitialized_scan_stacks`): an XLA FFI
// custom call that returns its result buffer as it finds it, unwritten.

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error Uninitialized(ffi::Result<ffi::AnyBuffer>) { return ffi::Error::Success(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtlibUninitialized, Uninitialized,
                              ffi::Ffi::Bind().Ret<ffi::AnyBuffer>());
