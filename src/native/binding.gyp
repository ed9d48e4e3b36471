{
  "targets": [
    {
      "target_name": "backy_native",
      "sources": ["module.c", "aes-gcm.c", "alignment.c", "fallocate.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
