"""Reading images: container headers (header, ifd) and decoding (decode)."""
