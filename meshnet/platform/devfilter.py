"""The device policy of a cgroup v2 task: a BPF_PROG_TYPE_CGROUP_DEVICE program.

cgroup v2 has no devices.allow/deny files; the kernel asks a BPF program attached to the
cgroup instead (as runc and systemd do). Ours says what platform/cgroups.py's DEVICE_RULES say
on v1: any block device is refused (open and mknod); a character device may be created, but
opened only if it is one of the task's /dev nodes (null zero full random urandom tty ptmx
pts/*). The program is 24 instructions, assembled here, loaded with bpf(2) and attached with
BPF_F_ALLOW_MULTI, so a policy an ancestor cgroup has (systemd's DevicePolicy=) still applies.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from pathlib import Path

from meshnet.platform.nsfd import PlatformError, _c

BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 2
# bpf(2) differs per architecture.
SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
# struct bpf_cgroup_dev_ctx: access_type = (access << 16) | type, then major, minor.
DEV_BLOCK = 1
ACC_MKNOD = 1

# Instruction encoding (linux/bpf.h): code, dst/src registers, 16-bit offset, 32-bit immediate.
LDXW = 0x61       # BPF_LDX | BPF_MEM | BPF_W
MOV64_X = 0xBF    # BPF_ALU64 | BPF_MOV | BPF_X
MOV64_K = 0xB7
AND64_K = 0x57
RSH64_K = 0x77
JEQ_K = 0x15
JNE_K = 0x55
JA = 0x05
EXIT = 0x95


class DeviceFilterError(PlatformError):
    pass


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def program() -> bytes:
    """r1 = ctx; r2 = access, r3 = type, r4 = major, r5 = minor; r0 = 1 allows."""
    deny, allow = 20, 22

    def to(target: int, at: int) -> int:  # a jump's offset counts from the next instruction
        return target - at - 1

    insns = [
        _insn(LDXW, 2, 1, 0),                      # 0  r2 = access_type
        _insn(MOV64_X, 3, 2),                      # 1  r3 = r2
        _insn(AND64_K, 3, imm=0xFFFF),             # 2  r3 = device type
        _insn(RSH64_K, 2, imm=16),                 # 3  r2 = access
        _insn(LDXW, 4, 1, 4),                      # 4  r4 = major
        _insn(LDXW, 5, 1, 8),                      # 5  r5 = minor
        _insn(JEQ_K, 3, off=to(deny, 6), imm=DEV_BLOCK),     # 6  block device: no
        _insn(JEQ_K, 2, off=to(allow, 7), imm=ACC_MKNOD),    # 7  mknod of a char device: yes
        _insn(JNE_K, 4, off=to(15, 8), imm=1),               # 8  major 1: mem devices
        _insn(JEQ_K, 5, off=to(allow, 9), imm=3),            # 9    null
        _insn(JEQ_K, 5, off=to(allow, 10), imm=5),           # 10   zero
        _insn(JEQ_K, 5, off=to(allow, 11), imm=7),           # 11   full
        _insn(JEQ_K, 5, off=to(allow, 12), imm=8),           # 12   random
        _insn(JEQ_K, 5, off=to(allow, 13), imm=9),           # 13   urandom
        _insn(JA, off=to(deny, 14)),                         # 14
        _insn(JNE_K, 4, off=to(19, 15), imm=5),              # 15 major 5: tty, ptmx
        _insn(JEQ_K, 5, off=to(allow, 16), imm=0),           # 16   tty
        _insn(JEQ_K, 5, off=to(allow, 17), imm=2),           # 17   ptmx
        _insn(JA, off=to(deny, 18)),                         # 18
        _insn(JEQ_K, 4, off=to(allow, 19), imm=136),         # 19 pts/*
        _insn(MOV64_K, 0, imm=0),                  # 20 deny
        _insn(EXIT),                               # 21
        _insn(MOV64_K, 0, imm=1),                  # 22 allow
        _insn(EXIT),                               # 23
    ]
    return b"".join(insns)


def _bpf(cmd: int, attr: bytes) -> int:
    nr = SYS_BPF.get(platform.machine())
    if nr is None:
        raise DeviceFilterError(f"device filter: bpf(2) number unknown on {platform.machine()}")
    buf = ctypes.create_string_buffer(attr, len(attr))
    libc = _c()
    libc.syscall.restype = ctypes.c_long
    ret = int(libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), buf,
                           ctypes.c_uint(len(attr))))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def load_program() -> int:
    """Load the program; returns its fd."""
    insns = program()
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(b"Apache-2.0")
    log = ctypes.create_string_buffer(4096)
    attr = struct.pack("<IIQQIIQ", BPF_PROG_TYPE_CGROUP_DEVICE, len(insns) // 8,
                       ctypes.addressof(code), ctypes.addressof(license_), 1, len(log),
                       ctypes.addressof(log))
    attr += bytes(128 - len(attr))
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except OSError as e:
        detail = log.value.decode(errors="replace").strip().splitlines()
        raise DeviceFilterError(f"device filter: BPF program refused ({e.strerror})"
                                + (f": {detail[-1]}" if detail else "")) from e


def attach_device_filter(cgroup_dir: Path) -> None:
    """Attach the device policy to the cgroup v2 directory CGROUP_DIR."""
    prog = load_program()
    try:
        cg = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            attr = struct.pack("<IIII", cg, prog, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI)
            _bpf(BPF_PROG_ATTACH, attr + bytes(16))
        except OSError as e:
            raise DeviceFilterError(f"device filter on {cgroup_dir}: {e.strerror}") from e
        finally:
            os.close(cg)
    finally:
        os.close(prog)  # the attachment holds the program from now on
