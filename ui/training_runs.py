"""Training runs started from the UI: `train.py` in its own process, watched through its run folder.

A run is `outputs/runs/<name>/` (train.py's `--output-dir`: checkpoints, `metrics.jsonl`, `samples/`) plus
`ui_run.json` (the command, the export folder, the process id) and `train.log`. The process is started in
its own session, so neither a closed tab nor a crash of the server stops it; any run folder can be
re-opened ("watched") later from its files alone. Stop sends SIGTERM: train.py finishes the current step,
saves a checkpoint there and exits (`--resume-from latest` continues it); a process that does not exit
within `timeout` is killed, and its last periodic checkpoint (written atomically) stays resumable.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_FILE = "ui_run.json"
LOG_FILE = "train.log"
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"


def train_entry() -> list[str]:
    """`python train.py` from a checkout, else the installed `dit.training` module (the same CLI)."""
    if TRAIN_SCRIPT.is_file():
        return [sys.executable, str(TRAIN_SCRIPT)]
    return [sys.executable, "-c", "from dit.training import main; main()"]


@dataclass
class RunStatus:
    run: str
    folder: str
    state: str                 # running | finished | failed | stopped | not started
    step: int
    max_steps: int | None
    loss: float | None
    checkpoints: list[str]
    preview: str | None
    export: str | None
    error: str | None
    log_tail: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _pid_alive(pid: int | None, folder: Path) -> bool:
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        stat = Path(f"/proc/{pid}/stat").read_text().split()
    except OSError:
        return False
    return str(folder) in cmdline and stat[2] != "Z"


class RunManager:
    """Start / resume / stop / inspect training runs. One per server (kept in `Studio.state`)."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, folder: Path, argv: list[str], export: Path, resume: bool = False) -> dict[str, Any]:
        folder.mkdir(parents=True, exist_ok=True)
        cmd = train_entry() + argv + (["--resume-from", "latest"] if resume else [])
        log = open(folder / LOG_FILE, "a")
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=str(Path(__file__).resolve().parents[1]))
        log.close()
        self.procs[str(folder)] = proc
        record = {"argv": argv, "export": str(export), "pid": proc.pid, "started": time.time(), "stopped": False}
        tmp = folder / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, folder / RUN_FILE)
        return record

    @staticmethod
    def record(folder: Path) -> dict[str, Any]:
        path = folder / RUN_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def running(self, folder: Path) -> bool:
        proc = self.procs.get(str(folder))
        if proc is not None:
            return proc.poll() is None
        return _pid_alive(self.record(folder).get("pid"), folder)

    def stop(self, folder: Path, timeout: float = 120.0) -> bool:
        """Terminate the run's process; True when it was running."""
        rec = self.record(folder)
        proc = self.procs.get(str(folder))
        pid = proc.pid if proc is not None else rec.get("pid")
        if not self.running(folder):
            return False
        rec["stopped"] = True
        (folder / RUN_FILE).write_text(json.dumps(rec, indent=2))
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            return False
        deadline = time.time() + timeout
        while self.running(folder) and time.time() < deadline:
            time.sleep(0.1)
        if self.running(folder):
            os.killpg(pid, signal.SIGKILL)
        if proc is not None:
            proc.wait(timeout=5)
        return True

    def status(self, folder: Path) -> RunStatus:
        from dit.training import list_checkpoints

        rec = self.record(folder)
        config = folder / "config.json"
        args = json.loads(config.read_text()) if config.is_file() else {}
        max_steps = args.get("max_steps")
        if max_steps is None and rec.get("argv") and "--max-steps" in rec["argv"]:
            max_steps = int(rec["argv"][rec["argv"].index("--max-steps") + 1])
        points = metrics(folder)
        step = points[-1]["step"] if points else 0
        ckpts = list_checkpoints(folder)
        if ckpts:
            step = max(step, int(ckpts[-1].name.split("-")[1]))
        samples = sorted((folder / "samples").glob("step-*.png")) if (folder / "samples").is_dir() else []
        export = rec.get("export") or args.get("export_dir") or str(folder / "final")
        export_done = (Path(export) / "config.json").is_file() and (Path(export) / "studio.json").is_file()
        log_path = folder / LOG_FILE
        tail = log_tail(log_path) if log_path.is_file() else []
        proc = self.procs.get(str(folder))
        error = None
        if self.running(folder):
            state = "running"
        elif proc is not None and proc.returncode not in (0, None) and not rec.get("stopped"):
            state = "failed"
            errors = [ln for ln in tail if ln.startswith("error:") or "Error" in ln]
            error = (errors[-1] if errors else (tail[-1] if tail else f"exit code {proc.returncode}"))
        elif export_done and (max_steps is None or step >= max_steps):
            state = "finished"
        elif rec.get("stopped"):
            state = "stopped"
        elif rec or ckpts or points:
            state = "stopped"
        else:
            state = "not started"
        return RunStatus(folder.name, str(folder), state, step, max_steps,
                         points[-1]["loss"] if points else None, [p.name for p in ckpts],
                         str(samples[-1]) if samples else None, export if export_done else None, error,
                         "\n".join(tail))


def log_tail(path: Path, lines: int = 12) -> list[str]:
    """The last lines of a log as a terminal would show them (tqdm's carriage returns and escapes removed)."""
    text = path.read_bytes()[-20000:].decode(errors="replace")
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    out = [seg.strip() for line in text.split("\n") for seg in line.split("\r")[-1:]]
    return [ln for ln in out if ln][-lines:]


def metrics(folder: Path) -> list[dict[str, Any]]:
    """The (step, loss, ...) records of `metrics.jsonl` (lines without a loss are skipped)."""
    path = folder / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written
            if "loss" in rec:
                out.append(rec)
    return out
