"""A Linux guest under qemu that swaps on an NBD export, for the end-to-end tests.

- `kernel`: Debian's current amd64 kernel, unpacked into a cache, never installed;
- `modules`: `.modinfo` parsing and dependency order of its modules;
- `initramfs`: busybox, /init, the memory hog and nbd-client in a cpio archive;
- `runner`: boots qemu against a server and parses the serial console;
- `servers`: starts the NBD servers under test (nbdcache, nbdkit memory).
"""
