#!/usr/bin/env python3
"""Side-by-side load benchmark: edgecache vs nginx proxy_cache vs Varnish, in one run.

Every server gets the same single worker pinned to CPU 0; the origin and the load generator
(oha, and wrk as a second client for the small hits, where one core of oha is the bottleneck)
share CPU 1. Beside the three caches, "ceiling" is a bare hyper server answering the same bytes
from memory (examples/ceiling.rs): the most a hyper-based server gets on this core. Each case
runs after a warm-up that fills every cache, in several interleaved rounds; every figure
printed is the median of the rounds. Speed only counts as a ratio measured here, side by side:
absolute numbers from a shared machine mean little.

Run from the repository root (as root, so missing packages can be installed):
    python3 benches/load/bench.py            # BENCH_SECONDS=8 BENCH_ROUNDS=3 by default
    BENCH_PROFILE=1 python3 benches/load/bench.py   # also: perf profile of edgecache's 1 KiB hits
    BENCH_BASELINE=/path/to/old/edgecache python3 benches/load/bench.py
        # also an earlier build of edgecache ("baseline") in every hit, TLS and miss case: a
        # before/after ratio measured side by side, in one run
    BENCH_ONLY=css python3 benches/load/bench.py   # only the compression cases
    BENCH_ONLY=fleet python3 benches/load/bench.py # only the three-node fleet case
    BENCH_ONLY=idle python3 benches/load/bench.py  # only the idle-connection memory case
It stops only the processes it started.
"""

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNS = int(os.environ.get("BENCH_CONNECTIONS", "64"))
# Run only the cases whose name contains this (e.g. "h2", "miss", "tls").
ONLY = os.environ.get("BENCH_ONLY", "")
PROFILE = os.environ.get("BENCH_PROFILE", "") not in ("", "0")
BASELINE = os.environ.get("BENCH_BASELINE", "")
# Offered load of the fixed-rate latency cases (requests/s, all servers alike): below what the
# slowest server sustains, so every server sees the same load and the client is not saturated.
RATE = int(os.environ.get("BENCH_RATE", "20000"))
MISS_REQUESTS = 100_000
# The idle-connection case: this many kept-alive connections, each after one 1 KiB hit, held
# open while the server's resident memory is read (plain HTTP/1.1, and over TLS 1.3).
IDLE_CONNS = int(os.environ.get("BENCH_IDLE_CONNECTIONS", "5000"))
IDLE_TLS_CONNS = int(os.environ.get("BENCH_IDLE_TLS_CONNECTIONS", "3000"))
# oha starts one runtime thread per physical core whatever its CPU affinity; pinned to one CPU,
# two busy threads then take turns by scheduler slices and about 5% of requests wait one slice
# (a 4 ms mode in the latency histogram, seen against every server that outruns oha).
OHA_THREADS = ("--worker-threads", "1")
SERVER_CPU, CLIENT_CPU = "0", "1"
SIZES = [("1k", 1 << 10), ("16k", 16 << 10), ("256k", 256 << 10), ("1m", 1 << 20)]
CSS_SIZE = 16 << 10
# oha's request header for the compression cases, by client name.
ENCODINGS = {"oha-br": "br", "oha-gzip": "gzip"}
PORTS = {
    "origin": 18000,
    "edgecache": 18080, "edgecache-tls": 18443, "edgecache-admin": 18090,
    "nginx": 18081, "nginx-tls": 18444,
    "varnish": 18082, "varnish-admin": 18083,
    "ceiling": 18084, "ceiling-h2": 18085,
    "baseline": 18086, "baseline-tls": 18445,
    # The fleet case: three nodes of one fleet (static peers) on the server core.
    "fleet-a": 18087, "fleet-b": 18088, "fleet-c": 18089,
}
FLEET = ("fleet-a", "fleet-b", "fleet-c")
PEER_PORTS = {"fleet-a": 18187, "fleet-b": 18188, "fleet-c": 18189}
HOST = "bench.test"
NGINX_CACHE = "/dev/shm/edgecache-bench-nginx"
# Part of every miss URL, so that no run finds what an earlier one stored.
RUN_ID = str(time.time_ns())
CLK_TCK = os.sysconf("SC_CLK_TCK")
started = []
# How each server was started, so that the idle case can start it afresh.
SPAWNED = {}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def need(cmd, install):
    if shutil.which(cmd):
        return
    log(f"installing {cmd} ...")
    install()
    if not shutil.which(cmd) and not os.path.exists(os.path.expanduser(f"~/.cargo/bin/{cmd}")):
        sys.exit(f"{cmd} is not available")


