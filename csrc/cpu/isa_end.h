// Closes the region opened by isa_begin.h.
}  // namespace FASTGEN_ISA_NS
}  // namespace fastgen_cpu
#if defined(FASTGEN_TARGET_PUSHED)
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#undef FASTGEN_TARGET_PUSHED
#endif
