#!/usr/bin/env python3
"""How much code a transaction runs through, from a callgrind profile.

Usage: footprint.py CALLGRIND_OUT TRANSACTIONS [BINARY_NAME] [TOP]

The profile must be taken with `--dump-instr=yes` (and `--cache-sim=yes` for the I1
figure); `scripts/footprint.sh` takes one. Reports, per transaction:
  - instructions executed;
  - hot instructions: distinct instructions executed at least 0.3 times a transaction;
  - hot code lines: the distinct 64-byte cache lines holding them, and their 4 KiB pages;
  - simulated I1 misses (a 32 KiB L1 instruction cache, the process alone).
On a pooler sharing its cores with PostgreSQL and the clients, every transaction finds
its code evicted, so its user time grows with the hot lines, not with the instructions
(docs/BENCHMARKS.md, seventh session): compare builds by hot lines.
"""
import collections
import re
import sys

HOT = 0.3  # executions per transaction


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    path, ntx = sys.argv[1], int(sys.argv[2])
    binary = sys.argv[3] if len(sys.argv) > 3 else "pgshield"
    top = int(sys.argv[4]) if len(sys.argv) > 4 else 25

    # Compressed names: "(12) name" defines id 12, "(12)" refers to it. Objects, files and
    # functions are numbered separately.
    kinds = {"ob": "ob", "cob": "ob", "fn": "fn", "cfn": "fn"}
    names = {"ob": {}, "fl": {}, "fn": {}}

    def name(key, spec):
        table = names[kinds.get(key, "fl")]
        m = re.match(r"\((\d+)\)(?: (.*))?", spec)
        if not m:
            return spec
        if m.group(2) is not None:
            table[m.group(1)] = m.group(2)
        return table.get(m.group(1), m.group(1))

    events, obj, fn, addr, after_calls = [], None, None, 0, False
    ir = collections.Counter()
    i1 = collections.Counter()
    fn_of = {}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("events:"):
                events = line.split()[1:]
                continue
            if line.startswith("positions:") and "instr" not in line:
                sys.exit("the profile has no instruction addresses: take it with --dump-instr=yes")
            key, _, value = line.partition("=")
            if key == "ob":
                obj = name(key, value)
                continue
            if key == "fn":
                fn = name(key, value)
                continue
            if key in ("cob", "cfn", "cfi", "cfl", "fl", "fi", "fe"):
                name(key, value)
                continue
            if key == "calls":
                after_calls = True  # the next cost line is the call's inclusive cost
                continue
            if not line or not (line[0].isdigit() or line[0] in "+-*"):
                continue
            parts = line.split()
            a = parts[0]
            if a.startswith("0x"):
                addr = int(a, 16)
            elif a[0] in "+-":
                step = int(a[1:], 0) if a[1:].startswith("0x") else int(a[1:])
                addr += step if a[0] == "+" else -step
            elif a != "*":
                addr = int(a)
            if after_calls:
                after_calls = False
                continue
            costs = [int(c) for c in parts[2:]]
            spot = (obj, addr)
            ir[spot] += costs[0] if costs else 0
            if "I1mr" in events and len(costs) > events.index("I1mr"):
                i1[spot] += costs[events.index("I1mr")]
            fn_of[spot] = fn

    hot = [spot for spot, n in ir.items() if n / ntx >= HOT]
    lines = {(o, a // 64) for o, a in hot}
    pages = {(o, a // 4096) for o, a in hot}
    own = {(o, l) for o, l in lines if o and binary in o}
    print(f"instructions per transaction  {sum(ir.values()) / ntx:10.0f}")
    print(f"hot instructions              {len(hot):10d}")
    print(f"hot code lines (64 B)         {len(lines):10d}  ({len(own)} in {binary})")
    print(f"hot code pages (4 KiB)        {len(pages):10d}")
    if i1:
        print(f"I1 misses per transaction     {sum(i1.values()) / ntx:10.1f}")
    by_fn = collections.defaultdict(set)
    for o, a in hot:
        by_fn[fn_of[(o, a)]].add(a // 64)
    if top == 0:
        return
    print(f"\nhot lines by function (top {top}):")
    for fname, fl in sorted(by_fn.items(), key=lambda kv: -len(kv[1]))[:top]:
        print(f"{len(fl):6d}  {fname[:110]}")


if __name__ == "__main__":
    main()
