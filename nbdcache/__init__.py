"""nbdcache: an NBD server with a compressed RAM tier and writeback to a disk image."""

__version__ = "0.1.0"
