"""Small helpers shared by several modules (image conversion, ...)."""
