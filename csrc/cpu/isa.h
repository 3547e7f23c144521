// The instruction set of this translation unit. setup.py compiles every csrc/cpu/*.cpp once per
// ISA variant, as ATen compiles its native/cpu kernels (see cpu_dispatch.h for the run-time choice):
//   DEFAULT  the x86-64 / aarch64 baseline, no extra flags   -DCPU_CAPABILITY=DEFAULT
//   AVX2     -mavx2 -mfma -mf16c                              -DCPU_CAPABILITY=AVX2
//   AVX512   -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c   -DCPU_CAPABILITY=AVX512
// plus -DCPU_CAPABILITY_<ISA>, the macros at::vec reads: Vectorized<float> is 8 floats of AVX2, 16
// of AVX-512, or a plain array for DEFAULT, and at::vec's inline namespace is CPU_CAPABILITY.
//
// A kernel file opens `namespace forkattn { namespace cpu::CPU_CAPABILITY {`, and the shared headers
// (vec.h, tiles.h, philox_cpu.h) put their code there too: every symbol of a variant carries its ISA
// in its name (forkattn::cpu::AVX2::attention_fwd_kernel), so two variants' inline functions can
// never be merged by the linker into one that holds instructions the running CPU lacks.
// Include this header (directly or through vec.h) before any ATen header.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "csrc/cpu/*.cpp are compiled once per ISA by setup.py, which defines CPU_CAPABILITY (DEFAULT, AVX2 or AVX512)"
#endif
