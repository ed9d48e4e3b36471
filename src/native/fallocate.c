/*
 * fallocate(2) for restore targets: Node has no binding, and running util-linux's fallocate for it cost a
 * restore a process start, a PATH search and the fsync that program does (about 0.08 s for any size).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include "backy-native.h"

/* fallocate(fd, mode, offset, length) -> 0, or the errno the kernel gave (EOPNOTSUPP where the filesystem cannot) */
static napi_value do_fallocate(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4], result;
  int32_t fd = -1, mode = 0;
  int64_t offset = 0, length = 0;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 4 ||
      napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int32(env, argv[1], &mode) != napi_ok ||
      napi_get_value_int64(env, argv[2], &offset) != napi_ok ||
      napi_get_value_int64(env, argv[3], &length) != napi_ok) {
    napi_throw_type_error(env, NULL, "fallocate(fd, mode, offset, length)");
    return NULL;
  }
  int rc;
  do {
    rc = fallocate(fd, mode, (off_t)offset, (off_t)length) == 0 ? 0 : errno;
  } while (rc == EINTR);
  napi_create_int32(env, rc, &result);
  return result;
}

void register_fallocate(napi_env env, napi_value exports) {
  napi_property_descriptor methods[] = {
    {"fallocate", NULL, do_fallocate, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof methods / sizeof methods[0], methods);
}
