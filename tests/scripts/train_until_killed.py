"""Run ``cnclip_kd.distill.trainer.train(config)`` and SIGKILL this very process part-way (for the resume tests).

Usage::

    python train_until_killed.py CONFIG.json --threads N (--kill-at-loss-call K | --kill-in-save K)

``--kill-at-loss-call K``: die when the loss of the K-th micro-batch is about to
be computed (mid-epoch, between checkpoints). ``--kill-in-save K``: die in the
middle of writing the K-th checkpoint (half its bytes are on disk, in the
trainer's temp file). Either way the process ends by a real SIGKILL: no
``finally`` block, ``atexit`` hook or buffered write of the trainer runs.
If training finishes without reaching the kill point, the script exits 3.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys

import torch

import cnclip_kd.distill.trainer as train_mod


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="JSON file with TrainConfig fields")
    parser.add_argument("--threads", type=int, required=True, help="torch intra-op threads (match the parent)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--kill-at-loss-call", type=int)
    group.add_argument("--kill-in-save", type=int)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = json.loads(open(args.config, encoding="utf-8").read())

    if args.kill_at_loss_call:
        base = train_mod.DistillationLoss

        class KillingLoss(base):
            calls = 0

            def forward(self, *a, **k):
                type(self).calls += 1
                if type(self).calls == args.kill_at_loss_call:
                    _die()
                return super().forward(*a, **k)

        train_mod.DistillationLoss = KillingLoss
    else:
        real_save = torch.save
        saves = [0]

        def half_save(obj, f, *a, **k):
            saves[0] += 1
            if saves[0] != args.kill_in_save:
                return real_save(obj, f, *a, **k)
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            data = buf.getvalue()
            with open(f, "wb") as fh:  # the trainer's temp file; half of it, as a kill mid-write leaves it
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            _die()

        torch.save = half_save
    train_mod.train(config)
    return 3


if __name__ == "__main__":
    sys.exit(main())
