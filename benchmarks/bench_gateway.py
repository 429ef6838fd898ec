"""Gateway benchmark (issue 3, item 11): a fake upstream directly, then Steward and LiteLLM in front of it.

Run:  .venv/bin/python benchmarks/bench_gateway.py [--duration S] [--quick] [--skip-litellm]
      [--skip-builtin] [--json OUT]

What runs, each in its own process (session) so that nothing shares an event loop or a GIL:

* the upstream: `python -m steward.backends.fake_upstream` (aiohttp + uvloop, microsecond answers),
  one instance for the whole run;
* (a) `direct`: the load generator talks to the upstream itself — the baseline;
* (b) `steward`: `steward serve --config <tmp>.yaml --workers N` (N = 1, 2) routing model `fake` to
  backend `openai` at the upstream; `embedding_model: ""` (no encoder); guards off (nothing
  configured); the audit log on (the default: every request committed to the Merkle log in SQLite
  before its answer), which is the configuration the targets are for. `steward-noaudit` is the same
  with `audit: false`, one worker, to show what the audit commit costs; `steward-guards` is
  `steward` with `guards: true` (the default input/output scanners), one worker, for information.
  Two workers without Redis use the SQL (SQLite) limiter, as `serve` requires for exact limits;
* (c) `litellm`: LiteLLM's proxy (`litellm[proxy]` installed by this script into its own venv,
  default /tmp/steward-bench/litellm-venv, with /work/main/constraints.txt) routing model `fake` to
  `openai/fake-model` at the upstream, `LITELLM_LOCAL_MODEL_COST_MAP=True`, a `master_key` so that it
  checks a key as Steward does, `--num_workers` 1 and 2;
* `steward-builtin`: `steward serve` with the default models (the built-in model and the encoder
  loaded), guards off, audit on, one worker, a short load on model `builtin`, to read the peak
  RSS of a worker with the model loaded (the ≤ 550 MB target). Its req/s is the built-in
  model's generation speed, not gateway overhead, and is shown for information only.

The load generator is Debian's `wrk` (C, one thread, `-t1`), with a Lua script for the POST body, the
`Authorization` header and a machine-readable summary. The body is a small chat completion
(`max_tokens` 16); the streaming variant adds `"stream": true` and
`stream_options.include_usage` (what clients that count tokens send); wrk reads each SSE response to
its end, so a streamed request's latency is the time to its last byte.

Figures, per gateway and stream mode, after a warm-up run that is discarded:

* **req/s** — throughput with 32 connections (closed loop, enough to saturate every target here);
* **added latency p50/p99** — latency percentiles at concurrency 1 (one request at a time: no
  queueing, so this is the per-request time the gateway adds, the "added ~18–24 ms at idle" the issue
  quotes for LiteLLM) minus the upstream's own percentiles measured the same way. wrk times every
  request (microseconds); percentiles are subtracted, which is the usual convention (the p99 of a
  difference is not the difference of p99s, but both paths run against the same upstream). The same
  subtraction at concurrency 8 ("moderate") is printed too; on 2 cores it is mostly queueing behind a
  saturated CPU, i.e. throughput seen as latency, so the targets are checked against the idle figures;
* **CPU ms/req** — user+system CPU of the gateway's process tree during the throughput run, divided
  by the requests served (robust to other load on the machine, unlike req/s);
* **peak RSS** — `VmHWM` from /proc/<pid>/status of the gateway and every descendant (uvicorn's
  workers) after its runs: the largest single process ("per worker") and the sum.

Honesty notes printed with the table: the machine has 2 cores shared by wrk, the gateway and the
upstream (and anything else running; the load average before the run is printed), so the absolute
req/s are lower bounds for a dedicated 2-core box; wrk's own Little's-law consistency is checked
(requests × mean latency ≈ concurrency × duration) and a mismatch is flagged. Every process this script
starts is stopped (process group SIGTERM, then SIGKILL) on exit, on errors and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"
DEFAULT_LITELLM_VENV = Path("/tmp/steward-bench/litellm-venv")
LITELLM_MASTER_KEY = "sk-bench-litellm-master-key"
THROUGHPUT_CONC = 32
MODERATE_CONC = 8
TARGETS = {"added_p50_ms": 3.0, "added_p99_ms": 15.0, "rps": 800.0, "rss_mb_per_worker": 550.0}

BODY: dict[str, Any] = {
    "model": "fake",
    "messages": [{"role": "user", "content": "Say hello to the benchmark, please."}],
    "max_tokens": 16,
}
STREAM_EXTRA: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}

WRK_LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
wrk.body = os.getenv("BENCH_BODY")
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "mean_us": %f, ' ..
    '"max_us": %d, "errors": %d, "status_errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, latency.max, e.connect + e.read + e.write + e.timeout, e.status))
end
"""


