"""``python _ddp_probe.py PROBE_DIR <run_all args...>``, plain or under torchrun: runs ``bench.cli.main`` as
``run_all.py`` does and leaves, per rank, what the DDP tests compare (nothing in the code under test changes):

- ``PROBE_DIR/rank<r>.pt``: after ``Trainer.run`` returns on that rank, the method's per-core state (AP's attention
  statistics ``means`` and keep masks, SPION's layouts and transition), the trainer's step, events and stage names,
  and a fingerprint of the final weights;
- ``PROBE_DIR/writes-rank<r>.txt``: one line per artifact save (``artifact <kind> <key>``) and per record write
  (``record <path>``) this rank made.

Every rank ends itself (SIGALRM) after ``PROBE_DEADLINE_S`` seconds (default 120): torchrun puts each rank in a
session of its own, so ranks left waiting on each other (a DDP hang) would outlive a test that kills torchrun.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository (as run_all.py's folder is)
PROBE = Path(sys.argv[1])
RANK = int(os.environ.get("RANK", "0"))


def _log(line: str) -> None:
    with open(PROBE / f"writes-rank{RANK}.txt", "a") as fh:
        fh.write(line + "\n")


def _patch() -> None:
    from bench import artifacts, records, train

    save = artifacts.ArtifactStore.save

    def logged_save(self, kind, key, payload, meta=None):
        _log(f"artifact {kind} {key}")
        return save(self, kind, key, payload, meta)

    artifacts.ArtifactStore.save = logged_save

    write = records.write_record_keeping

    def logged_write(record, path, *a, **k):
        _log(f"record {path}")
        return write(record, path, *a, **k)

    records.write_record_keeping = logged_write

    run = train.Trainer.run

    def probed_run(self):
        out = run(self)
        from methods.attention_pruning import weights_fingerprint

        m = self.method
        cores = getattr(m, "cores", [])
        torch.save({
            "rank": RANK, "step": self.step, "events": self.events, "history": self.history,
            "stages": [e["name"] for e in self.stage_records],
            "fingerprint": weights_fingerprint(self.model),
            "means": [t.clone() for t in m._means] if getattr(m, "_means", None) is not None else None,
            "keeps": [None if getattr(c, "keep", None) is None else c.keep.clone() for c in cores],
            "layouts": [None if getattr(c, "layout", None) is None else c.layout.cpu().clone() for c in cores],
            "transition_step": getattr(m, "transition_step", None),
            "n_checks": getattr(getattr(m, "criterion", None), "n_checks", None),
        }, PROBE / f"rank{RANK}.pt")
        return out

    train.Trainer.run = probed_run


if __name__ == "__main__":
    signal.alarm(int(os.environ.get("PROBE_DEADLINE_S", "120")))  # default action: the process ends
    PROBE.mkdir(parents=True, exist_ok=True)
    _patch()
    from bench.cli import main

    sys.exit(main(sys.argv[2:]))
