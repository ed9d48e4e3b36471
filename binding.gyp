{
  "targets": [
    {
      "target_name": "backy_native",
      "sources": ["src/native/module.c", "src/native/aes-gcm.c", "src/native/alignment.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
