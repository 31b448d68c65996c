// CPU path selection: see kernels.h (the interface) and isa.cpp (detection, FASTGEN_CPU_ISA).
#pragma once
#include "kernels.h"
