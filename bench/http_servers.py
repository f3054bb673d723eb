"""The two OpenAI HTTP servers of ``bench/http_peer.py`` and the client load both get.

A :class:`HttpServer` is a server subprocess on 127.0.0.1 in a process group of its own (vLLM's
API server starts an engine-core process; stopping the group stops both), timed from its start
to ``/health`` answering and to its first completion, with the memory of its whole process tree.
:func:`drive` is the load: a fixed list of completions, streamed through the ``openai`` client
by a pool of concurrent clients that each take the next job when done (closed loop).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


class HttpServer:
    """One server subprocess, its OpenAI API at ``http://127.0.0.1:{port}/v1``."""

    def __init__(self, name: str, cmd: list[str], *, port: int, env: dict[str, str], log: Path, cwd: Path,
                 model: str):
        self.name, self.cmd, self.port, self.model, self.log_path = name, cmd, port, model, log
        self._log = open(log, "w")  # noqa: SIM115 -- the server's output for its lifetime, closed by stop()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.ready_s = self.first_answer_s = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float = 900) -> None:
        """Until ``/health`` answers 200, then one 1-token completion: both times from the start."""
        import httpx

        deadline = self.started + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before it was ready; "
                                   f"its log {self.log_path} ends:\n{self.log_tail()}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; log {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.ready_s = time.perf_counter() - self.started
        reply = httpx.post(f"{self.url}/completions", timeout=300,
                           json={"model": self.model, "prompt": "Hello", "max_tokens": 1, "temperature": 0})
        reply.raise_for_status()
        self.first_answer_s = time.perf_counter() - self.started

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-lines:])

    def memory_mb(self) -> dict[str, float]:
        """RSS and PSS (shared pages split between the processes that map them) of the server's
        process tree, and how many processes that is."""
        import psutil

        root = psutil.Process(self.proc.pid)
        rss = pss = 0
        procs = [root, *root.children(recursive=True)]
        for p in procs:
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss, pss = rss + info.rss, pss + info.pss
        return {"rss_mb": rss / 2**20, "pss_mb": pss / 2**20, "processes": len(procs)}

    def stop(self) -> None:
        """SIGTERM to the server's own process group, SIGKILL after 30 s."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
            except ProcessLookupError:
                pass
        self._log.close()


@dataclass
class Reply:
    """One streamed completion as the client saw it."""

    text: str
    tokens: int  # the server's usage.completion_tokens
    ttft_s: float  # request sent -> first chunk with text
    latency_s: float  # request sent -> stream ended


@dataclass
class Run:
    replies: list[Reply]
    elapsed_s: float
    tok_s: float = field(init=False)

    def __post_init__(self):
        self.tok_s = sum(r.tokens for r in self.replies) / self.elapsed_s


def complete(client, model: str, prompt: str, max_tokens: int) -> Reply:
    """One greedy completion, streamed with usage in its last chunk."""
    start = time.perf_counter()
    first, parts, tokens = None, [], 0
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            if first is None:
                first = time.perf_counter() - start
            parts.append(chunk.choices[0].text)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - start
    return Reply("".join(parts), tokens, latency if first is None else first, latency)


def openai_client(url: str, clients: int):
    """An ``openai`` client with a connection for each concurrent client, no retries."""
    import httpx
    import openai

    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=900,
                         http_client=httpx.Client(limits=limits, timeout=900))


def drive(client, jobs: list[tuple[str, str]], clients: int, max_tokens: int) -> Run:
    """``jobs`` (model, prompt) through ``clients`` concurrent streams; replies in job order."""
    replies: list[Reply | None] = [None] * len(jobs)
    errors: list[BaseException] = []
    lock, barrier = threading.Lock(), threading.Barrier(clients + 1)
    pending = iter(range(len(jobs)))

    def worker() -> None:
        barrier.wait()
        while not errors:
            with lock:
                i = next(pending, None)
            if i is None:
                return
            try:
                replies[i] = complete(client, *jobs[i], max_tokens)
            except BaseException as exc:  # noqa: BLE001 -- re-raised below, in the caller's thread
                errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return Run(replies, elapsed)
