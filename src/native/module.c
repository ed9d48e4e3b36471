#include "backy-native.h"

static napi_value init(napi_env env, napi_value exports) {
  register_aes_gcm(env, exports);
  register_alignment(env, exports);
  register_fallocate(env, exports);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
