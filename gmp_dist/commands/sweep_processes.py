"""``gmp-dist sweep --concurrent N``: each point trains in its own Python process.

The parent starts ``python -m gmp_dist.commands.sweep_processes CHILD_CONFIG PARENT_RUN_ID RESULT_JSON`` per
point (at most N at once), shows each child's output prefixed with the point's name and reads the point's
outcome back from RESULT_JSON. On SIGINT/SIGTERM it passes SIGINT to the children, so each marks its own
MLflow run KILLED, and kills those that have not ended after ``STOP_GRACE_S``.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from gmp_dist import signals
from gmp_dist.config import dump_config, load_config
from gmp_dist.errors import UserError
from gmp_dist.signals import stop_on_signals

if TYPE_CHECKING:
    from gmp_dist.commands.sweep import Outcome

STOP_GRACE_S = 60


def run_in_processes(outcomes: Sequence[Outcome], parent: Optional[str], concurrent: int) -> None:
    """Train every outcome's point in a child process, at most ``concurrent`` at once; fills in the outcomes."""
    procs: dict[int, subprocess.Popen] = {}
    lock = threading.Lock()
    stopping = threading.Event()
    with tempfile.TemporaryDirectory(prefix="gmp-sweep-") as tmp:
        def one(index: int) -> None:
            if stopping.is_set():
                return
            outcome = outcomes[index]
            config_path = Path(tmp) / f"point{index}.yaml"
            result_path = Path(tmp) / f"point{index}.json"
            config_path.write_text(dump_config(outcome.point.cfg))
            command = [sys.executable, "-m", "gmp_dist.commands.sweep_processes", str(config_path), parent or "", str(result_path)]
            with lock:
                if stopping.is_set():
                    return
                proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        errors="replace", bufsize=1)
                procs[index] = proc
            prefix = f"[{outcome.point.name}] "
            for line in proc.stdout:
                sys.stderr.write(prefix + line)
            code = proc.wait()
            _read_child_result(outcome, result_path, code)

        pool = ThreadPoolExecutor(max_workers=concurrent, thread_name_prefix="sweep")
        futures = [pool.submit(one, i) for i in range(len(outcomes))]
        try:
            for future in futures:
                future.result()
        except KeyboardInterrupt:
            stopping.set()
            _stop_children(procs, lock)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _stop_children(procs: dict[int, subprocess.Popen], lock: threading.Lock) -> None:
    """SIGINT lets each child mark its MLflow run KILLED; kill the ones that do not end in time."""
    with lock:
        live = [p for p in procs.values() if p.poll() is None]
    for proc in live:
        proc.send_signal(signal.SIGINT)
    for proc in live:
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()


def _read_child_result(outcome: Outcome, path: Path, code: int) -> None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    outcome.status = data.get("status") or ("FINISHED" if code == 0 else "KILLED" if code in (130, 143) else "FAILED")
    outcome.result = data.get("result") or {}
    outcome.run_id = outcome.result.get("run_id")
    outcome.error = data.get("error") or (None if code == 0 else f"exit code {code}")
    outcome.user_error = bool(data.get("user_error")) or code == 2


def _child_main(argv: Sequence[str]) -> int:
    """``CHILD_CONFIG PARENT_RUN_ID RESULT_JSON``: train one point, write its outcome as JSON."""
    from gmp_dist.commands.train import run_training, summary_line

    config_path, parent, result_path = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    def write(data: dict) -> None:
        Path(result_path).write_text(json.dumps(data, default=str))

    try:
        cfg = load_config(config_path)
        with stop_on_signals():
            result = run_training(cfg, parent_run_id=parent or None)
    except KeyboardInterrupt as exc:
        write({"status": "KILLED", "error": signals.describe(exc)})
        return signals.exit_code(exc)
    except UserError as exc:
        print(f"gmp-dist sweep: error: {exc}", file=sys.stderr)
        write({"status": "FAILED", "error": str(exc), "user_error": True})
        return 2
    except Exception as exc:
        traceback.print_exc()
        write({"status": "FAILED", "error": f"{type(exc).__name__}: {exc}"})
        return 1
    print(summary_line(cfg, result))
    write({"status": "FINISHED", "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
