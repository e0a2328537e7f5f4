#!/usr/bin/env python3
"""Writes the committed seed corpus of the vhost fuzz targets (corpus/<target>/): a QEMU-like
handshake and each message alone for `message` and `wire` (cut into pieces, with descriptors
for `wire`), and well-formed and broken descriptor chains for `chain`. The input formats are
described at the top of each fuzz_targets/*.rs. Deterministic: rerunning rewrites the same
files.  python3 vhost/fuzz/seed.py"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

# vhost-user request codes (message.rs `code`).
GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_LOG_BASE = 6
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG, SET_CONFIG, GET_INFLIGHT_FD, SET_INFLIGHT_FD = 24, 25, 31, 32
GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG = 36, 37, 38
NEED_REPLY = 0x8
NOFD = 0x100


def msg(request, body=b"", flags=1, size=None):
    return struct.pack("<III", request, flags, len(body) if size is None else size) + body


def region(gpa, size, uaddr, off=0):
    return struct.pack("<QQQQ", gpa, size, uaddr, off)


def table(*regions):
    return struct.pack("<II", len(regions), 0) + b"".join(regions)


def vring_state(index, num):
    return struct.pack("<II", index, num)


def vring_addr(index, desc, used, avail, flags=0):
    return struct.pack("<IIQQQQ", index, flags, desc, used, avail, 0)


def config(offset, size, flags=0, payload=None):
    return struct.pack("<III", offset, size, flags) + (b"\0" * size if payload is None else payload)


def inflight(mmap_size, num_queues, queue_size):
    return struct.pack("<QQHHI", mmap_size, 0, num_queues, queue_size, 0)


U = 0x7F00_0000_0000
ONE = {
    "get_features": msg(GET_FEATURES),
    "set_features": msg(SET_FEATURES, struct.pack("<Q", (1 << 32) | (1 << 30) | (1 << 29))),
    "set_owner": msg(SET_OWNER),
    "reset_owner": msg(RESET_OWNER),
    "get_protocol_features": msg(GET_PROTOCOL_FEATURES),
    "set_protocol_features": msg(SET_PROTOCOL_FEATURES, struct.pack("<Q", 0x9209)),
    "get_queue_num": msg(GET_QUEUE_NUM),
    "get_max_mem_slots": msg(GET_MAX_MEM_SLOTS),
    "set_mem_table_1": msg(SET_MEM_TABLE, table(region(0, 1 << 30, U))),
    "set_mem_table_2": msg(SET_MEM_TABLE, table(region(0, 0xC000_0000, U), region(1 << 32, 1 << 30, U + (3 << 30)))),
    "set_mem_table_8": msg(SET_MEM_TABLE, table(*[region(i << 20, 1 << 20, U + (i << 20)) for i in range(8)])),
    "set_mem_table_9": msg(SET_MEM_TABLE, table(*[region(i << 20, 1 << 20, U + (i << 20)) for i in range(9)])),
    "add_mem_reg": msg(ADD_MEM_REG, b"\0" * 8 + region(0, 1 << 30, U)),
    "rem_mem_reg": msg(REM_MEM_REG, b"\0" * 8 + region(0, 1 << 30, U)),
    "set_vring_num": msg(SET_VRING_NUM, vring_state(0, 256)),
    "set_vring_addr": msg(SET_VRING_ADDR, vring_addr(0, U + 0x1000, U + 0x3000, U + 0x2000)),
    "set_vring_addr_log": msg(SET_VRING_ADDR, vring_addr(0, U, U, U, flags=1)),
    "set_vring_base": msg(SET_VRING_BASE, vring_state(0, 0)),
    "get_vring_base": msg(GET_VRING_BASE, vring_state(1, 0)),
    "set_vring_kick": msg(SET_VRING_KICK, struct.pack("<Q", 0)),
    "set_vring_call_nofd": msg(SET_VRING_CALL, struct.pack("<Q", NOFD | 1)),
    "set_vring_err_badflag": msg(SET_VRING_ERR, struct.pack("<Q", 0x200)),
    "set_vring_enable": msg(SET_VRING_ENABLE, vring_state(0, 1), flags=1 | NEED_REPLY),
    "get_config": msg(GET_CONFIG, config(0, 60)),
    "get_config_outside": msg(GET_CONFIG, config(56, 8)),
    "set_config_writeback": msg(SET_CONFIG, config(32, 1, payload=b"\1")),
    "set_config_badsize": msg(SET_CONFIG, config(32, 4, payload=b"\1")),
    "get_inflight_fd": msg(GET_INFLIGHT_FD, inflight(0, 2, 256)),
    "set_inflight_fd": msg(SET_INFLIGHT_FD, inflight(0x2000, 2, 256)),
    "set_log_base": msg(SET_LOG_BASE, b"\0" * 16),
    "unknown_request": msg(99, b"\0" * 4),
    "bad_version": msg(GET_FEATURES, flags=2),
    "reply_flag": msg(GET_FEATURES, flags=1 | 4),
    "too_large": msg(SET_CONFIG, size=4097),
    "cut_body": msg(SET_VRING_ADDR, vring_addr(0, 0, 0, 0))[:30],
}

HANDSHAKE = b"".join(ONE[k] for k in [
    "get_features", "get_protocol_features", "set_protocol_features", "get_queue_num",
    "get_max_mem_slots", "set_owner", "get_config", "set_features", "set_mem_table_1",
    "set_vring_num", "set_vring_base", "set_vring_addr", "set_vring_kick", "set_vring_call_nofd",
    "set_vring_enable", "set_config_writeback", "get_inflight_fd", "get_vring_base"])


def wire(pieces, stream):
    """pieces: (length, fd code) per piece; the last piece takes the rest of the stream."""
    assert 1 <= len(pieces) <= 8
    return bytes([len(pieces) - 1]) + b"".join(struct.pack("<HB", n, c) for n, c in pieces) + stream


# Fd codes (wire.rs fd_count): 0 none, 0x80 + k: k+1 (k < 4), 0xc0 + k: k+1 (k < 64).
WIRE = {
    "handshake_whole": wire([(0, 0)], HANDSHAKE),
    "handshake_cut": wire([(5, 0), (7, 0), (1, 0), (4, 0), (40, 0), (12, 0), (3, 0), (0, 0)], HANDSHAKE),
    "kick_with_fd": wire([(0, 0x80)], ONE["set_vring_kick"]),
    "kick_fd_on_body": wire([(12, 0), (0, 0x80)], ONE["set_vring_kick"]),
    "mem_table_two_fds": wire([(0, 0x81)], ONE["set_mem_table_2"]),
    "mem_table_eight_fds": wire([(0, 0xc7)], ONE["set_mem_table_8"]),
    "fds_over_wire_max": wire([(0, 0xc0 + 39)], ONE["set_mem_table_8"]),
    "fds_over_cmsg_space": wire([(0, 0xc0 + 62)], ONE["set_mem_table_8"]),
    "fds_spread": wire([(10, 0xc0 + 15), (20, 0xc0 + 15), (0, 0xc0 + 15)], ONE["set_mem_table_8"]),
    "two_messages_fd_each": wire([(20, 0x80), (0, 0x80)], ONE["set_vring_kick"] + ONE["set_vring_call_nofd"]),
    "cut_header": wire([(0, 0)], ONE["get_features"][:7]),
    "cut_body": wire([(0, 0x80)], ONE["cut_body"]),
    "bad_header_after_good": wire([(12, 0), (0, 0)], ONE["get_features"] + ONE["bad_version"]),
    "too_large": wire([(0, 0)], ONE["too_large"] + b"\0" * 64),
}

# Descriptor flags.
NEXT, WRITE, INDIRECT = 1, 2, 4
# virtio-blk request types.
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
# Where seed chains put things in guest memory (the descriptor table is at 0).
HDR, HDR2, IND, STATUS, DATA = 0x400, 0x480, 0x600, 0x800, 0x1000


def desc(addr, length, flags=0, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def chain_seed(descs, heads=(0,), qexp=4, layout=0, ro=False, lbs4k=False, cap=256, start=0,
               blobs=(), published=None):
    """descs: the descriptor table; blobs: (address, bytes) put in guest memory."""
    b0 = qexp | (layout << 4) | (0x40 if ro else 0) | (0x80 if lbs4k else 0)
    published = len(heads) if published is None else published
    ctl = struct.pack("<BBIH", b0, published, cap, start)
    image = bytearray(0xa00)
    t = b"".join(descs)
    image[0:len(t)] = t
    for at, blob in blobs:
        end = at + len(blob)
        if end > len(image):
            image.extend(b"\0" * (end - len(image)))
        image[at:end] = blob
    return ctl + b"".join(struct.pack("<H", h) for h in heads) + bytes(image)


def hdr(rtype, sector=0, at=HDR):
    return (at, struct.pack("<IIQ", rtype, 0, sector))


def rng(sector, num, flags, at=DATA):
    return (at, struct.pack("<QII", sector, num, flags))


def three(data_len, data_flags, rtype, sector=0, **kw):
    descs = [desc(HDR, 16, NEXT, 1), desc(DATA, data_len, data_flags | NEXT, 2), desc(STATUS, 1, WRITE)]
    return chain_seed(descs, blobs=[hdr(rtype, sector)] + list(kw.pop("blobs", [])), **kw)


CHAIN = {
    "read_4k": three(4096, WRITE, T_IN, 8),
    "write_4k": three(4096, 0, T_OUT, 8),
    "read_4k_lbs4k": three(4096, WRITE, T_IN, 8, lbs4k=True),
    "read_misaligned": three(100, WRITE, T_IN),
    "read_past_end": three(4096, WRITE, T_IN, 256 * 8),
    "write_read_only": three(512, 0, T_OUT, ro=True),
    "read_wrong_direction": three(512, 0, T_IN),
    "get_id": three(20, WRITE, T_GET_ID),
    "unsupported_type": three(512, WRITE, 7),
    "flush": chain_seed([desc(HDR, 16, NEXT, 1), desc(STATUS, 1, WRITE)], blobs=[hdr(T_FLUSH)]),
    "discard": three(16, 0, T_DISCARD, blobs=[rng(8, 8, 0)]),
    "write_zeroes_unmap": three(32, 0, T_WRITE_ZEROES,
                                blobs=[rng(8, 8, 1), rng(64, 16, 0, at=DATA + 16)]),
    "discard_bad_flags": three(16, 0, T_DISCARD, blobs=[rng(8, 8, 1)]),
    "header_split": chain_seed([desc(HDR, 8, NEXT, 1), desc(HDR + 8, 8, NEXT, 2), desc(DATA, 512, WRITE | NEXT, 3),
                                desc(STATUS, 1, WRITE)], blobs=[hdr(T_IN)]),
    "header_and_data_one_desc": chain_seed([desc(HDR, 16 + 512, NEXT, 1), desc(STATUS, 1, WRITE)],
                                           blobs=[hdr(T_OUT)]),
    "data_and_status_one_desc": chain_seed([desc(HDR, 16, NEXT, 1), desc(DATA, 513, WRITE)], blobs=[hdr(T_IN)]),
    "header_short": chain_seed([desc(HDR, 8, NEXT, 1), desc(STATUS, 1, WRITE)], blobs=[hdr(T_IN)]),
    "single_desc": chain_seed([desc(HDR, 16, WRITE)], blobs=[hdr(T_IN)]),
    "status_not_writable": chain_seed([desc(HDR, 16, NEXT, 1), desc(DATA, 512, WRITE | NEXT, 2), desc(STATUS, 1)],
                                      blobs=[hdr(T_IN)]),
    "next_past_table": chain_seed([desc(HDR, 16, NEXT, 1), desc(DATA, 512, WRITE | NEXT, 40)], blobs=[hdr(T_IN)]),
    "loop": chain_seed([desc(HDR, 16, NEXT, 1), desc(DATA, 512, WRITE | NEXT, 0)], blobs=[hdr(T_IN)]),
    "indirect": chain_seed([desc(IND, 48, INDIRECT)], blobs=[hdr(T_IN), (IND, desc(HDR, 16, NEXT, 1)
                           + desc(DATA, 512, WRITE | NEXT, 2) + desc(STATUS, 1, WRITE))]),
    "indirect_bad_len": chain_seed([desc(IND, 47, INDIRECT)], blobs=[hdr(T_IN), (IND, desc(HDR, 16, NEXT, 1)
                                   + desc(DATA, 512, WRITE | NEXT, 2) + desc(STATUS, 1, WRITE))]),
    "indirect_loop": chain_seed([desc(IND, 32, INDIRECT)], blobs=[hdr(T_IN), (IND, desc(HDR, 16, NEXT, 1)
                                + desc(DATA, 512, WRITE | NEXT, 0))]),
    "two_chains": chain_seed([desc(HDR, 16, NEXT, 1), desc(STATUS, 1, WRITE),
                              desc(HDR2, 16, NEXT, 3), desc(DATA, 4096, NEXT, 4), desc(STATUS + 1, 1, WRITE)],
                             heads=(0, 2), blobs=[hdr(T_FLUSH), hdr(T_OUT, 16, at=HDR2)]),
    "avail_wraps": chain_seed([desc(HDR, 16, NEXT, 1), desc(STATUS, 1, WRITE)], heads=(0, 0),
                              start=0xffff, blobs=[hdr(T_FLUSH)]),
    "overrun": chain_seed([desc(HDR, 16, NEXT, 1), desc(STATUS, 1, WRITE)], heads=(0,), qexp=0,
                          published=3, blobs=[hdr(T_FLUSH)]),
    "queue_size_1": chain_seed([desc(IND, 48, INDIRECT)], qexp=0, blobs=[hdr(T_IN), (IND, desc(HDR, 16, NEXT, 1)
                               + desc(DATA, 512, WRITE | NEXT, 2) + desc(STATUS, 1, WRITE))]),
    # Queue size 4: seg_max 2; an indirect table may hold more descriptors than the queue.
    "too_many_segments": chain_seed([desc(IND, 80, INDIRECT)], qexp=2, blobs=[hdr(T_IN), (IND, desc(HDR, 16, NEXT, 1)
                                    + desc(DATA, 512, WRITE | NEXT, 2) + desc(DATA + 512, 512, WRITE | NEXT, 3)
                                    + desc(DATA + 1024, 512, WRITE | NEXT, 4) + desc(STATUS, 1, WRITE))]),
    "data_across_regions": chain_seed([desc(HDR, 16, NEXT, 1), desc(0xF000, 0x2000, WRITE | NEXT, 2),
                                       desc(STATUS, 1, WRITE)], layout=1, blobs=[hdr(T_IN)]),
    "data_into_hole": chain_seed([desc(HDR, 16, NEXT, 1), desc(0xF000, 0x2000, WRITE | NEXT, 2),
                                  desc(STATUS, 1, WRITE)], layout=2, blobs=[hdr(T_IN)]),
    # Queue size 4: seg_max 2, max_bytes 2 MiB; two 1.5 MiB buffers in the 2 MiB region.
    "read_too_large": chain_seed([desc(HDR, 16, NEXT, 1), desc(0x14000, 0x180000, WRITE | NEXT, 2),
                                  desc(0x14000, 0x180000, WRITE | NEXT, 3), desc(STATUS, 1, WRITE)],
                                 qexp=2, layout=2, blobs=[hdr(T_IN)]),
    "status_at_top": chain_seed([desc(HDR, 16, NEXT, 1), desc(0xFFFF_FFFF_FFFE_F000, 0x1000, WRITE | NEXT, 2),
                                 desc(0xFFFF_FFFF_FFFE_FFFF, 1, WRITE)], layout=3, blobs=[hdr(T_IN)]),
    "status_past_top": chain_seed([desc(HDR, 16, NEXT, 1), desc(0xFFFF_FFFF_FFFF_FFF0, 0x20, WRITE)],
                                  layout=3, blobs=[hdr(T_IN)]),
}


def write(target, seeds):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


write("message", dict(ONE, handshake=HANDSHAKE, handshake_then_bad=HANDSHAKE + ONE["bad_version"]))
write("wire", WIRE)
write("chain", CHAIN)
