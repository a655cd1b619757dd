"""`python -m tests.agent.slow_commit SECONDS serve ...`: `ama-stream serve` with every transaction
held open SECONDS after its records were acknowledged, just before its commit, so that a kill -9 at
a random moment most likely finds records of an open transaction on the broker: the case that
exactly-once delivery is about (a commit takes a few milliseconds otherwise)."""
from __future__ import annotations

import sys
import time

from kafka import KafkaProducer


def main() -> int:
    pause = float(sys.argv.pop(1))
    commit = KafkaProducer.commit_transaction

    def slow_commit(self):
        time.sleep(pause)
        return commit(self)

    KafkaProducer.commit_transaction = slow_commit
    from ama_stream.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