class BenchError(RuntimeError):
    """A setup step failed; the message says which and where its log is."""


# ---- processes ----------------------------------------------------------------------------------


class Procs:
    """Every process the benchmark starts, each in its own session so its whole tree can be stopped."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.logdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.logdir
        )
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
        # the group may outlive its leader (uvicorn workers): make sure it is gone
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, *, body: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, urllib.error.URLError):
        return 0


def wait_ready(procs: Procs, name: str, proc: subprocess.Popen[bytes], url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode}:\n{procs.log_tail(name)}")
        if http_status(url) == 200:
            return
        time.sleep(0.25)
    raise BenchError(f"{name} not ready after {timeout_s:.0f} s:\n{procs.log_tail(name)}")


def probe(procs: Procs, name: str, url: str, key: str, body: dict[str, Any]) -> None:
    """One real request through the path under test; a benchmark of error pages is worthless."""
    hdrs = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    status = http_status(url, body=json.dumps(body).encode(), headers=hdrs)
    if status != 200:
        raise BenchError(f"{name}: probe request answered {status}:\n{procs.log_tail(name)}")


# ---- /proc --------------------------------------------------------------------------------------


def descendants(root: int) -> list[int]:
    """`root` and every live descendant (by walking /proc/*/stat parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def peak_rss_mb(pids: list[int]) -> tuple[float, float]:
    """(largest single process's VmHWM, sum of VmHWM) in MB."""
    values = []
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    values.append(int(line.split()[1]) / 1024)
        except OSError:
            continue
    return (max(values) if values else 0.0), sum(values)


def machine_load(sample_s: float = 1.0) -> tuple[float, float]:
    """(1-minute load average, % of all CPUs busy over `sample_s`) before the benchmark starts."""

    def snap() -> tuple[int, int]:
        parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = parts[3] + parts[4]
        return sum(parts), idle

    t0, i0 = snap()
    time.sleep(sample_s)
    t1, i1 = snap()
    busy = 100.0 * (1 - (i1 - i0) / max(1, t1 - t0))
    return os.getloadavg()[0], busy


# ---- load generation ----------------------------------------------------------------------------


@dataclass
class WrkResult:
    conc: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: int
    status_errors: int
    consistent: bool  # Little's law: requests x mean latency ~ concurrency x duration


def run_wrk(lua: Path, url: str, key: str, body: dict[str, Any], conc: int, seconds: float) -> WrkResult:
    env = {**os.environ, "BENCH_KEY": key, "BENCH_BODY": json.dumps(body)}
    argv = [
        "wrk",
        "-t1",
        f"-c{conc}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(lua),
        url,
    ]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise BenchError(
            f"wrk gave no summary (rc {out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}"
        )
    d = json.loads(line.removeprefix("WRKJSON "))
    secs = d["duration_us"] / 1e6
    busy = d["requests"] * d["mean_us"] / 1e6
    return WrkResult(
        conc=conc,
        requests=d["requests"],
        seconds=secs,
        rps=d["requests"] / secs if secs else 0.0,
        p50_ms=d["p50_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        mean_ms=d["mean_us"] / 1000,
        errors=d["errors"],
        status_errors=d["status_errors"],
        consistent=abs(busy - conc * secs) <= 0.3 * conc * secs,
    )


@dataclass
class Row:
    scenario: str
    workers: int
    stream: bool
    rps: float = 0.0
    p50_ms: float = 0.0  # at concurrency 1
    p99_ms: float = 0.0
    mod_p50_ms: float = 0.0  # at concurrency 8
    mod_p99_ms: float = 0.0
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None
    added_mod_p50_ms: float | None = None
    added_mod_p99_ms: float | None = None
    cpu_ms_per_req: float = 0.0
    rss_max_mb: float = 0.0
    rss_sum_mb: float = 0.0
    errors: int = 0
    warnings: list[str] = field(default_factory=list)
    wrk_inconsistent: list[str] = field(default_factory=list)  # runs failing the Little's-law check


def measure(
    lua: Path,
    scenario: str,
    workers: int,
    stream: bool,
    url: str,
    key: str,
    root_pid: int,
    duration: float,
    body: dict[str, Any] | None = None,
) -> Row:
    body = dict(body or BODY)
    if stream:
        body.update(STREAM_EXTRA)
    row = Row(scenario, workers, stream)
    run_wrk(lua, url, key, body, MODERATE_CONC, max(1.0, duration / 5))  # warm-up, discarded
    pids = descendants(root_pid)
    cpu0 = cpu_seconds(pids)
    tp = run_wrk(lua, url, key, body, THROUGHPUT_CONC, duration)
    cpu1 = cpu_seconds(descendants(root_pid))
    idle = run_wrk(lua, url, key, body, 1, max(2.0, duration / 2))
    mod = run_wrk(lua, url, key, body, MODERATE_CONC, max(2.0, duration / 2))
    row.rps = tp.rps
    row.p50_ms, row.p99_ms = idle.p50_ms, idle.p99_ms
    row.mod_p50_ms, row.mod_p99_ms = mod.p50_ms, mod.p99_ms
    row.cpu_ms_per_req = 1000 * (cpu1 - cpu0) / max(1, tp.requests)
    row.rss_max_mb, row.rss_sum_mb = peak_rss_mb(descendants(root_pid))
    for name, r in (("c32", tp), ("c1", idle), ("c8", mod)):
        row.errors += r.errors + r.status_errors
        if r.errors or r.status_errors:
            row.warnings.append(f"{name}: {r.errors} socket errors, {r.status_errors} non-2xx")
        if not r.consistent:
            row.wrk_inconsistent.append(name)
    return row


def remeasure_direct(lua: Path, rows: list[Row], url: str, duration: float) -> None:
    """Measure the upstream's own latency again at the end and keep the lower of the two.

    The baseline is subtracted from every gateway's latency, and a noisy baseline (another process
    taking the CPU for a moment) would make the gateways look faster than they are; the lower value
    makes the added latency conservative (never flattering).
    """
    for row in rows:
        if row.scenario != "direct":
            continue
        body = {**BODY, **(STREAM_EXTRA if row.stream else {})}
        idle = run_wrk(lua, url, "none", body, 1, max(2.0, duration / 2))
        mod = run_wrk(lua, url, "none", body, MODERATE_CONC, max(2.0, duration / 2))
        row.p50_ms, row.p99_ms = min(row.p50_ms, idle.p50_ms), min(row.p99_ms, idle.p99_ms)
        row.mod_p50_ms, row.mod_p99_ms = min(row.mod_p50_ms, mod.p50_ms), min(row.mod_p99_ms, mod.p99_ms)


# ---- the systems under test ---------------------------------------------------------------------


def steward_exe() -> str:
    exe = Path(sys.executable).parent / "steward"
    found = str(exe) if exe.exists() else shutil.which("steward")
    if not found:
        raise BenchError("the `steward` command is not installed in this environment (make setup)")
    return found


def create_key(data_dir: Path) -> str:
    env = {**os.environ, "STEWARD_DATA_DIR": str(data_dir)}
    out = subprocess.run(
        [steward_exe(), "keys", "create", "--tenant", "bench", "--role", "user"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    key = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    if out.returncode != 0 or not key.startswith("sk-stw-"):
        raise BenchError(f"steward keys create failed (rc {out.returncode}): {out.stderr[-500:]}")
    return key


def steward_setting_names() -> set[str]:
    """The settings this checkout's gateway knows (`audit` and `guards` arrived after `serve`)."""
    from steward.gateway.settings import Settings

    return set(Settings.model_fields)


@contextlib.contextmanager
def steward_server(
    procs: Procs,
    work: Path,
    data_dir: Path,
    workers: int,
    upstream_url: str | None,
    *,
    audit: bool = True,
    guards: bool = False,
    name: str = "steward",
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`steward serve`; with `upstream_url` a routing table of one `openai` model and no encoder,
    else the default models (the built-in model and the encoder)."""
    port = free_port()
    name = f"{name}-w{workers}"
    known = steward_setting_names()
    text = "# written by benchmarks/bench_gateway.py\nlog_level: warning\n" + "".join(
        f"{k}: {'true' if v else 'false'}\n" for k, v in (("audit", audit), ("guards", guards)) if k in known
    )
    if upstream_url:
        text += (
            'embedding_model: ""\n'
            "models:\n"
            "  - name: fake\n"
            "    backend: openai\n"
            f"    base_url: {upstream_url}\n"
            "    upstream_model: fake-model\n"
        )
    cfg = work / f"{name}.yaml"
    cfg.write_text(text)
    argv = [steward_exe(), "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    argv += ["--config", str(cfg)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEWARD_")}
    env["STEWARD_DATA_DIR"] = str(data_dir)
    env["STEWARD_LOG_LEVEL"] = "warning"
    proc = procs.start(name, argv, env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(procs, name, proc, f"{base}/readyz", 300)
        yield base, proc
    finally:
        procs.stop(proc)


def ensure_litellm(venv: Path, logdir: Path, timeout_s: float) -> Path:
    """The `litellm` executable in `venv`, creating the venv and installing `litellm[proxy]` if needed."""
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    python = shutil.which("python3.11") or sys.executable
    log = logdir / "litellm-install.log"
    print(f"installing litellm[proxy] into {venv} (log: {log}) ...", flush=True)
    with log.open("wb") as fh:
        if not (venv / "bin" / "python").exists():
            subprocess.run([python, "-m", "venv", str(venv)], stdout=fh, stderr=subprocess.STDOUT, check=True)
        pip = [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "-q"]
        try:
            rc = subprocess.run(
                [*pip, "-c", str(CONSTRAINTS), "litellm[proxy]"],
                stdout=fh,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
            ).returncode
        except subprocess.TimeoutExpired:
            raise BenchError(f"installing litellm[proxy] took over {timeout_s:.0f} s (see {log})") from None
    if rc != 0 or not exe.exists():
        raise BenchError(f"installing litellm[proxy] failed (rc {rc}); see {log}")
    return exe


@contextlib.contextmanager
def litellm_server(
    procs: Procs, work: Path, exe: Path, workers: int, upstream_url: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    name = f"litellm-w{workers}"
    cfg = work / f"{name}.yaml"
    cfg.write_text(
        "# written by benchmarks/bench_gateway.py\n"
        "model_list:\n"
        "  - model_name: fake\n"
        "    litellm_params:\n"
        "      model: openai/fake-model\n"
        f"      api_base: {upstream_url}\n"
        "      api_key: sk-fake-upstream\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_MASTER_KEY}\n"
        "litellm_settings:\n"
        "  set_verbose: false\n"
        "  telemetry: false\n"
    )
    argv = [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)]
    if workers > 1:
        argv += ["--num_workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEWARD_", "LITELLM_", "OPENAI_"))}
    env.update(
        {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "DISABLE_SCHEMA_UPDATE": "True"}
    )
    proc = procs.start(name, argv, env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(procs, name, proc, f"{base}/health/liveliness", 300)
        yield base, proc
    finally:
        procs.stop(proc)


# ---- report -------------------------------------------------------------------------------------


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def fill_added(rows: list[Row]) -> None:
    direct = {r.stream: r for r in rows if r.scenario == "direct"}
    for r in rows:
        d = direct.get(r.stream)
        if r.scenario in ("direct", "steward-builtin") or d is None:
            continue
        r.added_p50_ms = r.p50_ms - d.p50_ms
        r.added_p99_ms = r.p99_ms - d.p99_ms
        r.added_mod_p50_ms = r.mod_p50_ms - d.mod_p50_ms
        r.added_mod_p99_ms = r.mod_p99_ms - d.mod_p99_ms


def table(rows: list[Row]) -> str:
    head = (
        f"{'scenario':<16}{'wk':>3} {'stream':<7}{'req/s':>8}"
        f"{'p50':>8}{'p99':>8}{'+p50':>8}{'+p99':>8}{'+p50@8':>8}{'+p99@8':>8}"
        f"{'CPUms/req':>10}{'RSSmax':>8}{'RSSsum':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.scenario:<16}{r.workers:>3} {'yes' if r.stream else 'no':<7}{r.rps:>8.0f}"
            f"{r.p50_ms:>8.2f}{r.p99_ms:>8.2f}{_f(r.added_p50_ms):>8}{_f(r.added_p99_ms):>8}"
            f"{_f(r.added_mod_p50_ms):>8}{_f(r.added_mod_p99_ms):>8}"
            f"{r.cpu_ms_per_req:>10.2f}{r.rss_max_mb:>8.0f}{r.rss_sum_mb:>8.0f}"
        )
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> list[dict[str, Any]]:
    """Each target against each Steward figure it applies to."""
    out: list[dict[str, Any]] = []

    def add(what: str, value: float | None, target: str, ok: bool | None) -> None:
        out.append({"check": what, "value": value, "target": target, "met": ok})

    lite = {(r.workers, r.stream): r for r in rows if r.scenario == "litellm"}
    for r in rows:
        tag = f"steward w{r.workers} {'stream' if r.stream else 'json'}"
        if r.scenario == "steward-builtin":
            add(
                f"steward-builtin w{r.workers}: peak RSS per worker (MB)",
                round(r.rss_max_mb, 1),
                f"<= {TARGETS['rss_mb_per_worker']:.0f}",
                r.rss_max_mb <= TARGETS["rss_mb_per_worker"],
            )
            continue
        if r.scenario != "steward":
            continue
        add(f"{tag}: req/s", round(r.rps), f">= {TARGETS['rps']:.0f}", r.rps >= TARGETS["rps"])
        for key, tgt in (("added_p50_ms", "added_p50_ms"), ("added_p99_ms", "added_p99_ms")):
            v = getattr(r, key)
            shown = None if v is None else round(v, 2)
            add(
                f"{tag}: {key} (c=1)",
                shown,
                f"<= {TARGETS[tgt]:.0f}",
                None if v is None else v <= TARGETS[tgt],
            )
        other = lite.get((r.workers, r.stream))
        if other is None:
            continue
        pairs: list[tuple[str, float | None, float | None, bool]] = [
            ("req/s", r.rps, other.rps, True),
            ("added p50 ms", r.added_p50_ms, other.added_p50_ms, False),
            ("added p99 ms", r.added_p99_ms, other.added_p99_ms, False),
            ("CPU ms/req", r.cpu_ms_per_req, other.cpu_ms_per_req, False),
            ("peak RSS max MB", r.rss_max_mb, other.rss_max_mb, False),
        ]
        for what, mine, theirs, higher_better in pairs:
            if mine is None or theirs is None:
                continue
            ok = mine > theirs if higher_better else mine < theirs
            add(f"{tag}: {what} ahead of LiteLLM", round(mine, 2), f"LiteLLM {theirs:.2f}", ok)
    return out


def print_report(rows: list[Row], meta: dict[str, Any], checks: list[dict[str, Any]]) -> None:
    print()
    print("Gateway benchmark — issue 3 item 11")
    print(
        f"machine: {meta['cpus']} CPUs shared by wrk (1 thread), the gateway and the upstream; "
        f"load average before the run {meta['loadavg_before']:.2f}, CPU busy {meta['cpu_busy_before']:.0f}% "
        "(other work on the machine lowers req/s; CPU ms/req is robust to it)"
    )
    print(
        f"load: wrk -t1, {THROUGHPUT_CONC} connections for req/s ({meta['duration']:.0f} s), "
        f"1 connection for p50/p99 and +p50/+p99 (ms added vs direct, idle), "
        f"{MODERATE_CONC} connections for +p50@8/+p99@8; body: chat, max_tokens 16; "
        "stream=yes adds stream_options.include_usage"
    )
    print(
        "steward: openai backend, guards off, audit on (SQLite, committed before each answer); "
        "steward-noaudit: audit off; steward-guards: guards on; 2 workers use the SQLite limiter. "
        "litellm: master_key auth, no database."
    )
    print("RSSmax = largest process VmHWM (a worker), RSSsum = all processes of the gateway (MB)")
    print()
    print(table(rows))
    warn = [f"  {r.scenario} w{r.workers} stream={r.stream}: {w}" for r in rows for w in r.warnings]
    if warn:
        print("\nwarnings:")
        print("\n".join(warn))
    odd = [
        f"{r.scenario} w{r.workers} {'stream' if r.stream else 'json'} {n}"
        for r in rows
        for n in r.wrk_inconsistent
    ]
    if odd:
        print(
            "\nwrk's mean latency x requests differs from connections x duration by > 30% in: "
            + ", ".join(odd)
            + " (seen with sub-millisecond responses on the busy 2 cores; cause not established,"
            + " percentiles kept as measured)"
        )
    print("\ntargets (issue 3 item 11: added p50 <= 3 ms, p99 <= 15 ms, >= 800 req/s, ahead of LiteLLM on")
    print("every figure, peak RSS <= 550 MB per worker with the built-in model loaded):")
    for c in checks:
        mark = {True: "MET ", False: "MISS", None: " n/a"}[c["met"]]
        print(f"  [{mark}] {c['check']}: {c['value']} (target {c['target']})")
    for note in meta.get("notes", []):
        print(f"note: {note}")


# ---- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of the req/s run per scenario")
    ap.add_argument("--quick", action="store_true", help="3 s runs, one worker count each, no LiteLLM x2")
    ap.add_argument("--skip-litellm", action="store_true")
    ap.add_argument("--skip-builtin", action="store_true", help="skip the built-in-model RSS run")
    ap.add_argument("--litellm-venv", type=Path, default=DEFAULT_LITELLM_VENV)
    ap.add_argument("--install-timeout", type=float, default=900.0, help="seconds for pip install litellm")
    ap.add_argument("--json", type=Path, default=None, help="write rows, checks and metadata here")
    args = ap.parse_args(argv)
    duration = 3.0 if args.quick else args.duration
    worker_counts = [1] if args.quick else [1, 2]
    if shutil.which("wrk") is None:
        print("wrk not found (apt-get install wrk)", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    loadavg, busy = machine_load()
    meta: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "loadavg_before": loadavg,
        "cpu_busy_before": busy,
        "duration": duration,
        "notes": [],
    }
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="steward-bench-gw-"))
    procs = Procs(work)
    lua = work / "post.lua"
    lua.write_text(WRK_LUA)
    print(f"work dir (logs, configs): {work}", flush=True)
    try:
        # the upstream, shared by every scenario
        up_port = free_port()
        up = procs.start(
            "upstream", [sys.executable, "-m", "steward.backends.fake_upstream", "--port", str(up_port)]
        )
        up_base = f"http://127.0.0.1:{up_port}"
        upstream_url = f"{up_base}/v1"
        wait_ready(procs, "upstream", up, f"{upstream_url}/models", 60)
        chat = "/v1/chat/completions"

        def record(row: Row) -> None:
            rows.append(row)
            print(
                f"  {row.scenario} w{row.workers} stream={row.stream}: {row.rps:.0f} req/s, "
                f"p50 {row.p50_ms:.2f} ms, p99 {row.p99_ms:.2f} ms, CPU {row.cpu_ms_per_req:.2f} ms/req",
                flush=True,
            )

        print("direct (fake upstream) ...", flush=True)
        for stream in (False, True):
            record(measure(lua, "direct", 1, stream, up_base + chat, "none", up.pid, duration))

        data_dir = work / "steward-data"
        key = create_key(data_dir)
        # (scenario, workers, audit, guards): the targets are for guards off, audit on
        variants = [("steward", w, True, False) for w in worker_counts]
        if not args.quick:
            variants += [("steward-noaudit", 1, False, False), ("steward-guards", 1, True, True)]
        for scen, w, audit, guards in variants:
            print(f"steward --workers {w}, audit {audit}, guards {guards} ...", flush=True)
            with steward_server(
                procs, work, data_dir, w, upstream_url, audit=audit, guards=guards, name=scen
            ) as (base, proc):
                probe(procs, f"{scen}-w{w}", base + chat, key, BODY)
                for stream in (False, True):
                    record(measure(lua, scen, w, stream, base + chat, key, proc.pid, duration))
        meta["steward_settings"] = sorted(steward_setting_names() & {"audit", "guards"})
        if "guards" not in meta["steward_settings"]:
            meta["notes"].append("this checkout has no `guards` setting: steward rows run without guards")

        if not args.skip_litellm:
            try:
                exe = ensure_litellm(args.litellm_venv, work, args.install_timeout)
            except (BenchError, OSError, subprocess.CalledProcessError) as exc:
                meta["notes"].append(f"LiteLLM skipped: {exc}")
                print(f"LiteLLM skipped: {exc}", flush=True)
            else:
                for w in worker_counts:
                    print(f"litellm --num_workers {w} ...", flush=True)
                    try:
                        with litellm_server(procs, work, exe, w, upstream_url) as (base, proc):
                            probe(procs, f"litellm-w{w}", base + chat, LITELLM_MASTER_KEY, BODY)
                            for stream in (False, True):
                                record(
                                    measure(
                                        lua,
                                        "litellm",
                                        w,
                                        stream,
                                        base + chat,
                                        LITELLM_MASTER_KEY,
                                        proc.pid,
                                        duration,
                                    )
                                )
                    except BenchError as exc:
                        meta["notes"].append(f"LiteLLM with {w} workers failed: {exc}")
                        print(f"LiteLLM with {w} workers failed: {exc}", flush=True)

        print("direct again (the lower baseline of the two is kept) ...", flush=True)
        remeasure_direct(lua, rows, up_base + chat, duration)

        if not args.skip_builtin:
            print("steward with the built-in model (RSS) ...", flush=True)
            with steward_server(procs, work, data_dir, 1, None, name="steward-builtin") as (base, proc):
                bbody = {**BODY, "model": "builtin"}
                probe(procs, "steward-builtin-w1", base + chat, key, bbody)
                d = min(duration, 5.0)
                row = Row("steward-builtin", 1, False)
                run_wrk(lua, base + chat, key, bbody, 2, 1.0)
                cpu0 = cpu_seconds(descendants(proc.pid))
                r = run_wrk(lua, base + chat, key, bbody, 4, d)
                row.cpu_ms_per_req = 1000 * (cpu_seconds(descendants(proc.pid)) - cpu0) / max(1, r.requests)
                row.rps, row.p50_ms, row.p99_ms = r.rps, r.p50_ms, r.p99_ms
                row.mod_p50_ms, row.mod_p99_ms = r.p50_ms, r.p99_ms
                row.rss_max_mb, row.rss_sum_mb = peak_rss_mb(descendants(proc.pid))
                row.errors = r.errors + r.status_errors
                record(row)
            meta["notes"].append(
                "steward-builtin: default models (built-in model + encoder), guards off, 4 connections on "
                "model `builtin`; req/s and p50/p99 are generation speed (16 tokens), not gateway overhead"
            )
    except KeyboardInterrupt:
        print("\ninterrupted; stopping every process started", file=sys.stderr)
        procs.stop_all()
        return 130
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        procs.stop_all()
        return 1
    finally:
        procs.stop_all()

    fill_added(rows)
    checks = verdicts(rows)
    print_report(rows, meta, checks)
    if args.json:
        args.json.write_text(
            json.dumps({"meta": meta, "rows": [asdict(r) for r in rows], "checks": checks}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