def apt(*pkgs):
    def go():
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *pkgs], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return go


def setup_tools():
    need("nginx", apt("nginx-light"))
    need("varnishd", apt("varnish"))
    need("wrk", apt("wrk"))
    need("openssl", apt("openssl"))
    os.environ["PATH"] = os.path.expanduser("~/.cargo/bin") + ":" + os.environ["PATH"]
    need("oha", lambda: subprocess.run(["cargo", "install", "oha", "--locked"], check=True))
    if PROFILE:
        need("perf", apt("linux-perf"))
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "edgecache", "--example", "ceiling"],
                   cwd=ROOT, check=True)


def spawn(name, argv, cpu, env=None, **kw):
    SPAWNED[name] = (argv, cpu, env)
    p = subprocess.Popen(["taskset", "-c", cpu, *argv], env=env, stdout=subprocess.DEVNULL,
                         stderr=open(os.path.join(WORK, f"{name}.err"), "w"), start_new_session=True, **kw)
    started.append((name, p))
    return p


def restart(name, port):
    """Stops a server this script started and starts it again the same way: a fresh process,
    whose memory no earlier case has grown."""
    for i, (n, p) in enumerate(started):
        if n == name and p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    deadline = time.time() + 30
    import socket
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            time.sleep(0.1)
        except OSError:
            break
    argv, cpu, env = SPAWNED[name]
    pid = spawn(name, argv, cpu, env=env).pid
    wait_port(port)
    return pid


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    import socket
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}; see {WORK}/*.err")


def stop_all():
    for name, p in reversed(started):
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for name, p in started:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def tree(pid):
    """pid and all its descendants (the taskset wrapper execs, so pid is the server)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = open(f"/proc/{p}/task/{p}/children").read().split()
        except OSError:
            kids = []
        todo.extend(int(k) for k in kids)
    return out


def cpu_seconds(pid):
    """CPU seconds of a server: its process tree, or the sum over several (a fleet)."""
    if isinstance(pid, list):
        return sum(cpu_seconds(p) for p in pid)
    total = 0
    for p in tree(pid):
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return total / CLK_TCK


def peak_rss_mib(pid):
    total = 0
    for p in tree(pid):
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def rss_kib(pid):
    """Resident memory of a server's process tree now (VmRSS), in KiB."""
    total = 0
    for p in tree(pid):
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def idle_connections(server, pids, n, tls):
    """RSS per idle keep-alive connection: `n` connections each make one 1 KiB hit and stay
    open; the resident memory of a freshly started server before and after, divided by `n`.
    While they are open, the fixed-rate latency run is repeated beside one without them: the
    p99 of the other clients."""
    import resource
    import socket
    import ssl
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 4096)), hard))
    port = PORTS[f"{server}-tls" if tls else server]
    # Memory freed by earlier cases (or by the other idle case) would be reused and hide what
    # the connections cost.
    pid = pids[server] = restart(server, PORTS[server])
    if server != "varnish":
        wait_port(PORTS[f"{server}-tls"])
    ctx = None
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.set_alpn_protocols(["http/1.1"])
    request = f"GET /1k HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    # The object is stored (over TLS too: one key for both schemes) before the measured hits.
    urllib.request.urlopen(url(server, "/1k")).read()
    quiet = measure(server, pid, url(server, "/1k"), client="oha-rate")
    time.sleep(1)
    before = rss_kib(pid)
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port))
            if ctx:
                s = ctx.wrap_socket(s, server_hostname=HOST)
            s.sendall(request)
            got = b""
            while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < 1024:
                chunk = s.recv(65536)
                if not chunk:
                    raise SystemExit(f"{server} closed an idle-case connection")
                got += chunk
            socks.append(s)
        # Idle servers may give memory back after a while (edgecache parks an idle HTTP/1
        # connection within a second).
        time.sleep(3)
        after = rss_kib(pid)
        loaded = measure(server, pid, url(server, "/1k"), client="oha-rate")
        still = rss_kib(pid)
    finally:
        for s in socks:
            s.close()
    return {"conns": n, "kib_per_conn": (after - before) / n, "kib_per_conn_after_load": (still - before) / n,
            "p99_quiet": quiet["p99"], "p99_idle_open": loaded["p99"], "errors": quiet["errors"] + loaded["errors"]}


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def prepare():
    # nginx keeps its cache on tmpfs between runs: start empty, or "misses" would be hits.
    shutil.rmtree(NGINX_CACHE, ignore_errors=True)
    www = os.path.join(WORK, "www")
    os.makedirs(www)
    for name, size in SIZES:
        write(os.path.join(www, name), "x" * size)
    # A stylesheet for the compression cases: compressible as real CSS is.
    css, i = [], 0
    while sum(map(len, css)) < CSS_SIZE:
        css.append(f".rule-{i} {{ margin: {i % 17}px; color: #{(i * 7919) % 0xffffff:06x}; }}\n")
        i += 1
    write(os.path.join(www, "16k.css"), "".join(css)[:CSS_SIZE])
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", f"{WORK}/key.pem", "-out", f"{WORK}/cert.pem", "-days", "2",
                    "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=DNS:{HOST},IP:127.0.0.1"],
                   check=True, capture_output=True)
    common = f"""pid {WORK}/%s.pid;
error_log {WORK}/%s.nginx.log warn;
worker_processes 1;
events {{ worker_connections 8192; multi_accept on; }}
"""
    write(f"{WORK}/origin.conf", (common % ("origin", "origin")) + f"""
http {{
  access_log {WORK}/origin.access.log;
  sendfile on; tcp_nopush on; keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{PORTS['origin']} reuseport backlog=4096;
    root {www};
    default_type application/octet-stream;
    types {{ text/css css; }}
    add_header Cache-Control "public, max-age=3600";
    location /miss/ {{ rewrite ^ /1k break; }}
    location /f1k/ {{ rewrite ^ /1k break; }}
    location /f256k/ {{ rewrite ^ /256k break; }}
    location /cold/ {{ limit_rate 8m; rewrite ^ /1m break; }}
  }}
}}
""")
    write(f"{WORK}/nginx.conf", (common % ("nginx", "nginx")) + f"""
http {{
  access_log off;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 1000000; keepalive_timeout 75s;
  proxy_cache_path {NGINX_CACHE} levels=1:2 keys_zone=c:128m max_size=2g inactive=1h use_temp_path=off;
  upstream origin {{ server 127.0.0.1:{PORTS['origin']}; keepalive 128; }}
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache shared:ssl:10m;
  # Only the compression case's text/css is compressed (nginx compresses per response).
  gzip on; gzip_types text/css; gzip_proxied any; gzip_comp_level 6; gzip_vary on;
  server {{
    listen 127.0.0.1:{PORTS['nginx']} reuseport backlog=4096;
    listen 127.0.0.1:{PORTS['nginx-tls']} ssl http2 reuseport backlog=4096;
    ssl_certificate {WORK}/cert.pem; ssl_certificate_key {WORK}/key.pem;
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_cache c;
      proxy_cache_key $scheme$host$request_uri;
      proxy_cache_valid 200 1h;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 30s;
      proxy_buffers 64 16k;
    }}
  }}
}}
""")
    write(f"{WORK}/default.vcl", f"""vcl 4.1;
backend origin {{ .host = "127.0.0.1"; .port = "{PORTS['origin']}"; }}
""")
    write(f"{WORK}/edgecache.toml", edgecache_toml("edgecache"))
    for name in FLEET:
        write(f"{WORK}/{name}.toml", fleet_toml(name))
    write(f"{WORK}/baseline.toml", edgecache_toml("baseline"))


def edgecache_toml(name):
    return f"""
[server]
http = ["127.0.0.1:{PORTS[name]}"]
https = ["127.0.0.1:{PORTS[name + '-tls']}"]
workers = 1
max_connections = 20000
[[tls.certificates]]
hosts = ["{HOST}", "127.0.0.1"]
cert = "{WORK}/cert.pem"
key = "{WORK}/key.pem"
[cache]
memory = "2GiB"
max_object_size = "4MiB"
[[origins]]
name = "origin"
url = "http://127.0.0.1:{PORTS['origin']}"
max_idle_connections = 128
[[sites]]
hosts = ["{HOST}", "127.0.0.1", "localhost"]
origin = "origin"
"""


def fleet_toml(name):
    peers = ", ".join(f'"127.0.0.1:{PEER_PORTS[n]}"' for n in FLEET)
    return f"""
[server]
http = ["127.0.0.1:{PORTS[name]}"]
workers = 1
max_connections = 20000
[cache]
memory = "2GiB"
max_object_size = "4MiB"
[[origins]]
name = "origin"
url = "http://127.0.0.1:{PORTS['origin']}"
max_idle_connections = 128
[[sites]]
hosts = ["{HOST}", "127.0.0.1", "localhost"]
origin = "origin"
[cluster]
name = "bench"
node = "{name}"
listen = "127.0.0.1:{PEER_PORTS[name]}"
peers = [{peers}]
"""


def start_servers():
    pids = {}
    spawn("origin", ["nginx", "-c", f"{WORK}/origin.conf", "-g", "daemon off;"], CLIENT_CPU)
    wait_port(PORTS["origin"])
    env = {**os.environ, "RUST_LOG": "warn"}
    pids["edgecache"] = spawn("edgecache", [f"{ROOT}/target/release/edgecache", "run", "--config",
                                            f"{WORK}/edgecache.toml"], SERVER_CPU, env=env).pid
    if BASELINE:
        pids["baseline"] = spawn("baseline", [BASELINE, "run", "--config", f"{WORK}/baseline.toml"], SERVER_CPU,
                                 env=env).pid
        wait_port(PORTS["baseline"])
    pids["nginx"] = spawn("nginx", ["nginx", "-c", f"{WORK}/nginx.conf", "-g", "daemon off;"], SERVER_CPU).pid
    os.makedirs(f"{WORK}/varnish", mode=0o755)
    pids["varnish"] = spawn("varnish", ["varnishd", "-F", "-j", "none", "-n", f"{WORK}/varnish",
                                        "-a", f"127.0.0.1:{PORTS['varnish']}", "-T", f"127.0.0.1:{PORTS['varnish-admin']}",
                                        "-f", f"{WORK}/default.vcl", "-s", "malloc,2G",
                                        "-p", "thread_pools=1", "-p", "thread_pool_min=100",
                                        "-p", "thread_pool_max=2000",
                                        # Idle clients stay, as with nginx's keepalive_timeout 75s.
                                        "-p", "timeout_idle=75"], SERVER_CPU).pid
    pids["ceiling"] = spawn("ceiling", [f"{ROOT}/target/release/examples/ceiling", f"127.0.0.1:{PORTS['ceiling']}",
                                        os.path.join(WORK, "www"), "1"], SERVER_CPU).pid
    # The same bare server speaking HTTP/2 (prior knowledge): what hyper's HTTP/2 gets on this core.
    pids["ceiling-h2"] = spawn("ceiling-h2", [f"{ROOT}/target/release/examples/ceiling",
                                              f"127.0.0.1:{PORTS['ceiling-h2']}", os.path.join(WORK, "www"), "1", "h2"],
                               SERVER_CPU).pid
    fleet = []
    if "fleet" in ONLY or not ONLY:
        for name in FLEET:
            fleet.append(spawn(name, [f"{ROOT}/target/release/edgecache", "run", "--config", f"{WORK}/{name}.toml"],
                               SERVER_CPU, env=env).pid)
        for name in FLEET:
            wait_port(PORTS[name])
        pids["fleet"] = fleet
    for p in ("edgecache", "edgecache-tls", "nginx", "nginx-tls", "varnish", "ceiling", "ceiling-h2"):
        wait_port(PORTS[p])
    return pids


def url(server, path, tls=False, h2=False):
    if server == "fleet":
        # Every request to one member: two thirds of the keys are owned by the other two.
        server = "fleet-a"
    if server == "ceiling" and h2:
        server = "ceiling-h2"
    port = PORTS[f"{server}-tls" if tls else server]
    scheme = "https" if tls else "http"
    return f"{scheme}://127.0.0.1:{port}{path}"


def oha(target, seconds, conns, http2=False, extra=(), count=None):
    """A closed-loop oha run for `seconds`, or for `count` requests when given."""
    span = ["-n", str(count)] if count else ["-z", f"{seconds}s"]
    argv = ["taskset", "-c", CLIENT_CPU, "oha", *OHA_THREADS, "--no-tui", "--output-format", "json", *span,
            "-c", str(conns), "--insecure", *extra]
    if http2:
        argv += ["--http2", "-p", "8"]
    out = subprocess.run([*argv, target], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"oha failed: {out.stderr}")
    j = json.loads(out.stdout)
    s = j.get("summary", {})
    pct = j.get("latencyPercentiles", {})
    # Requests still in flight when the run's time is up are not errors of the server.
    errors = sum(v for k, v in j.get("errorDistribution", {}).items() if "deadline" not in k)
    if errors:
        log(f"  {target}: {j.get('errorDistribution')}")
    codes = j.get("statusCodeDistribution", {})
    bad = sum(v for k, v in codes.items() if not k.startswith("2"))
    rps = s.get("requestsPerSec", 0.0)
    return {"rps": rps, "n": rps * s.get("total", seconds), "p50": pct.get("p50", 0) * 1000,
            "p99": pct.get("p99", 0) * 1000, "p999": pct.get("p99.9", 0) * 1000, "errors": errors + bad}


def wrk(target, seconds, conns):
    """wrk: one thread on the client core; req/s and latency percentiles from its report."""
    out = subprocess.run(["taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency",
                          "-H", "Connection: keep-alive", target], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"wrk failed: {out.stderr}")
    text = out.stdout

    def ms(label):
        m = re.search(rf"^\s*{re.escape(label)}\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if not m:
            return 0.0
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    n_err = int(errors.group(1)) if errors else 0
    if sock:
        n_err += sum(int(x) for x in sock.groups())
    # wrk prints 50/75/90/99%; its p99.9 is not reported.
    return {"rps": float(rps.group(1)) if rps else 0.0, "p50": ms("50%"), "p99": ms("99%"), "p999": 0.0,
            "errors": n_err}


def measure(server, pid, target, http2=False, extra=(), seconds=None, client="oha", count=None):
    before = cpu_seconds(pid)
    if client == "wrk":
        r = wrk(target, seconds or SECONDS, CONNS)
        r["n"] = r["rps"] * (seconds or SECONDS)
    elif client == "oha-rate":
        r = oha(target, seconds or SECONDS, CONNS, http2, ("-q", str(RATE), "--latency-correction", *extra))
    elif client == "oha-rand":
        r = oha(target, seconds or SECONDS, CONNS, http2, ("--rand-regex-url", *extra), count)
    elif client in ENCODINGS:
        # oha sends `Accept-Encoding: gzip, compress, deflate, br` and decodes unless told
        # not to: the field is ours, and the bodies are counted, not decoded.
        ae = ("--disable-compression", "-H", f"Accept-Encoding: {ENCODINGS[client]}")
        r = oha(target, seconds or SECONDS, CONNS, http2, (*ae, *extra), count)
    elif client == "oha-newconn":
        # A new connection, and so a full TLS 1.3 handshake, for every request.
        r = oha(target, seconds or SECONDS, CONNS, http2, ("--disable-keepalive", *extra), count)
    elif client == "oha-identity":
        ae = ("--disable-compression",)
        r = oha(target, seconds or SECONDS, CONNS, http2, (*ae, *extra), count)
    else:
        r = oha(target, seconds or SECONDS, CONNS, http2, extra, count)
    cpu = cpu_seconds(pid) - before
    r["cpu"] = cpu
    r["per_cpu_s"] = r["n"] / cpu if cpu > 0 else 0.0
    return r


def coalescing(server, pid, round_no):
    path = f"/cold/{server}-{round_no}-{time.time_ns()}"
    subprocess.run(["taskset", "-c", CLIENT_CPU, "oha", *OHA_THREADS, "--no-tui", "-n", "1000", "-c", "1000",
                    url(server, path)], capture_output=True)
    time.sleep(0.5)
    with open(f"{WORK}/origin.access.log") as f:
        return sum(1 for line in f if path in line)


def main():
    global WORK
    setup_tools()
    WORK = tempfile.mkdtemp(prefix="edgecache-bench-")
    os.chmod(WORK, 0o755)
    prepare()
    pids = start_servers()
    servers = ["edgecache", "nginx", "varnish"] + (["baseline"] if BASELINE else [])
    hits = servers + ["ceiling"]
    tls_servers = ["edgecache", "nginx"] + (["baseline"] if BASELINE else [])
    # (name, path, tls, h2, servers, client)
    cases = [(f"hit {n} h1", f"/{n}", False, False, hits, "oha") for n, _ in SIZES]
    cases += [(f"hit {n} h1 wrk", f"/{n}", False, False, hits, "wrk") for n in ("1k", "16k")]
    cases += [(f"hit {n} tls1.3 h1", f"/{n}", True, False, tls_servers, "oha") for n in ("1k", "16k", "256k")]
    cases += [(f"hit {n} tls h2", f"/{n}", True, True, tls_servers, "oha") for n in ("1k", "16k")]
    # A TLS 1.3 handshake per request (no keep-alive): what a handshake costs each server.
    cases += [("hit 1k tls1.3 handshake each", "/1k", True, False, tls_servers, "oha-newconn")]
    # HTTP/2 without TLS (prior knowledge) against the bare hyper server: hyper's own HTTP/2
    # cost on this core, beside what edgecache adds to it (nginx serves h2c only on a port of its own).
    cases += [("hit 1k h2c", "/1k", False, True, ["edgecache", "ceiling"], "oha")]
    # Latency at equal load: the closed-loop runs above saturate the client as soon as a
    # server outruns it, so their percentiles include the client's own queueing; here every
    # server gets the same offered rate, with oha's coordinated-omission correction.
    cases += [(f"hit {n} h1 @{RATE // 1000}k/s", f"/{n}", False, False, hits, "oha-rate") for n in ("1k", "16k")]
    # Compression: a 16 KiB stylesheet as identity, br and gzip. edgecache compresses it once
    # at fill time and sends a stored form per hit; nginx compresses per response (gzip on).
    cases += [("css 16k identity", "/16k.css", False, False, ["edgecache"], "oha-identity"),
              ("css 16k br", "/16k.css", False, False, ["edgecache"], "oha-br"),
              ("css 16k gzip", "/16k.css", False, False, ["edgecache", "nginx"], "oha-gzip")]
    # A fleet of three on the server core: random keys among 1,000 at one member, so two
    # thirds are answered through a peer (no hot copies); against one independent node
    # serving the same keys from its own store. Requests per CPU-second of all three.
    cases += [(f"fleet {n}", f"/f{n}/[0-9]{{3}}", False, False, ["fleet", "edgecache"], "oha-rand")
              for n in ("1k", "256k")]
    cases = [c for c in cases if ONLY in c[0]]
    results = {}
    try:
        log("warming up ...")
        for name, path, tls, h2, which, client in cases:
            for s in which:
                if client == "oha-rand":
                    # Every key once, so the measured runs are all hits (through a peer or not).
                    base = path.split("[")[0]
                    for i in range(1000):
                        urllib.request.urlopen(url(s, f"{base}{i:03d}")).read()
                else:
                    oha(url(s, path, tls, h2), 1, 8, h2)
        for rnd in range(ROUNDS):
            log(f"round {rnd + 1}/{ROUNDS}")
            for name, path, tls, h2, which, client in cases:
                order = which[rnd % len(which):] + which[:rnd % len(which)]
                for s in order:
                    pid = pids["ceiling-h2" if s == "ceiling" and h2 else s]
                    r = measure(s, pid, url(s, path, tls, h2), h2, client=client)
                    results.setdefault((name, s), []).append(r)
            for s in servers if ONLY in "miss 100k urls 1k" else []:
                # 100,000 requests drawn from ten million URLs: all but about 0.5% are distinct,
                # whatever the server's speed (a fixed time over a small URL space would let a
                # faster server turn more of its requests into hits).
                target = url(s, f"/miss/{RUN_ID}/{rnd}/") + "[0-9]{7}"
                r = measure(s, pids[s], target, extra=("--rand-regex-url",), count=MISS_REQUESTS)
                results.setdefault(("miss 100k urls 1k", s), []).append(r)
                results.setdefault(("coalesce 1000 cold", s), []).append({"origin_requests": coalescing(s, pids[s], rnd)})
        if ONLY in "idle connections":
            # Once: memory is not noisy the way CPU time is.
            for s in ("edgecache", "nginx", "varnish"):
                results[("idle h1", s)] = [idle_connections(s, pids, IDLE_CONNS, False)]
            for s in ("edgecache", "nginx"):
                results[("idle tls1.3", s)] = [idle_connections(s, pids, IDLE_TLS_CONNS, True)]
        if PROFILE:
            profile(pids["edgecache"])
    finally:
        rss = {s: peak_rss_mib(pids[s]) for s in servers}
        stop_all()
    report(results, rss)


def profile(pid):
    """Where edgecache's CPU goes on 1 KiB hits: perf samples while oha loads it."""
    data = os.path.join(WORK, "perf.data")
    rec = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(pid), "-o", data],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    oha(url("edgecache", "/1k"), SECONDS, CONNS)
    rec.send_signal(signal.SIGINT)
    rec.wait(timeout=60)
    out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,symbol", "--stdio",
                          "--percent-limit", "0.7", "-g", "none"], capture_output=True, text=True)
    lines = [l for l in out.stdout.splitlines() if l.strip() and not l.startswith("#")]
    print("\nperf: edgecache, 1 KiB hits over HTTP/1.1 (self time, symbols over 0.7%):")
    print("\n".join(lines[:45]))


def med(rows, key):
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else 0.0


def report(results, rss):
    names = []
    for (name, _s) in results:
        if name not in names:
            names.append(name)
    print(f"\nedgecache vs nginx proxy_cache vs Varnish: {ROUNDS} rounds x {SECONDS}s, {CONNS} connections, "
          f"servers on CPU {SERVER_CPU} (1 worker), oha on CPU {CLIENT_CPU}; medians. {time.strftime('%Y-%m-%d')}, "
          f"{os.cpu_count()} cores")
    print(f"{'case':<22} {'server':<10} {'req/s':>9} {'req/cpu-s':>10} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'errors':>7}")
    for name in names:
        if name.startswith("coalesce"):
            for s in ("edgecache", "nginx", "varnish", "baseline"):
                rows = results.get((name, s))
                if rows:
                    counts = [r["origin_requests"] for r in rows]
                    print(f"{name:<22} {s:<10} origin requests per 1000 cold requests: {counts}")
            continue
        for s in ("edgecache", "nginx", "varnish", "ceiling", "baseline", "fleet"):
            rows = results.get((name, s))
            if not rows:
                continue
            print(f"{name:<22} {s:<10} {med(rows, 'rps'):>9.0f} {med(rows, 'per_cpu_s'):>10.0f} {med(rows, 'p50'):>8.2f} "
                  f"{med(rows, 'p99'):>8.2f} {med(rows, 'p999'):>9.2f} {int(med(rows, 'errors')):>7}")
        ec = results.get((name, "edgecache"))
        for peer in ("nginx", "varnish", "ceiling", "baseline"):
            pr = results.get((name, peer))
            if ec and pr and med(pr, "rps") > 0:
                print(f"{'':<22} edgecache/{peer}: req/s x{med(ec, 'rps') / med(pr, 'rps'):.2f}, "
                      f"req/cpu-s x{med(ec, 'per_cpu_s') / max(med(pr, 'per_cpu_s'), 1e-9):.2f}, "
                      f"p99 x{med(ec, 'p99') / max(med(pr, 'p99'), 1e-9):.2f}")
    for n in ("1k", "256k"):
        fl, ind = results.get((f"fleet {n}", "fleet")), results.get((f"fleet {n}", "edgecache"))
        if fl and ind:
            print(f"fleet {n}: three members (2/3 through a peer) / one independent node: "
                  f"req/cpu-s x{med(fl, 'per_cpu_s') / max(med(ind, 'per_cpu_s'), 1e-9):.2f}, "
                  f"p50 {med(fl, 'p50'):.2f} vs {med(ind, 'p50'):.2f} ms")
    for name in ("idle h1", "idle tls1.3"):
        for s in ("edgecache", "nginx", "varnish"):
            r = (results.get((name, s)) or [None])[0]
            if r:
                print(f"{name:<12} {s:<10} {r['conns']} idle connections: {r['kib_per_conn']:.2f} KiB each "
                      f"({r['kib_per_conn_after_load']:.2f} after a load run beside them); other clients' p99 "
                      f"{r['p99_quiet']:.2f} ms without them, {r['p99_idle_open']:.2f} ms with them; errors {r['errors']}")
    ident, br = results.get(("css 16k identity", "edgecache")), results.get(("css 16k br", "edgecache"))
    if ident and br:
        print(f"edgecache css 16k br/identity: req/cpu-s x{med(br, 'per_cpu_s') / max(med(ident, 'per_cpu_s'), 1e-9):.2f}")
    print("peak RSS MiB: " + ", ".join(f"{s} {v:.0f}" for s, v in rss.items()))


if __name__ == "__main__":
    WORK = ""
    try:
        main()
    except KeyboardInterrupt:
        stop_all()
