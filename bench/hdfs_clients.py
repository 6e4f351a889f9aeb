#!/usr/bin/env python3
"""Compare two Python HDFS clients on the local cluster (deploy/hdfs.sh).

Clients:
  * ``hdfs`` (HdfsCLI) over WebHDFS: ``hdfs.InsecureClient``
  * ``hdfs-native`` (Rust, native RPC + data-transfer protocol): ``hdfs_native.Client``

Sections (all files replication 3, records/files of 0.5 MiB):
  a. N create+write+close with 1, 4 and 16 writer threads
  b. N records appended to ONE file, durable after each record
  c. 1 GiB sequential read; N random 0.5 MiB range reads
  d. DataNode 2 killed (SIGKILL) after ~20 of 100 file writes: which writes fail,
     how, how long calls take, does everything acknowledged read back byte-exact;
     reading files whose replicas include the dead node
  e. visibility of a file still open for writing (hdfs-native writer)
  f. the archive's range reads (8 MiB at a time, as a retrieve reads spans of a
     pack) of a 256 MiB file, sealed and still open: hdfs-native, WebHDFS, and
     pacs.storage.datanode (straight from a DataNode, no CRCs): MiB/s and CPU
     of the client and of the DataNodes (from PACS_STACK_DIR's pid files)
  g. the archive's appends to a pack (1,000 of 8,600 bytes, 300 of 0.5 MiB,
     each hsync'ed before the next): hdfs-native's writer against
     pacs.storage.hdfswriter, alternating; records/s, CPU of the client, the
     DataNodes and the NameNode per record

Usage:  .venv/bin/python bench/hdfs_clients.py [--sections abcdefg] [--n 300]
Reads PACS_HDFS_URL (hdfs://127.0.0.1:19000), PACS_HDFS_WEBHDFS_URL
(http://127.0.0.1:19870); section d runs deploy/hdfs.sh with the current
environment (so PACS_STACK_DIR / port overrides apply to it too).
Section d kills and restarts DataNode 2: do not run it against a cluster
someone else is testing on.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

os.environ["RUST_BACKTRACE"] = "0"  # hdfs-native panics print a long backtrace otherwise

import hdfs  # HdfsCLI (WebHDFS)
import hdfs_native
from hdfs_native import WriteOptions

from pacs import devstack

REPO = Path(__file__).resolve().parents[1]
HDFS_SH = REPO / "deploy" / "hdfs.sh"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
REC = 512 * KiB
BASE_DIR = "/bench-hdfs-clients"
CALL_TIMEOUT = 120.0  # watchdog for single calls in section d / e

HDFS_URL = os.environ.get("PACS_HDFS_URL", "hdfs://127.0.0.1:19000")
WEBHDFS_URL = os.environ.get("PACS_HDFS_WEBHDFS_URL", "http://127.0.0.1:19870")

# hdfs-native reads no Hadoop config unless given one; best-effort mirrors the
# cluster's hdfs-site.xml (with 3 DataNodes and one dead there is no
# replacement node, so "best effort" means: keep writing on the survivors).
NATIVE_BEST_EFFORT = {"dfs.client.block.write.replace-datanode-on-failure.best-effort": "true"}

OUT_LINES: list[str] = []
HUNG: list[dict] = []  # calls that outlived the watchdog: checked again later


def out(line: str = "") -> None:
    print(line, flush=True)
    OUT_LINES.append(line)


def payload(i: int, size: int = REC, _base: dict = {}) -> bytes:
    """Deterministic, distinct content per index (first 16 bytes differ)."""
    base = _base.get(size)
    if base is None:
        base = _base[size] = random.Random(size).randbytes(size)
    return struct.pack("<QQ", i, size) + base[16:]


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out(fmt.format(*cells[0]))
    out(fmt.format(*["-" * w for w in widths]))
    for r in cells[1:]:
        out(fmt.format(*r))


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --------------------------------------------------------------- adapters


class Native:
    label = "hdfs-native"

    def __init__(self, config: dict | None = None):
        self.config = dict(config or {})
        self.c = hdfs_native.Client(HDFS_URL, config=self.config)

    def fresh(self) -> "Native":
        return Native(self.config)

    def mkdirs(self, path: str) -> None:
        self.c.mkdirs(path, create_parent=True)

    def delete(self, path: str) -> None:
        try:
            self.c.delete(path, recursive=True)
        except Exception:
            pass

    def write_file(self, path: str, data: bytes) -> None:
        with self.c.create(path, WriteOptions(replication=3, overwrite=True)) as w:
            w.write(data)

    def read_file(self, path: str) -> bytes:
        r = self.c.read(path)
        try:
            return r.read()
        finally:
            r.close()

    def read_range(self, path: str, off: int, n: int) -> bytes:
        r = self.c.read(path)
        try:
            return r.read_range(off, n)
        finally:
            r.close()

    def seq_read(self, path: str, chunk: int = 8 * MiB) -> int:
        r = self.c.read(path)
        total = 0
        try:
            while True:
                b = r.read(chunk)
                if not b:
                    return total
                total += len(b)
        finally:
            r.close()

    def length(self, path: str) -> int:
        return self.c.get_file_info(path).length


class Web:
    label = "hdfs (WebHDFS)"

    def __init__(self):
        self.c = hdfs.InsecureClient(WEBHDFS_URL, user="root")

    def fresh(self) -> "Web":
        return Web()

    def mkdirs(self, path: str) -> None:
        self.c.makedirs(path)

    def delete(self, path: str) -> None:
        try:
            self.c.delete(path, recursive=True)
        except Exception:
            pass

    def write_file(self, path: str, data: bytes) -> None:
        self.c.write(path, data=data, overwrite=True, replication=3)

    def append(self, path: str, data: bytes) -> None:
        self.c.write(path, data=data, append=True)

    def read_file(self, path: str) -> bytes:
        with self.c.read(path) as r:
            return r.read()

    def read_range(self, path: str, off: int, n: int) -> bytes:
        with self.c.read(path, offset=off, length=n) as r:
            return r.read()

    def seq_read(self, path: str, chunk: int = 8 * MiB) -> int:
        total = 0
        with self.c.read(path, chunk_size=chunk) as r:
            for b in r:
                total += len(b)
        return total

    def length(self, path: str) -> int:
        return self.c.status(path)["length"]


def webhdfs_json(path: str, op: str) -> dict:
    with urllib.request.urlopen(f"{WEBHDFS_URL}/webhdfs/v1{path}?op={op}&user.name=root", timeout=30) as r:
        return json.load(r)


def replica_names(path: str) -> list[list[str]]:
    locs = webhdfs_json(path, "GETFILEBLOCKLOCATIONS")["BlockLocations"]["BlockLocation"]
    return [sorted(b["names"]) for b in locs]


def nn_state() -> dict:
    return devstack.namenode_bean("FSNamesystemState", WEBHDFS_URL)


def dn_data_port(n: int) -> int:
    base = int(os.environ.get("PACS_HDFS_DN_DATA_PORT", "19866"))
    return base + (n - 1) * int(os.environ.get("PACS_HDFS_DN_PORT_STRIDE", "10"))


def hdfs_sh(*args: str) -> float:
    t = time.monotonic()
    subprocess.run([str(HDFS_SH), *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.monotonic() - t


def wait_all_live(timeout: float = 120) -> None:
    hdfs_sh("start-datanode", "2")  # no-op when running
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = nn_state()
        if s["NumLiveDataNodes"] == 3 and s["NumDeadDataNodes"] == 0 and s.get("NumStaleDataNodes", 0) == 0:
            return
        time.sleep(0.5)
    raise RuntimeError(f"cluster not back to 3 live DataNodes: {nn_state()}")


def call_with_timeout(fn, *args, timeout: float = CALL_TIMEOUT):
    """Run fn in a throwaway thread; returns (ok, result_or_exc, seconds).
    A call that outlives the timeout is reported as hung (thread left behind)."""
    box: dict = {}

    def run():
        try:
            box["r"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - we report every failure
            box["e"] = e

    t0 = time.monotonic()
    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout)
    dt = time.monotonic() - t0
    if th.is_alive():
        HUNG.append({"what": getattr(fn, "__name__", str(fn)), "thread": th, "box": box, "t0": t0})
        return False, TimeoutError(f"call still running after {timeout:.0f}s (hung)"), dt
    if "e" in box:
        return False, box["e"], dt
    return True, box.get("r"), dt


def exc_str(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__module__}.{type(e).__name__}: {msg[:160]}"


# --------------------------------------------------------------- sections


def section_a(n: int, thread_counts: list[int]) -> None:
    out(f"== (a) {n} x create+write+close of 0.5 MiB files, replication 3, one client per thread")
    rows = []
    for make in (Native, Web):
        for threads in thread_counts:
            proto = make()
            d = f"{BASE_DIR}/a/{proto.label.split()[0]}-{threads}"
            proto.delete(d)
            proto.mkdirs(d)
            lat: list[float] = []
            errors: list[str] = []
            lock = threading.Lock()
            next_i = iter(range(n))

            def worker():
                cl = proto.fresh()
                while True:
                    with lock:
                        i = next(next_i, None)
                    if i is None:
                        return
                    data = payload(i)
                    t = time.perf_counter()
                    try:
                        cl.write_file(f"{d}/f{i:05d}", data)
                    except Exception as e:  # noqa: BLE001
                        with lock:
                            errors.append(exc_str(e))
                        continue
                    dt = time.perf_counter() - t
                    with lock:
                        lat.append(dt)

            la0 = loadavg()
            t0 = time.perf_counter()
            ths = [threading.Thread(target=worker) for _ in range(threads)]
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            wall = time.perf_counter() - t0
            ok = len(lat)
            # spot-check content
            for i in random.Random(threads).sample(range(n), 5):
                assert proto.read_file(f"{d}/f{i:05d}") == payload(i), f"content mismatch {d}/f{i}"
            rows.append([
                proto.label, threads, ok, len(errors), f"{ok / wall:.1f}", f"{ok * REC / MiB / wall:.1f}",
                f"{pct(lat, 50) * 1000:.0f}", f"{pct(lat, 99) * 1000:.0f}", f"{wall:.1f}", la0,
            ])
            if errors:
                out(f"   errors ({proto.label}, {threads} threads): {errors[:3]}")
            proto.delete(d)
    table(["client", "threads", "ok", "err", "files/s", "MiB/s", "p50 ms", "p99 ms", "wall s", "loadavg before"], rows)
    out()


def section_b(n: int) -> None:
    out(f"== (b) {n} x 0.5 MiB records appended to ONE file, durable after each record")
    rows = []
    nat = Native()
    web = Web()
    nat.mkdirs(f"{BASE_DIR}/b")
    expected = b"".join(payload(i) for i in range(n))

    # hdfs-native: one open writer, write + hsync per record
    p = f"{BASE_DIR}/b/native-hsync"
    lat = []
    t0 = time.perf_counter()
    w = nat.c.create(p, WriteOptions(replication=3, overwrite=True))
    for i in range(n):
        t = time.perf_counter()
        w.write(payload(i))
        w.hsync()
        lat.append(time.perf_counter() - t)
    w.close()
    wall = time.perf_counter() - t0
    ok = nat.read_file(p) == expected
    rows.append(["hdfs-native", "create; (write+hsync) x N; close", n, f"{n / wall:.1f}", f"{n * REC / MiB / wall:.1f}",
                 f"{pct(lat, 50) * 1000:.1f}", f"{pct(lat, 99) * 1000:.1f}", ok])

    # hdfs-native: append() + write + close per record (same shape as WebHDFS APPEND)
    p = f"{BASE_DIR}/b/native-append-close"
    nat.c.create(p, WriteOptions(replication=3, overwrite=True)).close()
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        with nat.c.append(p) as w:
            w.write(payload(i))
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    ok = nat.read_file(p) == expected
    rows.append(["hdfs-native", "(append+write+close) x N", n, f"{n / wall:.1f}", f"{n * REC / MiB / wall:.1f}",
                 f"{pct(lat, 50) * 1000:.1f}", f"{pct(lat, 99) * 1000:.1f}", ok])

    # WebHDFS: op=APPEND per record
    p = f"{BASE_DIR}/b/webhdfs-append"
    web.c.write(p, data=b"", overwrite=True, replication=3)
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        web.append(p, payload(i))
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    ok = web.read_file(p) == expected
    rows.append(["hdfs (WebHDFS)", "op=APPEND x N", n, f"{n / wall:.1f}", f"{n * REC / MiB / wall:.1f}",
                 f"{pct(lat, 50) * 1000:.1f}", f"{pct(lat, 99) * 1000:.1f}", ok])
    table(["client", "pattern", "records", "records/s", "MiB/s", "p50 ms", "p99 ms", "byte-exact"], rows)
    nat.delete(f"{BASE_DIR}/b")
    out()


def big_chunk(k: int, _cache: dict = {}) -> bytes:
    base = _cache.get("b")
    if base is None:
        base = _cache["b"] = random.Random(7).randbytes(MiB)
    return struct.pack("<Q", k) + base[8:]


def big_expected(off: int, n: int) -> bytes:
    parts = []
    k = off // MiB
    while sum(map(len, parts)) < n + (off % MiB):
        parts.append(big_chunk(k))
        k += 1
    blob = b"".join(parts)
    s = off % MiB
    return blob[s:s + n]


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def section_c(n: int, size: int = GiB) -> None:
    out(f"== (c) sequential read of one {size // MiB} MiB file; {n} random 0.5 MiB range reads")
    nat, web = Native(), Web()
    p = f"{BASE_DIR}/c/big"
    nat.delete(f"{BASE_DIR}/c")
    nat.mkdirs(f"{BASE_DIR}/c")
    t0 = time.perf_counter()
    with nat.c.create(p, WriteOptions(replication=3, overwrite=True)) as w:
        for k in range(size // MiB):
            w.write(big_chunk(k))
    wt = time.perf_counter() - t0
    out(f"   (setup) hdfs-native sequential write of {size // MiB} MiB, replication 3: {wt:.1f} s = {size / MiB / wt:.1f} MiB/s")
    rows = []
    for cl in (nat, web):
        for cache in ("cold", "warm"):
            if cache == "cold" and not drop_caches():
                continue
            t0 = time.perf_counter()
            got = cl.seq_read(p)
            dt = time.perf_counter() - t0
            assert got == size, (got, size)
            rows.append([cl.label, f"sequential read ({cache} page cache)", 1, f"{size / MiB / dt:.1f}", "-", f"{dt:.2f}"])
    rnd = random.Random(42)
    offsets = [rnd.randrange(0, size - REC) for _ in range(n)]
    for cl, how in ((nat, "open + read_range + close per op"), (nat, "one open reader, read_range per op"),
                    (web, "op=OPEN&offset&length per op")):
        if how.startswith("one open"):
            r = nat.c.read(p)
            fn = lambda off: r.read_range(off, REC)  # noqa: E731
        else:
            fn = lambda off, cl=cl: cl.read_range(p, off, REC)  # noqa: E731
        lat = []
        bad = 0
        for off in offsets:
            t = time.perf_counter()
            b = fn(off)
            lat.append(time.perf_counter() - t)
            bad += b != big_expected(off, REC)
        if how.startswith("one open"):
            r.close()
        busy = sum(lat)
        rows.append([cl.label, f"random 0.5 MiB reads: {how}", n, f"{n * REC / MiB / busy:.1f}",
                     f"{n / busy:.0f} (p50 {pct(lat, 50) * 1000:.1f} ms, p99 {pct(lat, 99) * 1000:.1f} ms)",
                     f"{busy:.2f}" + (f"  MISMATCH {bad}" if bad else "")])
    table(["client", "operation", "ops", "MiB/s", "ops/s", "seconds"], rows)
    out("   (random reads: warm page cache; content of every read verified; time excludes verification)")
    nat.delete(f"{BASE_DIR}/c")
    out()


def _native_write_hsync_close(cl: "Native", path: str, data: bytes) -> None:
    w = cl.c.create(path, WriteOptions(replication=3, overwrite=True))
    w.write(data)
    w.hsync()
    w.close()


def section_d(files: int, kill_after: int, pace: float, only: str = "") -> dict:
    out(f"== (d) {files} x 0.5 MiB file writes; DataNode 2 SIGKILLed after {kill_after} files "
        f"(writes paced {pace * 1000:.0f} ms apart so the post-kill writes span ~{(files - kill_after) * pace:.0f} s)")
    out("   NameNode timing on this cluster: DataNode stale after 3 s without heartbeat, dead after ~15 s.")
    out(f"   Each call runs under a {CALL_TIMEOUT:.0f} s watchdog; the first hung call ends that variant's loop.")
    summary = {}
    variants = [
        ("hdfs-native, library defaults: create/write/close", lambda: Native(), lambda c, p, d: c.write_file(p, d)),
        ("hdfs-native, best-effort=true: create/write/close", lambda: Native(NATIVE_BEST_EFFORT),
         lambda c, p, d: c.write_file(p, d)),
        ("hdfs-native, library defaults: create/write/hsync/close", lambda: Native(), _native_write_hsync_close),
        ("hdfs-native, best-effort=true: create/write/hsync/close", lambda: Native(NATIVE_BEST_EFFORT),
         _native_write_hsync_close),
        ("hdfs (WebHDFS): op=CREATE", lambda: Web(), lambda c, p, d: c.write_file(p, d)),
    ]
    for vi, (label, make, op) in enumerate(variants):
        if only and str(vi) not in only:
            continue
        wait_all_live()
        cl = make()
        d = f"{BASE_DIR}/d/v{vi}"
        cl.delete(d)
        cl.mkdirs(d)
        recs = []
        t_kill = None
        hung = False
        for i in range(files):
            if i == kill_after:
                hdfs_sh("stop-datanode", "2", "--kill")
                t_kill = time.monotonic()
            path = f"{d}/f{i:04d}"
            t0 = time.monotonic()
            ok, res, dt = call_with_timeout(op, cl, path, payload(i))
            recs.append({
                "i": i, "path": path, "t": (t0 - t_kill) if t_kill else None, "dt": dt, "ok": ok,
                "err": None if ok else exc_str(res),
            })
            if not ok and isinstance(res, TimeoutError):
                hung = True
                break
            if pace:
                time.sleep(pace)
        t_end = time.monotonic() - t_kill if t_kill else 0.0
        rd = cl if not hung else make()  # a hung call may hold the old client
        acked = [r for r in recs if r["ok"]]
        mismatched, read_err = [], []
        for r in acked:
            ok, res, _ = call_with_timeout(rd.read_file, r["path"], timeout=60)
            if not ok:
                read_err.append((r["i"], exc_str(res)))
            elif res != payload(r["i"]):
                mismatched.append(r["i"])
        leftovers = []  # what a failed write left behind
        for r in recs:
            if not r["ok"]:
                try:
                    n = rd.length(r["path"])
                    ok, res, _ = call_with_timeout(rd.read_file, r["path"], timeout=60)
                    got = (f"{len(res)}B{'=payload' if res == payload(r['i']) else ''}" if ok
                           else type(res).__name__)
                    leftovers.append(f"#{r['i']}:len={n}B,read={got}")
                except Exception as e:  # noqa: BLE001
                    leftovers.append(f"#{r['i']}:{type(e).__name__}")
        reps: dict = {}
        for r in acked:
            try:
                locs = replica_names(r["path"])
                k = len(locs[0]) if locs else 0
            except Exception:  # noqa: BLE001
                k = -1
            reps[k] = reps.get(k, 0) + 1
        pre = [r for r in acked if r["t"] is None]
        pre_read = []
        for r in pre[:10]:
            ok, res, dt = call_with_timeout(rd.read_file, r["path"], timeout=60)
            pre_read.append((ok and res == payload(r["i"]), dt))
        st = nn_state()
        post = [r for r in recs if r["t"] is not None]
        fails = [r for r in post if not r["ok"]]
        out(f"-- [{vi}] {label}")
        out(f"   writes: {len(acked)} ok, {len(recs) - len(acked)} failed{' (loop aborted: HUNG call)' if hung else ''}; "
            f"pre-kill all ok: {all(r['ok'] for r in recs if r['t'] is None)}")
        out("   post-kill call durations in s, in order ('!' = raised/hung): " + " ".join(
            f"{r['dt']:.2f}{'' if r['ok'] else '!'}" for r in post))
        slow = sorted(post, key=lambda r: -r["dt"])[:3]
        out("   slowest post-kill calls: " + ", ".join(
            f"#{r['i']} at t+{r['t']:.1f}s took {r['dt']:.2f}s ({'ok' if r['ok'] else 'FAILED'})" for r in slow))
        if fails:
            out(f"   failures at t+{fails[0]['t']:.2f}s .. t+{fails[-1]['t']:.2f}s after the kill:")
        kinds: dict = {}
        for r in fails:
            kinds.setdefault(r["err"][:150], []).append(f"#{r['i']}@{r['t']:.1f}s/{r['dt']:.2f}s")
        for k, v in kinds.items():
            out(f"     {len(v)} x {k}   [{' '.join(v[:6])}{' ...' if len(v) > 6 else ''}]")
        if leftovers:
            out(f"   failed paths afterwards (NameNode length, bytes a reader gets): {' '.join(leftovers[:12])}")
        out(f"   read-back of acknowledged files: {len(acked) - len(mismatched) - len(read_err)}/{len(acked)} byte-exact, "
            f"{len(mismatched)} mismatched, {len(read_err)} read errors {read_err[:2]}")
        out(f"   replicas per acknowledged file (NameNode view, after the loop): {dict(sorted(reps.items()))}")
        if pre_read:
            out(f"   re-read {len(pre_read)} pre-kill files (replica on dead DN2) after the loop: "
                f"{sum(o for o, _ in pre_read)}/{len(pre_read)} ok, max {max(t for _, t in pre_read):.2f} s")
        out(f"   NameNode after the loop (t+{t_end:.1f}s): live={st['NumLiveDataNodes']} dead={st['NumDeadDataNodes']} "
            f"stale={st.get('NumStaleDataNodes')}")
        summary[label] = {"ok": len(acked), "failed": len(fails), "mismatch": len(mismatched),
                          "read_err": len(read_err), "hung": hung}
        hdfs_sh("start-datanode", "2")
        rd.delete(d)
    out()
    return summary


def section_d3(records: int, kill_after: int, pace: float) -> None:
    out(f"== (d3) ONE long-lived file, {records} x (0.5 MiB record + durable flush); DataNode 2 SIGKILLed after {kill_after} "
        f"records (paced {pace * 1000:.0f} ms)")
    for label in ("hdfs-native write+hsync per record (best-effort=true)", "hdfs (WebHDFS) op=APPEND per record"):
        wait_all_live()
        native = label.startswith("hdfs-native")
        cl = Native(NATIVE_BEST_EFFORT) if native else Web()
        p = f"{BASE_DIR}/d3/{'native' if native else 'web'}"
        cl.delete(f"{BASE_DIR}/d3")
        cl.mkdirs(f"{BASE_DIR}/d3")
        if native:
            w = cl.c.create(p, WriteOptions(replication=3, overwrite=True))

            def rec_op(data, w=w):
                w.write(data)
                w.hsync()
        else:
            cl.c.write(p, data=b"", overwrite=True, replication=3)

            def rec_op(data, cl=cl):
                cl.append(p, data)
        recs = []
        t_kill = None
        hung = False
        for i in range(records):
            if i == kill_after:
                hdfs_sh("stop-datanode", "2", "--kill")
                t_kill = time.monotonic()
            t0 = time.monotonic()
            ok, res, dt = call_with_timeout(rec_op, payload(i))
            recs.append({"i": i, "t": (t0 - t_kill) if t_kill else None, "dt": dt, "ok": ok,
                         "err": None if ok else exc_str(res)})
            if not ok:
                hung = isinstance(res, TimeoutError)
                if native or hung:
                    break  # a native writer that raised is unusable; WebHDFS appends are independent
            if pace:
                time.sleep(pace)
        close_res = "-"
        if native and not hung:
            ok, res, dt = call_with_timeout(w.close, timeout=120)
            close_res = f"close(): {'ok' if ok else exc_str(res)[:120]} in {dt:.2f}s"
        acked = [r for r in recs if r["ok"]]
        rd = Native()
        try:
            n = rd.length(p)
            body = rd.read_file(p)
            prefix = b"".join(payload(r["i"]) for r in acked)
            # WebHDFS appends are independent: the acknowledged ones must all be there, in order
            content = "acknowledged records present in order" if (
                body == prefix if native else _subsequence(body, [payload(r["i"]) for r in acked])) else "MISMATCH"
            state = f"file length {n} B ({n / REC:.2f} records), read {len(body)} B: {content}"
        except Exception as e:  # noqa: BLE001
            state = f"file unreadable: {exc_str(e)[:150]}"
        post = [r for r in recs if r["t"] is not None]
        out(f"-- {label}")
        out(f"   acknowledged {len(acked)}/{len(recs)} attempted{' (HUNG call: loop aborted)' if hung else ''}; {close_res}")
        out("   post-kill call durations (s, '!' = raised/hung): " + " ".join(
            f"{r['dt']:.2f}{'' if r['ok'] else '!'}" for r in post[:40]) + (" ..." if len(post) > 40 else ""))
        for r in [r for r in recs if not r["ok"]][:4]:
            out(f"   FAILED record #{r['i']} at t+{r['t']:.2f}s after {r['dt']:.2f}s: {r['err']}")
        out(f"   {state}")
        if native and (hung or not all(r["ok"] for r in recs)):
            t0 = time.monotonic()
            polls, closed = 0, False
            while not closed and time.monotonic() - t0 < 90:
                ok, res, _ = call_with_timeout(rd.c.recover_lease, p, timeout=60)
                closed = ok and res is True
                polls += 1
                if not closed:
                    time.sleep(1)
            body = rd.read_file(p)
            prefix = b"".join(payload(r["i"]) for r in acked)
            out(f"   other client: recover_lease() -> closed={closed} after {time.monotonic() - t0:.1f} s ({polls} calls); "
                f"then length {rd.length(p)} B, read {len(body)} B, "
                f"{'starts with all acknowledged records' if body[:len(prefix)] == prefix else 'acknowledged records MISSING/CHANGED'}"
                f"{', plus ' + str(len(body) - len(prefix)) + ' B beyond them' if len(body) > len(prefix) else ''}")
        hdfs_sh("start-datanode", "2")
        rd.delete(f"{BASE_DIR}/d3")
    out()


def section_d4(delays: list[float], timeout: float = 30.0) -> None:
    out("== (d4) one hdfs-native write (best-effort=true) started at a fixed time after SIGKILL of DataNode 2;")
    out(f"   fresh cluster state for each row; each step under a {timeout:.0f} s watchdog")
    rows = []
    for mode in ("create/write/close", "create/write/hsync/close"):
        for d in delays:
            wait_all_live()
            cl = Native(NATIVE_BEST_EFFORT)
            cl.mkdirs(f"{BASE_DIR}/d4")
            p = f"{BASE_DIR}/d4/f"
            hdfs_sh("stop-datanode", "2", "--kill")
            t_kill = time.monotonic()
            while time.monotonic() - t_kill < d:
                time.sleep(0.02)
            st = nn_state()
            t_start = time.monotonic() - t_kill
            steps = []
            holder: dict = {}
            ok, res, dt = call_with_timeout(
                lambda: holder.__setitem__("w", cl.c.create(p, WriteOptions(replication=3, overwrite=True))),
                timeout=timeout)
            steps.append(("create", ok, res, dt))
            if ok:
                w = holder["w"]
                todo = [("write", lambda: w.write(payload(0)))]
                if "hsync" in mode:
                    todo.append(("hsync", w.hsync))
                todo.append(("close", w.close))
                for name, fn in todo:
                    ok, res, dt = call_with_timeout(fn, timeout=timeout)
                    steps.append((name, ok, res, dt))
                    if not ok:
                        break
            last = steps[-1]
            outcome = "ok" if last[1] else (f"{last[0]}: " + ("HUNG" if isinstance(last[2], TimeoutError)
                                                              else exc_str(last[2])[:90]))
            rd = Native()
            try:
                after = f"len={rd.length(p)}B read={len(rd.read_file(p))}B"
            except BaseException as e:  # noqa: BLE001
                after = type(e).__name__
            rows.append([mode, f"{t_start:.1f}", f"live={st['NumLiveDataNodes']} stale={st.get('NumStaleDataNodes')}",
                         " ".join(f"{n}:{t:.2f}s" for n, _, _, t in steps), outcome, after])
            hdfs_sh("start-datanode", "2")
            rd.delete(f"{BASE_DIR}/d4")
    table(["pattern", "start t+s", "NameNode view", "step times", "outcome", "path afterwards"], rows)
    out()


def _subsequence(body: bytes, parts: list[bytes]) -> bool:
    pos = 0
    for part in parts:
        j = body.find(part, pos)
        if j < 0:
            return False
        pos = j + len(part)
    return True


def section_d2() -> None:
    out("== (d2) read right after SIGKILL of DataNode 2 (before the NameNode marks it stale), 10 files with a replica on DN2")
    wait_all_live()
    nat, web = Native(), Web()
    d = f"{BASE_DIR}/d2"
    nat.delete(d)
    nat.mkdirs(d)
    paths = []
    for i in range(10):
        p = f"{d}/f{i}"
        nat.write_file(p, payload(i))
        paths.append(p)
    dn2 = f"127.0.0.1:{dn_data_port(2)}"
    on_dn2 = sum(any(dn2 in blk for blk in replica_names(p)) for p in paths)
    hdfs_sh("stop-datanode", "2", "--kill")
    t_kill = time.monotonic()
    rows = []
    for cl in (nat, web):
        for i, p in enumerate(paths):
            t = time.monotonic() - t_kill
            ok, res, dt = call_with_timeout(cl.read_file, p, timeout=60)
            rows.append([cl.label, i, f"{t:.2f}", f"{dt:.3f}",
                         "ok" if ok and res == payload(i) else ("MISMATCH" if ok else exc_str(res)[:110])])
    out(f"   files with a replica on DN2: {on_dn2}/10")
    table(["client", "file", "t since kill s", "read s", "result"], rows)
    hdfs_sh("start-datanode", "2")
    nat.delete(d)
    out()


def section_e() -> None:
    out("== (e) reading a file that is still open for writing (hdfs-native writer)")
    nat = Native()
    webc = Web()
    reader = Native()
    d = f"{BASE_DIR}/e"
    nat.delete(d)
    nat.mkdirs(d)
    p = f"{d}/open"
    rows = []

    def observe(stage: str, written: int) -> None:
        def nat_info():
            return reader.c.get_file_info(p).length

        def nat_reader_size():
            r = reader.c.read(p)
            try:
                return r.size
            finally:
                r.close()

        def nat_read_all():
            b = reader.read_file(p)
            return f"{len(b)} B, prefix-exact={b == b''.join(payload(i) for i in range(written // REC))[:len(b)]}"

        def nat_read_range():
            r = reader.c.read(p)
            try:
                return f"{len(r.read_range(0, written))} B"
            finally:
                r.close()

        def web_status():
            return webc.length(p)

        def web_read():
            b = webc.read_file(p)
            return f"{len(b)} B"

        res = []
        for fn in (nat_info, nat_reader_size, nat_read_all, nat_read_range, web_status, web_read):
            ok, v, _ = call_with_timeout(fn, timeout=60)
            res.append(v if ok else exc_str(v)[:70])
        rows.append([stage, written, *res])

    w = nat.c.create(p, WriteOptions(replication=3, overwrite=True))
    for i in range(3):
        w.write(payload(i))
    observe("3 records written, no hsync", 3 * REC)
    w.hsync()
    observe("after hsync", 3 * REC)
    w.write(payload(3))
    observe("+1 record, no hsync", 4 * REC)
    w.hsync()
    observe("after 2nd hsync", 4 * REC)
    w.close()
    observe("after close", 4 * REC)
    table(["stage", "bytes written", "native get_file_info", "native reader.size", "native read()",
           "native read_range(0, written)", "WebHDFS GETFILESTATUS", "WebHDFS OPEN"], rows)

    # A writer process that dies after hsync without closing: lease recovery.
    p2 = f"{d}/orphan"
    code = (
        "import os, sys, struct, random\n"
        "from hdfs_native import Client, WriteOptions\n"
        f"c = Client({HDFS_URL!r})\n"
        f"w = c.create({p2!r}, WriteOptions(replication=3, overwrite=True))\n"
        f"w.write(b'x' * {2 * REC}); w.hsync(); w.write(b'y' * {REC})\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    lines = []
    lines.append("   writer process exited after write(1 MiB)+hsync+write(0.5 MiB) without close:")
    lines.append(f"     get_file_info.length={reader.c.get_file_info(p2).length} "
                 f"reader.size={reader.c.read(p2).size} read()={len(reader.read_file(p2))} B")
    try:
        nat.c.append(p2).close()
        lines.append("     append() by another client: succeeded (unexpected)")
    except Exception as e:  # noqa: BLE001
        lines.append(f"     append() by another client: {exc_str(e)[:150]}")
    t0 = time.monotonic()
    closed = reader.c.recover_lease(p2)
    polls = 0
    while not closed and time.monotonic() - t0 < 60:
        time.sleep(0.5)
        polls += 1
        closed = reader.c.recover_lease(p2)
    lines.append(f"     recover_lease(): closed={closed} after {time.monotonic() - t0:.1f} s ({polls} re-polls); "
                 f"final length={reader.c.get_file_info(p2).length} "
                 f"(content {'all x' if reader.read_file(p2)[:2 * REC] == b'x' * 2 * REC else 'CHANGED'})")
    for line in lines:
        out(line)
    nat.delete(d)
    out()


def datanode_cpu_s(pattern: str = "dn*.pid") -> float | None:
    """User + system CPU seconds of the DataNodes (or the daemons ``pattern`` names) started by
    deploy/hdfs.sh, if their pid files are here."""
    pids = sorted((Path(os.environ.get("PACS_STACK_DIR", REPO / ".stack")) / "hdfs" / "pids").glob(pattern))
    if not pids:
        return None
    ticks = 0
    for pid_file in pids:
        fields = Path(f"/proc/{pid_file.read_text().strip()}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def section_f(size: int = 256 * MiB, span: int = 8 * MiB, rounds: int = 3) -> None:
    from pacs.storage.datanode import DataNodeReader

    out(f"== (f) {size // MiB} MiB read {span // MiB} MiB at a time, sealed and still open, {rounds} rounds each")
    nat, web, direct = Native(), Web(), DataNodeReader(WEBHDFS_URL)
    folder = f"{BASE_DIR}/f"
    nat.delete(folder)
    nat.mkdirs(folder)
    data = b"".join(big_chunk(k) for k in range(size // MiB))
    sealed, still_open = f"{folder}/sealed", f"{folder}/open"
    nat.write_file(sealed, data)
    writer = nat.c.create(still_open, WriteOptions(replication=3, overwrite=True))
    for start in range(0, size, span):
        writer.write(data[start:start + span])
        writer.hsync()  # as ingest appends: everything hsync'ed, the file not closed
    readers = {
        "hdfs-native": lambda path, off: nat.read_range(path, off, span),
        "WebHDFS": lambda path, off: web.read_range(path, off, span),
        "pacs.storage.datanode": lambda path, off: direct.read(path, off, span),
    }
    rows = []
    for path, state in ((sealed, "sealed"), (still_open, "open")):
        for label, read in readers.items():
            if state == "open" and label == "hdfs-native":
                continue  # it sees none of the block being written (section e)
            for _ in range(rounds):
                dn_before, cpu_before, t0 = datanode_cpu_s(), time.process_time(), time.perf_counter()
                bad = sum(read(path, off) != data[off:off + span] for off in range(0, size, span))
                dt = time.perf_counter() - t0
                cpu = time.process_time() - cpu_before
                dn_after = datanode_cpu_s()
                dn = "-" if dn_before is None else f"{dn_after - dn_before:.2f}"
                rows.append([label, state, f"{size / MiB / dt:.0f}", f"{cpu:.2f}", dn,
                             f"{dt:.2f}" + (f"  MISMATCH {bad}" if bad else "")])
    writer.close()
    table(["client", "file", "MiB/s", "client CPU s", "DataNodes CPU s", "seconds"], rows)
    out("   (warm page cache; every range compared with what was written, inside the timing and the client CPU)")
    nat.delete(folder)
    out()


def section_g(sizes: tuple[int, ...] = (8_600, REC), counts: tuple[int, ...] = (1000, 300), rounds: int = 2) -> None:
    """Appends to one pack, each durable before the next: hdfs-native's writer against the archive's own."""
    from pacs.storage.hdfs import NativeHdfsBlobStore

    out(f"== (g) records appended to one file, each hsync'ed before the next, {rounds} rounds each, alternating")
    folder = f"{BASE_DIR}/g"
    stores = {writer: NativeHdfsBlobStore(HDFS_URL, folder, replication=3, pack_writer=writer)
              for writer in ("native", "pipeline")}
    labels = {"native": "hdfs-native", "pipeline": "pacs.storage.hdfswriter"}
    rows = []
    for size, count in zip(sizes, counts):
        record = payload(0, size)
        for round_ in range(rounds):
            for writer, blobs in stores.items():
                before = (datanode_cpu_s(), datanode_cpu_s("nn.pid"), time.process_time(), time.perf_counter())
                pack = blobs.open_append(f"{writer}-{size}-{round_}.pack")
                for _ in range(count):
                    pack.append([record])
                pack.close()
                dt = time.perf_counter() - before[3]
                cpu = time.process_time() - before[2]
                dn, nn = datanode_cpu_s(), datanode_cpu_s("nn.pid")
                if dn is None or nn is None or before[0] is None or before[1] is None:
                    server = ["-", "-"]
                else:
                    server = [f"{(dn - before[0]) / count * 1e3:.2f}", f"{(nn - before[1]) / count * 1e3:.2f}"]
                body = blobs.read(f"{writer}-{size}-{round_}.pack")
                ok = body == record * count
                rows.append([labels[writer], f"{size:,}", f"{count / dt:.0f}", f"{dt / count * 1e3:.2f}",
                             f"{cpu / count * 1e3:.2f}", *server, "ok" if ok else "MISMATCH"])
    for blobs in stores.values():
        blobs.close()
    table(["writer", "record bytes", "records/s", "ms each", "client CPU ms", "DataNodes CPU ms",
           "NameNode CPU ms", "read back"], rows)
    out("   (CPU per record; the DataNodes' is the three of them together)")
    Native().delete(folder)
    out()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="abcdefg")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--threads", default="1,4,16")
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--d-files", type=int, default=100)
    ap.add_argument("--d-kill-after", type=int, default=20)
    ap.add_argument("--d-pace", type=float, default=0.25)
    ap.add_argument("--d-variants", default="", help="subset of section d variants, e.g. 02")
    ap.add_argument("--out", default="/tmp/hdfs_clients_results.txt")
    a = ap.parse_args()
    st = nn_state()
    out(f"# HDFS client comparison  {time.strftime('%Y-%m-%d %H:%M:%S')}  host cpus={os.cpu_count()}")
    out(f"# cluster {HDFS_URL} / {WEBHDFS_URL}: live DataNodes={st['NumLiveDataNodes']}; "
        f"hdfs {hdfs.__version__}, hdfs-native {importlib.metadata.version('hdfs-native')}")
    out(f"# hdfs-native FileWriter methods: {sorted(m for m in dir(hdfs_native.FileWriter) if not m.startswith('_') and m in ('write', 'hsync', 'hflush', 'flush', 'close'))}"
        " (flush() is io.RawIOBase's no-op; hsync() is the durable flush; no hflush)")
    out()
    Native().mkdirs(BASE_DIR)
    if "a" in a.sections:
        section_a(a.n, [int(x) for x in a.threads.split(",")])
    if "b" in a.sections:
        section_b(a.n)
    if "c" in a.sections:
        section_c(a.n, a.big_mib * MiB)
    if "d" in a.sections:
        section_d(a.d_files, a.d_kill_after, a.d_pace, a.d_variants)
        section_d2()
        section_d3(a.d_files, a.d_kill_after, a.d_pace)
        section_d4([0.5, 4.0, 10.0, 20.0])
    if "e" in a.sections:
        section_e()
    if "f" in a.sections:
        section_f()
    if "g" in a.sections:
        section_g()
    if HUNG:
        out("== calls that outlived the watchdog, checked at the end of the run")
        for h in HUNG:
            state = ("STILL RUNNING" if h["thread"].is_alive() else
                     ("returned" if "e" not in h["box"] else "raised " + exc_str(h["box"]["e"])[:120]))
            out(f"   {h['what']} started {time.monotonic() - h['t0']:.0f} s ago: {state}")
        out()
    Native().delete(BASE_DIR)
    Path(a.out).write_text("\n".join(OUT_LINES) + "\n")
    print(f"(written to {a.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
