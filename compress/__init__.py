"""compress: edge model compression toolchain (search, distill, quantize, export, bench)."""

__version__ = "0.1.0"
