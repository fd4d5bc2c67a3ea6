"""Files copied verbatim into Triton model repositories; they run inside Triton, not here."""
