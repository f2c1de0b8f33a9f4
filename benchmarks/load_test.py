"""Many visitors at once: N gradio_client sessions drive the running app with a mixed workload.

    python benchmarks/load_test.py                  # 8 sessions: importance + generation on the bundled model,
                                                    # tiny fusion runs + generation on the tiny test model
    python benchmarks/load_test.py --tiny           # every session on the tiny test model (fast)
    python benchmarks/load_test.py --sessions 16
    python benchmarks/load_test.py --url http://127.0.0.1:7860/ --pid 1234   # an app that is already running

Without --url it starts `python app.py` in a subprocess (on a free port, with the tiny test model offered:
FUSEGPT_APP_TEST_MODEL=1) and stops it at the end. Even-numbered sessions load the bundled model (or the tiny one
with --tiny), compute importance with their own set of metrics and generate; odd-numbered sessions load the tiny
model, run a tiny FuseGPT fusion on their own blocks and generate with the original and the result. Every session
picks its own plan, then checks that /results and /job_status show exactly its own model, plan, metrics, runs,
generations and jobs, nobody else's.

Reports requests completed, failures (jobs that failed, calls that raised, isolation checks that did not hold), the
longest queue wait (a job's time from submission until /job_status first shows it running; each visitor polls once
a second, like the app's page does, so waits are known to within a second), how long each kind of job ran,
the slowest single request, the server's peak memory (RSS, sampled every 0.1 s) and the wall time; prints a table
and writes benchmarks/results/load_test.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "load_test.json"
TINY_KIND = "tiny (test model)"
BUNDLED_KIND = "bundled SmolLM2-135M"
METRIC_SETS = (["mi"], ["mi", "bi"], ["bi", "angular"], ["angular"])
FINISHED = ("done", "failed", "cancelled")


@dataclass
class Visitor:
    """One gradio_client session and what it saw."""

    index: int
    role: str
    """'importance' or 'fusion'."""
    model_kind: str
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    queue_waits: list[float] = field(default_factory=list)
    run_seconds: list[tuple[str, float]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    seconds: float = 0.0


class _Call:
    """client.predict with counting and timing."""

    def __init__(self, client, visitor: Visitor):
        self.client, self.visitor = client, visitor

    def __call__(self, api_name: str, **kwargs) -> Any:
        start = time.monotonic()
        try:
            return self.client.predict(api_name=api_name, **kwargs)
        finally:
            self.visitor.requests += 1
            self.visitor.latencies.append(time.monotonic() - start)


def _wait_job(call: _Call, job_kind: str, submitted: float, visitor: Visitor, timeout: float, poll: float) -> dict:
    """Poll /job_status until the newest job of `job_kind` finishes; records its queue wait; returns its state."""
    started_at = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [j for j in call("/job_status")["jobs"] if j["kind"] == job_kind]
        job = jobs[-1] if jobs else None
        if job is not None and job["status"] != "queued" and started_at is None:
            started_at = time.monotonic()
            visitor.queue_waits.append(started_at - submitted)
        if job is not None and job["status"] in FINISHED:
            visitor.run_seconds.append((job_kind, time.monotonic() - (started_at or submitted)))
            if job["status"] != "done":
                visitor.failures.append(f"{job_kind} job {job['status']}: {job['error']}")
            return job
        time.sleep(poll)
    visitor.failures.append(f"{job_kind} job did not finish in {timeout:.0f} s")
    return {}


def _submit(call: _Call, visitor: Visitor, job_kind: str, api_name: str, timeout: float, poll: float, **inputs) -> dict:
    submitted = time.monotonic()
    status, _ = call(api_name, **inputs)
    if str(status).startswith("✖"):
        visitor.failures.append(f"{job_kind} refused: {status}")
        return {}
    visitor.jobs.append(job_kind)
    return _wait_job(call, job_kind, submitted, visitor, timeout, poll)


def visit(url: str, visitor: Visitor, timeout: float = 900.0, poll: float = 1.0, pasted: str = "") -> Visitor:
    """The whole visit of one session; every problem is recorded in visitor.failures, nothing raises.

    pasted: calibration text to paste (else the bundled corpus)."""
    from gradio_client import Client

    start = time.monotonic()
    try:
        # a visitor waits up to two minutes for one answer (httpx's default is 5 s: too short for a busy 2-core box)
        client = Client(url, verbose=False, httpx_kwargs={"timeout": 120.0})
        text_kind = "paste text" if pasted else "bundled corpus"
        call = _Call(client, visitor)
        i = visitor.index
        _submit(call, visitor, "load", "/load_model", timeout, poll, kind=visitor.model_kind, text="")
        n_blocks = (call("/results")["model"] or {}).get("blocks") or 0
        if not n_blocks:
            visitor.failures.append("no model after loading")
            return visitor
        metrics = METRIC_SETS[i % len(METRIC_SETS)]
        # this visitor's own plan: one or two blocks, different for every visitor up to the number of choices
        choices = [list(c) for r in (1, 2) for c in itertools.combinations(range(1, n_blocks), r)]
        plan_blocks = choices[(i * 7) % len(choices)]
        if visitor.role == "importance":
            _submit(call, visitor, "importance", "/compute_importance", timeout, poll,
                    kind=text_kind, pasted=pasted, upload=None, metrics=metrics, seq_len=32, n=1, seed=0)  # fmt: skip
        plan = call("/set_plan", mode="pick blocks", blocks=plan_blocks, k=len(plan_blocks))
        if visitor.role == "fusion":
            _submit(call, visitor, "run", "/start_run", timeout, poll,
                    preset="tiny", method="fusegpt", baselines=[], kind=text_kind, pasted=pasted, upload=None)  # fmt: skip
        _submit(call, visitor, "generate", "/generate", timeout, poll, prompt=f"Visitor {i}: say hello.", max_new=8)
        _check_isolation(call, visitor, plan, plan_blocks, metrics)
    except Exception as e:  # a call that raised: counted, and the visit ends
        visitor.failures.append(f"{type(e).__name__}: {e}")
    finally:
        visitor.seconds = time.monotonic() - start
    return visitor


def _check_isolation(call: _Call, visitor: Visitor, plan: dict, plan_blocks: list[int], metrics: list[str]) -> None:
    """/results and /job_status must show this visitor's own work, and only that."""
    results = call("/results")
    jobs = call("/job_status")["jobs"]
    expected_source = "bundled" if visitor.model_kind == BUNDLED_KIND else "tiny-llama"
    checks = {
        "model": results["model"].get("source") == expected_source,
        "plan": sorted(plan.get("blocks", [])) == plan_blocks and sorted(results["plan"]["blocks"]) == plan_blocks,
        "jobs": [j["kind"] for j in jobs] == visitor.jobs,
    }
    labels = [g["label"] for g in results["generations"]]
    if visitor.role == "importance":
        checks["importance"] = set(results["importance"] or {}) == set(metrics)
        checks["runs"] = results["compare"] == []
        checks["generations"] = labels == ["original"]
    else:
        checks["importance"] = results["importance"] is None
        runs = [row["model"] for row in results["compare"] if str(row["model"]).startswith("#")]
        checks["runs"] = runs == ["#1 fusegpt"]
        checks["generations"] = labels == ["original", "#1 fusegpt"]
    for name, ok in checks.items():
        if not ok:
            visitor.failures.append(f"isolation: {name} ({json.dumps(results, default=str)[:300]})")


