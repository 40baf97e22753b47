#!/usr/bin/env python3
"""Keeps a committed fuzz corpus small: the seeds plus the N inputs that add
the most coverage, picked greedily (largest gain first, smaller file on ties).

The one copy for every fuzz crate (policy, gateway, syncer): it reads only
libFuzzer's control file, whatever the target.

Input: the control file of a libFuzzer set-cover merge, which lists every
input with all of its features (a plain `-merge=1` lists only the features
new at that input, which cannot be used for this). From the crate, e.g.
policy/:

    fuzz/target/x86_64-unknown-linux-gnu/release/load -set_cover_merge=1 \
        -use_counters=0 -merge_control_file=/tmp/ctl -rss_limit_mb=2048 \
        /tmp/scratch fuzz/corpus/load /tmp/new-inputs

Then: python3 ../policy/fuzz/scripts/trim_corpus.py /tmp/ctl 300 /tmp/trimmed
and replace the target's corpus (fuzz/corpus/load) with /tmp/trimmed. Files
named `seed-*` are always kept under their names (except empty ones, which
libFuzzer does not list: the crate's `write_seeds` puts them back); the
others are named by their SHA-1, as libFuzzer names them. See
docs/fuzzing.md and docs/tunnel.md, "Fuzzing".
"""

import hashlib
import os
import shutil
import sys


def main() -> None:
    if len(sys.argv) != 4 or not sys.argv[2].isdigit():
        sys.exit("usage: trim_corpus.py CONTROL_FILE N OUT_DIR (see the top of this file)")
    control, keep, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    lines = open(control).read().split("\n")
    count = int(lines[0])
    files = lines[2 : 2 + count]
    features = {}
    for line in lines[2 + count :]:
        parts = line.split()
        if parts and parts[0] == "FT":
            features[int(parts[1])] = set(map(int, parts[2:]))
    seeds = [i for i, f in enumerate(files) if os.path.basename(f).startswith("seed-")]
    covered = set().union(*(features.get(i, set()) for i in seeds))
    left = {i: s - covered for i, s in features.items() if i not in seeds}
    size = {i: os.path.getsize(files[i]) for i in left}
    picked = []
    while left and len(picked) < keep:
        best = max(left, key=lambda i: (len(left[i]), -size[i]))
        gain = left.pop(best)
        if not gain:
            break
        picked.append(best)
        covered |= gain
        for i in left:
            left[i] -= gain
    os.makedirs(out, exist_ok=True)
    names = set()
    for i in seeds + picked:
        data = open(files[i], "rb").read()
        name = os.path.basename(files[i])
        if not name.startswith("seed-"):
            name = hashlib.sha1(data).hexdigest()
        if name not in names:
            names.add(name)
            shutil.copyfile(files[i], os.path.join(out, name))
    total = set().union(*features.values()) if features else set()
    print(f"{len(names)} files ({len(seeds)} seeds), {len(covered)} of {len(total)} features")


if __name__ == "__main__":
    main()
