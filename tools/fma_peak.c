// FP32 FMA peak of one thread on this CPU, AVX2 (12 ymm accumulators) and AVX-512 (24 zmm): the
// roofline the CPU kernels are read against (bench numbers are only comparable across machines
// with it). gcc -O2 -o /tmp/fma_peak tools/fma_peak.c && /tmp/fma_peak
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
__attribute__((target("avx2,fma"))) double avx2(long n){
  __m256 a[12]; __m256 x=_mm256_set1_ps(0.999999f), y=_mm256_set1_ps(1e-7f);
  for(int i=0;i<12;i++)a[i]=_mm256_set1_ps(i);
  double t=now();
  for(long it=0;it<n;it++){
    #pragma GCC unroll 12
    for(int i=0;i<12;i++)a[i]=_mm256_fmadd_ps(a[i],x,y);
  }
  t=now()-t; float s=0; for(int i=0;i<12;i++){float b[8];_mm256_storeu_ps(b,a[i]);s+=b[0];}
  if(s==1234.5f)printf("x");
  return n*12.0*8*2/t/1e9;
}
__attribute__((target("avx512f"))) double avx512(long n){
  __m512 a[24]; __m512 x=_mm512_set1_ps(0.999999f), y=_mm512_set1_ps(1e-7f);
  for(int i=0;i<24;i++)a[i]=_mm512_set1_ps(i);
  double t=now();
  for(long it=0;it<n;it++){
    #pragma GCC unroll 24
    for(int i=0;i<24;i++)a[i]=_mm512_fmadd_ps(a[i],x,y);
  }
  t=now()-t; float s=0; for(int i=0;i<24;i++){float b[16];_mm512_storeu_ps(b,a[i]);s+=b[0];}
  if(s==1234.5f)printf("x");
  return n*24.0*16*2/t/1e9;
}
int main(){ for(int r=0;r<3;r++) printf("avx2 %.1f GFLOP/s  avx512 %.1f GFLOP/s (one thread)\n", avx2(200000000L), avx512(100000000L)); }