class RssSampler:
    """Peak resident memory of a process and its children, sampled in a thread."""

    def __init__(self, pid: int, period: float = 0.1):
        import psutil

        self.process = psutil.Process(pid)
        self.period = period
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for p in [self.process, *self.process.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._sample())
            except Exception:
                pass
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_load(
    url: str,
    sessions: int = 8,
    tiny: bool = False,
    pid: int | None = None,
    timeout: float = 900.0,
    poll: float = 1.0,
    pasted: str = "",
) -> dict:
    """Drive `url` with `sessions` concurrent visitors; returns the figures (see the module docstring).

    pid: the server process, for its peak memory (default: this process, for an app served in-process);
    poll: seconds between two /job_status calls of a visitor; pasted: a text to use instead of the bundled corpus."""
    visitors = [
        Visitor(
            index=i,
            role="importance" if i % 2 == 0 else "fusion",
            model_kind=TINY_KIND if (tiny or i % 2 == 1) else BUNDLED_KIND,
        )
        for i in range(sessions)
    ]
    sampler = RssSampler(pid if pid is not None else os.getpid())
    start = time.monotonic()
    with sampler:
        threads = [threading.Thread(target=visit, args=(url, v, timeout, poll, pasted), daemon=True) for v in visitors]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 60)
    wall = time.monotonic() - start
    failures = [f"session {v.index}: {f}" for v in visitors for f in v.failures]
    waits = [w for v in visitors for w in v.queue_waits]
    latencies = [x for v in visitors for x in v.latencies]
    by_kind: dict[str, list[float]] = {}
    for v in visitors:
        for kind, seconds in v.run_seconds:
            by_kind.setdefault(kind, []).append(seconds)
    return {
        "sessions": sessions,
        "workload": ("tiny model" if tiny else "bundled importance + tiny fusion")
        + (", pasted text" if pasted else ", bundled corpus"),
        "poll_s": poll,
        "requests": sum(v.requests for v in visitors),
        "jobs": sum(len(v.jobs) for v in visitors),
        "failures": len(failures),
        "failure_details": failures[:50],
        "longest_queue_wait_s": round(max(waits), 2) if waits else None,
        "mean_queue_wait_s": round(sum(waits) / len(waits), 2) if waits else None,
        "slowest_request_s": round(max(latencies), 2) if latencies else None,
        "job_run_s": {
            k: {"n": len(v), "mean": round(sum(v) / len(v), 1), "max": round(max(v), 1)} for k, v in by_kind.items()
        },
        "peak_rss_mib": round(sampler.peak / 2**20, 1),
        "wall_s": round(wall, 1),
        "per_session_s": [round(v.seconds, 1) for v in visitors],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(log_path: Path, port: int | None = None, timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """`python app.py` on a free port with the tiny test model offered; returns (process, url) once it answers."""
    port = port or _free_port()
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "FUSEGPT_APP_TEST_MODEL": "1",
        "FUSEGPT_APP_AUTOLOAD": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    log = log_path.open("w")
    process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"app.py did not answer on {url} within {timeout:.0f} s; see {log_path}")


def stop_app(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def print_table(figures: dict) -> None:
    rows = [
        ("sessions", figures["sessions"]),
        ("workload", figures["workload"]),
        ("requests completed", figures["requests"]),
        ("jobs run", figures["jobs"]),
        ("failures", figures["failures"]),
        ("longest queue wait", f"{figures['longest_queue_wait_s']} s"),
        ("mean queue wait", f"{figures['mean_queue_wait_s']} s"),
        ("slowest request", f"{figures['slowest_request_s']} s"),
        *(
            (f"{kind} job runs", f"{t['n']} x, mean {t['mean']} s, max {t['max']} s")
            for kind, t in figures["job_run_s"].items()
        ),
        ("peak memory (RSS)", f"{figures['peak_rss_mib']} MiB"),
        ("wall time", f"{figures['wall_s']} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for line in figures["failure_details"]:
        print("  FAILED", line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="every session on the tiny test model")
    ap.add_argument("--url", default=None, help="an app that is already running (else app.py is started)")
    ap.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, for its memory")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds a session's job may take")
    ap.add_argument("--poll", type=float, default=1.0, help="seconds between a visitor's status calls")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    process = None
    log_path = Path(tempfile.gettempdir()) / "fusegpt_load_test_server.log"
    if args.url is None:
        started = time.monotonic()
        process, url = start_app(log_path)
        pid = process.pid
        print(f"app.py answered on {url} after {time.monotonic() - started:.1f} s (log: {log_path})", flush=True)
    else:
        url, pid = args.url, args.pid
    try:
        figures = run_load(url, args.sessions, args.tiny, pid, args.timeout, args.poll)
    finally:
        if process is not None:
            stop_app(process)
    figures["command"] = (
        "python benchmarks/load_test.py"
        + (" --tiny" if args.tiny else "")
        + (f" --sessions {args.sessions}" if args.sessions != 8 else "")
    )
    figures["machine"] = f"{os.cpu_count()} CPU cores"
    print_table(figures)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 1 if figures["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
