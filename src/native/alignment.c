/*
 * Where memory is aligned. Direct I/O (O_DIRECT) needs buffers aligned to the device's block size, and
 * JavaScript cannot see addresses: backy allocates a little more than it needs and starts its buffers at the
 * offset this module finds. The address of an ArrayBuffer's memory does not change when it moves between
 * threads, so the offset holds for the buffer's life.
 */
#include <stdint.h>
#include "backy-native.h"

/* The offset from `data` to the next multiple of `alignment` (a power of two), as a JavaScript number. */
static napi_value offset_to_alignment(napi_env env, const void *data, uint32_t alignment) {
  napi_value result;
  if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
    napi_throw_range_error(env, NULL, "alignment must be a power of two");
    return NULL;
  }
  uint32_t offset = (uint32_t)((alignment - ((uintptr_t)data & (alignment - 1))) & (alignment - 1));
  napi_create_uint32(env, offset, &result);
  return result;
}

/* alignedOffset(arrayBuffer, alignment) -> the first offset in it whose address is a multiple of alignment */
static napi_value aligned_offset(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  void *data = NULL;
  size_t length = 0;
  uint32_t alignment = 0;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 ||
      napi_get_arraybuffer_info(env, argv[0], &data, &length) != napi_ok ||
      napi_get_value_uint32(env, argv[1], &alignment) != napi_ok) {
    napi_throw_type_error(env, NULL, "alignedOffset(arrayBuffer, alignment)");
    return NULL;
  }
  return offset_to_alignment(env, data, alignment);
}

/*
 * viewAlignedOffset(typedArray, alignment) -> the same, counted from the view's start. For views of a
 * SharedArrayBuffer too, which napi_get_arraybuffer_info does not take.
 */
static napi_value view_aligned_offset(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  void *data = NULL;
  size_t length = 0;
  uint32_t alignment = 0;
  napi_typedarray_type type;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 ||
      napi_get_typedarray_info(env, argv[0], &type, &length, &data, NULL, NULL) != napi_ok ||
      napi_get_value_uint32(env, argv[1], &alignment) != napi_ok) {
    napi_throw_type_error(env, NULL, "viewAlignedOffset(typedArray, alignment)");
    return NULL;
  }
  return offset_to_alignment(env, data, alignment);
}

void register_alignment(napi_env env, napi_value exports) {
  napi_property_descriptor methods[] = {
    {"alignedOffset", NULL, aligned_offset, NULL, NULL, NULL, napi_default, NULL},
    {"viewAlignedOffset", NULL, view_aligned_offset, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof methods / sizeof methods[0], methods);
}
