// The matmul shapes and the decoder of the format named by the HQQ / GPTQ / EETQ flag.
#include "common/matmul_params.wgsl"
#ifdef HQQ
#include "formats/hqq.wgsl"
#endif
#ifdef GPTQ
#include "formats/gptq.wgsl"
#endif
#ifdef EETQ
#include "formats/eetq.wgsl"
#endif
