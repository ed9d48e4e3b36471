/* The parts of backy's native module (src/native/build/Release/backy_native.node); module.c registers each. */
#include <node_api.h>

void register_aes_gcm(napi_env env, napi_value exports);
void register_alignment(napi_env env, napi_value exports);
void register_fallocate(napi_env env, napi_value exports);
