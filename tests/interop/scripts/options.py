"""Option haggling as libnbd performs it: LIST, INFO, GO, LIST/SET_META_CONTEXT.

``h`` comes from ``nbdsh --opt-mode -u URI``: connected, still negotiating.
"""

import nbd
from common import MAX_PAYLOAD, KiB, MiB, data


def listed_exports(h):
    found = []

    def callback(name, description):
        found.append((name, description))
        return 0

    h.opt_list(callback)
    return sorted(found)


def listed_contexts(h, *queries):
    h.clear_meta_contexts()
    for query in queries:
        h.add_meta_context(query)
    found = []

    def callback(name):
        found.append(name)
        return 0

    h.opt_list_meta_context(callback)
    return sorted(found)


def export_description(h):
    """The INFO_DESCRIPTION sent for the export, or "" when none was sent."""
    try:
        return h.get_export_description()
    except nbd.Error:
        return ""


def check_list(h, expected):
    """``expected``: [(name, description)] of every configured export."""
    got = listed_exports(h)
    assert got == sorted(expected), f"NBD_OPT_LIST: {got}, expected {sorted(expected)}"
    h.opt_abort()


def check_info(h, exports, first):
    """``exports``: [(name, size, description, read_only)]; ``first`` is the default."""
    h.set_full_info(True)
    for name, size, description, read_only in exports:
        h.set_export_name(name)
        h.opt_info()
        assert h.get_size() == size, (name, h.get_size())
        assert h.is_read_only() == read_only, name
        assert export_description(h) == description, (name, export_description(h))
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
        assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
        assert h.get_block_size(nbd.SIZE_MAXIMUM) == MAX_PAYLOAD
    h.set_export_name("")
    h.opt_info()
    assert h.get_canonical_export_name() == first, h.get_canonical_export_name()
    h.opt_go()
    assert h.get_size() == exports[0][1]
    h.pread(4096, 0)


def check_unknown_export_then_go(h, good_name):
    h.set_export_name("no-such-export")
    try:
        h.opt_info()
    except nbd.Error:
        pass
    else:
        raise AssertionError("NBD_OPT_INFO on an unknown export succeeded")
    try:
        h.opt_go()
    except nbd.Error:
        pass
    else:
        raise AssertionError("NBD_OPT_GO on an unknown export succeeded")
    # the negotiation goes on after the refusals
    h.set_export_name(good_name)
    h.opt_go()
    blob = data(1, 8 * KiB)
    h.pwrite(blob, MiB)
    assert h.pread(len(blob), MiB) == blob


def check_meta_contexts(h):
    assert "base:allocation" in listed_contexts(h), listed_contexts(h)
    assert listed_contexts(h, "base:") == ["base:allocation"]
    assert listed_contexts(h, "base:allocation") == ["base:allocation"]
    assert listed_contexts(h, "nbdcache:no-such-context") == []
    assert listed_contexts(h, "qemu:dirty-bitmap:x", "base:allocation") == ["base:allocation"]
    # SET with one unknown and one known context: only the known one is selected
    h.clear_meta_contexts()
    h.add_meta_context("nbdcache:no-such-context")
    h.add_meta_context("base:allocation")
    h.opt_go()
    assert h.can_meta_context("base:allocation")
    assert not h.can_meta_context("nbdcache:no-such-context")
    seen = []
    h.block_status(64 * KiB, 0, lambda ctx, off, entries, err: seen.append(ctx) or 0)
    assert seen == ["base:allocation"], seen


def check_go_without_meta_context(h):
    h.clear_meta_contexts()
    h.opt_go()
    assert not h.can_meta_context("base:allocation")
    h.pread(4096, 0)
