"""platform/devfilter.py: the assembled BPF_PROG_TYPE_CGROUP_DEVICE program, checked the way
the verifier would (shape, jump targets, r0 set on every path to an exit) and then run in a
small interpreter against the policy that v1's DEVICE_RULES state."""

from __future__ import annotations

import struct

from meshnet.platform import devfilter
from meshnet.platform.cgroups import DEVICE_RULES

INSN = struct.Struct("<BBhi")
BPF_JMP_CLASS = 0x05
CALL = 0x85
# struct bpf_cgroup_dev_ctx access and type bits (linux/bpf.h).
DEV_BLOCK, DEV_CHAR = 1, 2
ACC_MKNOD, ACC_READ, ACC_WRITE = 1, 2, 4
U64 = (1 << 64) - 1


def decode() -> list[tuple[int, int, int, int, int]]:
    """(code, dst, src, off, imm) per instruction."""
    code = devfilter.program()
    return [(c, regs & 0xF, regs >> 4, off, imm)
            for c, regs, off, imm in INSN.iter_unpack(code)]


def is_jump(code: int) -> bool:
    return code & 0x07 == BPF_JMP_CLASS and code not in (devfilter.EXIT, CALL)


def test_shape() -> None:
    code = devfilter.program()
    assert len(code) == 24 * 8
    insns = decode()
    assert len(insns) == 24
    assert insns[-1][0] == devfilter.EXIT
    known = {devfilter.LDXW, devfilter.MOV64_X, devfilter.MOV64_K, devfilter.AND64_K,
             devfilter.RSH64_K, devfilter.JEQ_K, devfilter.JNE_K, devfilter.JA, devfilter.EXIT}
    assert {c for c, *_ in insns} <= known
    # r0..r5 only (r10 is the read-only frame pointer); loads read ctx (r1) at 0, 4, 8.
    assert all(dst <= 5 and src <= 5 for _, dst, src, _, _ in insns)
    loads = [(dst, src, off) for c, dst, src, off, _ in insns if c == devfilter.LDXW]
    assert loads == [(2, 1, 0), (4, 1, 4), (5, 1, 8)]
    assert devfilter.program() == code  # deterministic


def test_every_jump_lands_inside_the_program() -> None:
    insns = decode()
    n = len(insns)
    jumps = 0
    for i, (c, _, _, off, _) in enumerate(insns):
        if is_jump(c):
            jumps += 1
            target = i + 1 + off
            assert 0 <= target < n, f"insn {i}: jump to {target}"
            assert off >= 0, f"insn {i}: backward jump (a loop)"
        elif c != devfilter.EXIT:
            assert off == 0 or c == devfilter.LDXW, f"insn {i}: offset on a non-jump"
    assert jumps == 14  # instructions 6..19


def _successors(insns: list[tuple[int, int, int, int, int]], i: int) -> list[int]:
    c, _, _, off, _ = insns[i]
    if c == devfilter.EXIT:
        return []
    if c == devfilter.JA:
        return [i + 1 + off]
    if is_jump(c):
        return [i + 1, i + 1 + off]
    return [i + 1]


def test_r0_is_set_on_every_path_to_an_exit() -> None:
    insns = decode()
    n = len(insns)
    # Forward data flow (jumps only go forward): is r0 surely written when we reach insn i?
    r0_set: list[bool | None] = [None] * n
    r0_set[0] = False
    for i in range(n):
        state = r0_set[i]
        if state is None:
            continue  # unreachable
        c, dst, *_ = insns[i]
        if c == devfilter.EXIT:
            assert state, f"exit at {i} with r0 unset on some path"
            continue
        writes_r0 = c in (devfilter.MOV64_K, devfilter.MOV64_X, devfilter.LDXW,
                          devfilter.AND64_K, devfilter.RSH64_K) and dst == 0
        out = state or writes_r0
        for j in _successors(insns, i):
            assert j < n, f"insn {i} falls off the end"
            r0_set[j] = out if r0_set[j] is None else (r0_set[j] and out)
    # Every instruction is reachable (the verifier rejects dead code).
    assert all(s is not None for s in r0_set)
    exits = [i for i, (c, *_) in enumerate(insns) if c == devfilter.EXIT]
    assert exits == [21, 23]
    assert [insns[i - 1][:2] for i in exits] == [(devfilter.MOV64_K, 0)] * 2
    assert [insns[i - 1][4] for i in exits] == [0, 1]


