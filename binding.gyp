{
  "targets": [
    {
      "target_name": "backy_native",
      "sources": ["src/native/aes-gcm.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
