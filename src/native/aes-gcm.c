/*
 * AES-256-GCM into buffers the caller owns, through the OpenSSL that Node itself links (its symbols and
 * headers come with Node). Node's own Cipher API returns a new buffer per update, which it allocates twice
 * and copies once; for 4 MiB blocks that cost more than the cipher (src/codec/aes-gcm.ts falls back to it when
 * this module is not built).
 */
#include <node_api.h>
#include <openssl/evp.h>
#include "backy-native.h"

#define TAG_BYTES 16

static void free_context(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  EVP_CIPHER_CTX_free((EVP_CIPHER_CTX *)data);
}

/* The bytes of a Buffer (or any Uint8Array); false with a TypeError pending when it is none. */
static int bytes_of(napi_env env, napi_value v, unsigned char **data, size_t *length) {
  void *d = NULL;
  if (napi_get_buffer_info(env, v, &d, length) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected a Buffer");
    return 0;
  }
  *data = d;
  return 1;
}

/* start(key, nonce, aad, decrypt) -> context: key 32 bytes, nonce 12, aad any length. */
static napi_value start(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  unsigned char *key, *nonce, *aad;
  size_t key_len, nonce_len, aad_len;
  bool decrypt = false;
  int ignored;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 4) {
    napi_throw_type_error(env, NULL, "start(key, nonce, aad, decrypt)");
    return NULL;
  }
  if (!bytes_of(env, argv[0], &key, &key_len) || !bytes_of(env, argv[1], &nonce, &nonce_len) ||
      !bytes_of(env, argv[2], &aad, &aad_len))
    return NULL;
  napi_get_value_bool(env, argv[3], &decrypt);
  if (key_len != 32 || nonce_len != 12 || aad_len > 0x7fffffff) {
    napi_throw_range_error(env, NULL, "AES-256-GCM needs a 32-byte key and a 12-byte nonce");
    return NULL;
  }
  EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
  if (c == NULL || EVP_CipherInit_ex(c, EVP_aes_256_gcm(), NULL, key, nonce, decrypt ? 0 : 1) != 1 ||
      (aad_len > 0 && EVP_CipherUpdate(c, NULL, &ignored, aad, (int)aad_len) != 1)) {
    EVP_CIPHER_CTX_free(c);
    napi_throw_error(env, NULL, "AES-256-GCM setup failed");
    return NULL;
  }
  napi_value context;
  if (napi_create_external(env, c, free_context, NULL, &context) != napi_ok) {
    EVP_CIPHER_CTX_free(c);
    napi_throw_error(env, NULL, "AES-256-GCM setup failed");
    return NULL;
  }
  return context;
}

static EVP_CIPHER_CTX *context_of(napi_env env, napi_value v) {
  void *c = NULL;
  if (napi_get_value_external(env, v, &c) != napi_ok || c == NULL) {
    napi_throw_type_error(env, NULL, "expected an AES-256-GCM context");
    return NULL;
  }
  return c;
}

/* update(context, src, dst): encrypts or decrypts src into the first src.length bytes of dst. */
static napi_value update(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  unsigned char *src, *dst;
  size_t src_len, dst_len;
  int written = 0;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  EVP_CIPHER_CTX *c = argc >= 3 ? context_of(env, argv[0]) : NULL;
  if (c == NULL || !bytes_of(env, argv[1], &src, &src_len) || !bytes_of(env, argv[2], &dst, &dst_len)) return NULL;
  if (dst_len < src_len || src_len > 0x7fffffff) {
    napi_throw_range_error(env, NULL, "output buffer smaller than the input");
    return NULL;
  }
  /* GCM is a stream mode: OpenSSL writes exactly as many bytes as it is given. */
  if (EVP_CipherUpdate(c, dst, &written, src, (int)src_len) != 1 || (size_t)written != src_len) {
    napi_throw_error(env, NULL, "AES-256-GCM update failed");
    return NULL;
  }
  return NULL;
}

/*
 * finish(context, tag): encrypting, writes the 16-byte tag into `tag` and returns true; decrypting, returns
 * whether `tag` authenticates everything given to the context.
 */
static napi_value finish(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2], result;
  unsigned char *tag, rest[32];
  size_t tag_len;
  int written = 0, ok;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  EVP_CIPHER_CTX *c = argc >= 2 ? context_of(env, argv[0]) : NULL;
  if (c == NULL || !bytes_of(env, argv[1], &tag, &tag_len)) return NULL;
  if (tag_len != TAG_BYTES) {
    napi_throw_range_error(env, NULL, "the tag is 16 bytes");
    return NULL;
  }
  if (EVP_CIPHER_CTX_encrypting(c))
    ok = EVP_CipherFinal_ex(c, rest, &written) == 1 && EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, TAG_BYTES, tag) == 1;
  else
    ok = EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, TAG_BYTES, tag) == 1 && EVP_CipherFinal_ex(c, rest, &written) == 1;
  napi_get_boolean(env, ok && written == 0, &result);
  return result;
}

void register_aes_gcm(napi_env env, napi_value exports) {
  napi_property_descriptor methods[] = {
    {"gcmStart", NULL, start, NULL, NULL, NULL, napi_default, NULL},
    {"gcmUpdate", NULL, update, NULL, NULL, NULL, napi_default, NULL},
    {"gcmFinish", NULL, finish, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof methods / sizeof methods[0], methods);
}