def run(access: int, dev_type: int, major: int, minor: int) -> int:
    """Interpret the program on a bpf_cgroup_dev_ctx; its r0 (1 allows)."""
    insns = decode()
    ctx = struct.pack("<III", (access << 16) | dev_type, major, minor)
    regs = [0] * 11
    regs[1] = 0  # ctx "address"
    pc = 0
    for _ in range(1000):
        c, dst, src, off, imm = insns[pc]
        pc += 1
        if c == devfilter.LDXW:
            (regs[dst],) = struct.unpack_from("<I", ctx, regs[src] + off)
        elif c == devfilter.MOV64_X:
            regs[dst] = regs[src]
        elif c == devfilter.MOV64_K:
            regs[dst] = imm & U64
        elif c == devfilter.AND64_K:
            regs[dst] &= imm & U64
        elif c == devfilter.RSH64_K:
            regs[dst] >>= imm
        elif c == devfilter.JEQ_K:
            pc += off if regs[dst] == imm & U64 else 0
        elif c == devfilter.JNE_K:
            pc += off if regs[dst] != imm & U64 else 0
        elif c == devfilter.JA:
            pc += off
        elif c == devfilter.EXIT:
            return regs[0]
        else:  # pragma: no cover
            raise AssertionError(f"unknown opcode {c:#x}")
    raise AssertionError("no exit")  # pragma: no cover


def _allowed_by_v1_rules(dev_type: int, major: int, minor: int, access: int) -> bool:
    """What DEVICE_RULES (v1 syntax, after "a" is denied) allow."""
    kind = "b" if dev_type == DEV_BLOCK else "c"
    perms = {ACC_MKNOD: "m", ACC_READ: "r", ACC_WRITE: "w"}
    need = {p for bit, p in perms.items() if access & bit}
    for rule in DEVICE_RULES:
        t, numbers, rule_perms = rule.split()
        rmaj, rmin = numbers.split(":")
        if t == kind and rmaj in ("*", str(major)) and rmin in ("*", str(minor)) and \
                need <= set(rule_perms):
            return True
    return False


ACCESSES = [ACC_MKNOD, ACC_READ, ACC_WRITE, ACC_READ | ACC_WRITE]
DEVICES = [(DEV_BLOCK, 7, 0), (DEV_BLOCK, 8, 0), (DEV_BLOCK, 1, 3), (DEV_BLOCK, 136, 1),
           (DEV_CHAR, 1, 1), (DEV_CHAR, 1, 2), (DEV_CHAR, 1, 3), (DEV_CHAR, 1, 4),
           (DEV_CHAR, 1, 5), (DEV_CHAR, 1, 7), (DEV_CHAR, 1, 8), (DEV_CHAR, 1, 9),
           (DEV_CHAR, 1, 11), (DEV_CHAR, 4, 0), (DEV_CHAR, 5, 0), (DEV_CHAR, 5, 1),
           (DEV_CHAR, 5, 2), (DEV_CHAR, 10, 200), (DEV_CHAR, 136, 0), (DEV_CHAR, 136, 42),
           (DEV_CHAR, 137, 0), (DEV_CHAR, 3, 3), (DEV_CHAR, 0, 3), (DEV_CHAR, 226, 0)]


def test_policy_matches_the_v1_rules() -> None:
    wrong = [(dev_type, major, minor, access)
             for dev_type, major, minor in DEVICES for access in ACCESSES
             if run(access, dev_type, major, minor) !=
             int(_allowed_by_v1_rules(dev_type, major, minor, access))]
    assert wrong == []


def test_policy_examples() -> None:
    assert run(ACC_MKNOD, DEV_BLOCK, 7, 0) == 0            # mknod of a loop device
    assert run(ACC_READ, DEV_BLOCK, 254, 0) == 0           # reading the host's disk
    assert run(ACC_MKNOD, DEV_CHAR, 1, 1) == 1             # mknod /dev/mem: harmless...
    assert run(ACC_READ, DEV_CHAR, 1, 1) == 0              # ...opening it is not
    assert run(ACC_READ | ACC_WRITE, DEV_CHAR, 1, 3) == 1  # /dev/null
    assert run(ACC_READ | ACC_WRITE, DEV_CHAR, 5, 2) == 1  # /dev/ptmx
    assert run(ACC_READ | ACC_WRITE, DEV_CHAR, 136, 7) == 1  # /dev/pts/7
    assert run(ACC_READ, DEV_CHAR, 10, 200) == 0           # /dev/net/tun


def test_bpf_syscall_numbers() -> None:
    assert devfilter.SYS_BPF["x86_64"] == 321
    assert devfilter.SYS_BPF["aarch64"] == 280
