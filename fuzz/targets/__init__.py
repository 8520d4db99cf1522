"""The fuzz targets, one module per parser (see fuzz/__init__.py)."""
