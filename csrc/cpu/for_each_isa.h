// Includes MMG_KERNEL_FILE once per ISA, each copy in its own namespace and target region (see
// isa.h). No include guard on purpose. Kernel files must not instantiate std:: templates: an
// instantiation made inside a target region could be merged by the linker with the baseline one.
#ifndef MMG_KERNEL_FILE
#error "define MMG_KERNEL_FILE before including for_each_isa.h"
#endif

#if MMG_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,popcnt")
#define MMG_VB 64
#define MMG_NS avx512
#include MMG_KERNEL_FILE
#undef MMG_VB
#undef MMG_NS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt")
#define MMG_VB 32
#define MMG_NS avx2
#include MMG_KERNEL_FILE
#undef MMG_VB
#undef MMG_NS
#pragma GCC pop_options
#endif

#define MMG_VB 16
#define MMG_NS generic
#include MMG_KERNEL_FILE
#undef MMG_VB
#undef MMG_NS

#undef MMG_KERNEL_FILE
