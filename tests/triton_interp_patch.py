"""Test-only fixes for three gaps of Triton 3.9's CPU interpreter (`TRITON_INTERPRET=1`).

`tests/conftest.py` imports this module before any test module, so it is in place before any
`@triton.jit` kernel (ours in `kernels/`, or Liger's) is imported. It changes nothing unless the
interpreter is on, and nothing outside the interpreter: compiled GPU kernels never see it.
Each gap below was reproduced on triton 3.9.0 (docs/MACHINE.md, "Triton on CPU"):

1. Python float arguments. A compiled kernel types a Python `float` argument as fp32
   (`triton.runtime.jit.mangle_type(0.5) == "fp32"`); the interpreter passes the raw Python float,
   so `x_bf16 * scale` computes on the bf16 *bit pattern* (a 1e33 error). Fix: wrap floats as fp32
   scalars, like the compiler.
2. `triton.language.extra.libdevice` functions (`rsqrt`, `tanh`, ...). The generic module holds
   stubs whose body is `...`; the compiler swaps in the backend's libdevice, the interpreter runs
   the stub and gets None. Fix: replace the stubs listed in `_LIBDEVICE` with NumPy versions (fp32
   and fp64 only, like libdevice itself). Kernels (and Liger) import these by name at import time,
   which is why this module must be imported first.
3. `tl.dot` on bf16 operands. The interpreter stores bf16 as uint16 and hands those integers to
   `np.matmul`: the product of the raw bits. Fix: widen bf16 operands to fp32 before the product
   (the GPU's tensor cores also multiply bf16 exactly and accumulate in fp32).
4. fp32 -> bf16 casts (`x.to(tl.bfloat16)`, stores into bf16 tensors) truncate in the
   interpreter; the GPU (and torch) round to nearest even, so the interpreter's error was up to
   twice the GPU's (and its own "RTNE" path does not carry into the exponent). Fix: round to
   nearest even, as torch does, unless round-toward-zero is asked for explicitly.
"""
import os

import numpy as np

if os.environ.get("TRITON_INTERPRET") == "1":
    import triton.language as tl
    import triton.language.extra.libdevice as libdevice
    from triton.runtime import interpreter as _interp

    # --- 1. float arguments are fp32 scalars -------------------------------------------------
    _implicit_cvt_unpatched = _interp._implicit_cvt

    def _implicit_cvt(arg):
        if isinstance(arg, float):
            return tl.tensor(_interp.TensorHandle(np.array([arg], dtype=np.float32), tl.float32),
                             tl.float32)
        return _implicit_cvt_unpatched(arg)

    _interp._implicit_cvt = _implicit_cvt

    # --- 2. libdevice stubs -> NumPy element-wise functions ----------------------------------
    _LIBDEVICE = {
        "rsqrt": lambda x: 1.0 / np.sqrt(x),
        "tanh": np.tanh,
        "sqrt": np.sqrt,
        "exp": np.exp,
        "log": np.log,
        "log1p": np.log1p,
        "expm1": np.expm1,
        "pow": np.power,
    }

    def _numpy_elementwise(name, np_fn):
        def fn(*args, **_ignored):  # _ignored: the `_semantic` keyword builtins receive
            first = next(a for a in args if isinstance(a, tl.tensor))
            if first.dtype not in (tl.float32, tl.float64):
                raise TypeError(f"libdevice.{name} takes fp32 or fp64 (as on the GPU), "
                                f"got {first.dtype}")
            data = [a.handle.data if isinstance(a, tl.tensor) else a for a in args]
            out = np.asarray(np_fn(*data)).astype(first.handle.data.dtype)
            return tl.tensor(_interp.TensorHandle(out, first.dtype.scalar), first.type)

        fn.__name__ = name
        return fn

    for _name, _np_fn in _LIBDEVICE.items():
        setattr(libdevice, _name, _numpy_elementwise(_name, _np_fn))

    # --- 3. bf16 tl.dot multiplies values, not bit patterns ----------------------------------
    _create_dot_unpatched = _interp.InterpreterBuilder.create_dot

    def _as_fp32(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = _interp._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return _interp.TensorHandle(data.reshape(handle.data.shape), tl.float32)

    def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return _create_dot_unpatched(self, _as_fp32(a), _as_fp32(b), d, input_precision,
                                     max_num_imprecise_acc)

    _interp.InterpreterBuilder.create_dot = _create_dot

    # --- 4. fp32 -> bf16 rounds to nearest even ----------------------------------------------
    _convert_float_unpatched = _interp._convert_float

    def _convert_float(input, input_dtype, output_dtype, rounding_mode):
        if (input_dtype, output_dtype) != (tl.float32, tl.bfloat16) or \
                rounding_mode == _interp._ir.ROUNDING_MODE.RTZ:
            return _convert_float_unpatched(input, input_dtype, output_dtype, rounding_mode)
        bits = np.frombuffer(input.tobytes(), dtype=np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # ties to even
        nan = np.isnan(np.frombuffer(input.tobytes(), dtype=np.float32))
        return np.where(nan, np.uint16(0x7FC0), rounded).reshape(input.shape)

    _interp._convert_float = _convert_float
